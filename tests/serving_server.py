"""A real loramix server over a tiny random X-LoRA model, on a free local port, in a thread."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import torch
import uvicorn
from helpers import LLAMA_TARGETS, make_expert
from tiny_tokenizer import tiny_llama, tiny_tokenizer

from loramix import XLoraConfig, XLoraModel
from loramix.serving.app import create_app
from loramix.serving.config import ServeConfig

MODEL_NAME = "tiny-xlora"
EXPERTS = ("math", "chem", "bio")


def tiny_xlora(root: Path) -> tuple[XLoraModel, object]:
    """A 2-layer Llama with three random experts and a random (confident) gate."""
    tokenizer = tiny_tokenizer()
    vocab = len(tokenizer)

    def factory() -> torch.nn.Module:
        return tiny_llama(vocab)

    experts = {
        name: str(make_expert(factory, root / name, seed, LLAMA_TARGETS, rank=4))
        for seed, name in enumerate(EXPERTS, start=1)
    }
    model = XLoraModel(tiny_llama(vocab), XLoraConfig(adapters=experts))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.gate.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 3)
    return model, tokenizer


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerThread:
    """uvicorn serving `create_app(...)` in a background thread; `stop()` shuts it down."""

    def __init__(self, model: XLoraModel, tokenizer: object, **settings: object) -> None:
        self.app = create_app(model, tokenizer, ServeConfig(model_name=MODEL_NAME, **settings))
        self.port = free_port()
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def engine(self):  # noqa: ANN201
        return self.app.state.service.engine

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
