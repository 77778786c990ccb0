"""On a CUDA GPU: the model, its experts and gate follow the base; the commands run there.

Every test is marked `cuda` and skipped where torch sees no CUDA device (tests/conftest.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import LLAMA_TARGETS, make_expert, random_ids, tiny_llama
from tiny_tokenizer import save_tiny_model, tiny_tokenizer
from tiny_tokenizer import tiny_llama as tiny_llama_for

from loramix import XLoraConfig, XLoraModel
from loramix.cli import main
from loramix.smollm2 import load_base_model

pytestmark = pytest.mark.cuda


def test_xlora_on_cuda_equals_the_cpu_model(llama_experts: dict[str, str]) -> None:
    config = XLoraConfig(adapters=llama_experts)
    cpu = XLoraModel(tiny_llama(), config)
    gpu = XLoraModel(tiny_llama().to("cuda"), config)  # built on a base already on the GPU
    gpu.gate.load_state_dict(cpu.gate.state_dict())
    assert {t.device.type for t in [*gpu.parameters(), *gpu.buffers()]} == {"cuda"}
    ids = random_ids(2, 6)
    with torch.no_grad():
        expected = cpu(input_ids=ids).logits
        torch.testing.assert_close(
            gpu(input_ids=ids.cuda()).logits.cpu(), expected, atol=1e-4, rtol=1e-4
        )
        for mode in ("granular", "merged"):
            options = {"max_new_tokens": 4, "do_sample": False, "scalings_mode": mode}
            assert torch.equal(
                gpu.generate(ids.cuda(), **options).cpu(), cpu.generate(ids, **options)
            ), mode
    moved = XLoraModel(tiny_llama(), config).to("cuda")  # or moved after it was built
    assert {t.device.type for t in [*moved.parameters(), *moved.buffers()]} == {"cuda"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(base folder, expert folder, data file) for a tiny Llama with a real tokenizer."""
    root = tmp_path_factory.mktemp("cuda")
    base = save_tiny_model(root / "base")
    vocab = len(tiny_tokenizer())
    expert = make_expert(lambda: tiny_llama_for(vocab), root / "expert", 1, LLAMA_TARGETS)
    data = root / "qa.jsonl"
    data.write_text('{"prompt": "what is two plus two? ", "completion": "four."}\n' * 8)
    return base, expert, data


def test_commands_run_on_cuda(folders, tmp_path: Path, capsys) -> None:
    base, expert, data = folders
    loaded, _ = load_base_model(base, device_map="cuda")
    assert {p.device.type for p in loaded.parameters()} == {"cuda"}
    out = tmp_path / "xlora"
    argv = ["train-gate", "--base", str(base), "--expert", f"a={expert}", "--expert", f"b={expert}"]
    argv += ["--data", str(data), "--out", str(out), "--max-steps", "2", "--batch-size", "2"]
    assert main([*argv, "--device", "cuda", "--no-progress", "--eval-fraction", "0"]) == 0
    prompt = ["--prompt", "what is two plus two?", "--max-new-tokens", "4", "--base", str(base)]
    assert main(["generate", str(out), *prompt, "--device", "cuda", "--show-experts"]) == 0
    assert "experts: [0] a  [1] b" in capsys.readouterr().out


def test_serve_runs_on_cuda(folders, monkeypatch) -> None:
    from fastapi.testclient import TestClient

    import loramix.serving.app as app_module

    base, expert, _ = folders
    served_dir = base.parent / "served"
    model = XLoraModel(
        load_base_model(base)[0], XLoraConfig(adapters={"a": str(expert), "b": str(expert)})
    )
    model.save_pretrained(served_dir)
    served = []
    monkeypatch.setattr(app_module, "run_server", lambda app, **_: served.append(app))
    assert main(["serve", str(served_dir), "--base", str(base), "--device", "cuda"]) == 0
    model = served[0].state.service.model
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    with TestClient(served[0]) as client:
        body = {"model": "served", "prompt": "what is two plus two?", "max_tokens": 4}
        response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] <= 4
