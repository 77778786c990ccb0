"""`loramix serve`: an OpenAI-compatible server for an X-LoRA folder, with a page at `/`.

loramix serve models/science-xlora      # on the base and prompt rendering it was trained with
loramix serve runs/xlora --base path/to/base --port 8001 --mode frozen --max-batch 8

The server's settings are `loramix.serving.config.ServeConfig`'s fields (`--mode`,
`--max-batch`, `--default-max-tokens`, `--model-name`), declared from the dataclass.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from loramix.commands.flags import (
    add_device_argument,
    add_dtype_argument,
    add_fields,
    add_threads_argument,
    apply_threads,
    dtype_from_args,
    from_args,
)
from loramix.serving.config import MODES, ServeConfig


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Declare the `serve` subcommand and its flags."""
    parser = subparsers.add_parser(
        "serve",
        help="serve an X-LoRA model over OpenAI's HTTP API",
        description=(
            "Serve an X-LoRA folder (written by XLoraModel.save_pretrained) over OpenAI's "
            "HTTP API (/v1/chat/completions, /v1/completions, /v1/models), with /health, "
            "/metrics and a page at / that colours each token by its dominant expert. "
            "Concurrent requests are batched continuously. Needs the `serve` extra. "
            "SIGTERM: running requests finish, new ones are refused, then the server exits."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="an X-LoRA folder (save_pretrained)")
    parser.add_argument(
        "--base",
        default=None,
        help="'smollm2' (embedded) or a local transformers folder (default: the base recorded "
        "in MODEL_DIR, else smollm2)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    add_device_argument(parser)
    add_dtype_argument(parser)
    add_threads_argument(parser)
    add_fields(parser, ServeConfig, skip={"model_name"}, choices={"mode": MODES})
    parser.add_argument(
        "--model-name", default=None, help="the model id clients pass (default: MODEL_DIR's name)"
    )


def run(args: argparse.Namespace) -> int:
    """Load the model and serve it until SIGTERM / Ctrl-C."""

    try:
        from loramix.serving.app import create_app, run_server
    except ImportError as error:
        print(f"loramix serve: error: {error}", file=sys.stderr)
        return 2
    from loramix.commands.generate import _load
    from loramix.records import choose_chat, prompt_rendering

    try:
        apply_threads(args)
        if not 0 < args.port < 65536:
            raise ValueError(f"--port={args.port}: use a port between 1 and 65535")
        name = args.model_name or Path(args.model_dir).resolve().name
        config = from_args(ServeConfig, args, model_name=name)
        model, tokenizer = _load(args.model_dir, args.base, dtype_from_args(args), args.device)
        rendering = prompt_rendering(args.model_dir)  # the page and the model card follow it
        choose_chat(args.model_dir, None, tokenizer, fallback=True)  # warns on another template
    except (ValueError, FileNotFoundError) as error:
        print(f"loramix serve: error: {error}", file=sys.stderr)
        return 2
    app = create_app(model, tokenizer, config, prompt_rendering=rendering)
    run_server(app, host=args.host, port=args.port)
    return 0
