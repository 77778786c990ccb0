"""`loramix train-expert`: train one LoRA adapter (an expert) on JSON Lines data.

loramix train-expert --base smollm2 --data math.jsonl:2 --data chat.jsonl --out experts/math
"""

from __future__ import annotations

import argparse
import sys

from loramix.training import SCHEDULERS, TrainingConfig

_DTYPES = ("float32", "bfloat16", "float16")


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Declare the `train-expert` subcommand and its flags."""
    from loramix.train_expert import LLAMA_TARGETS, LoraSettings

    t, lora = TrainingConfig(), LoraSettings()
    parser = subparsers.add_parser(
        "train-expert",
        help="train one LoRA expert on JSON Lines data",
        description=(
            "Train one LoRA adapter with peft and write a standard PEFT adapter folder "
            "(adapter_config.json + adapter_model.safetensors). Data lines are "
            '{"prompt", "completion"} (loss on the completion), {"messages": [...]} '
            '(chat template; loss on assistant turns) or {"text"} (loss on all tokens).'
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    io = parser.add_argument_group("input and output")
    io.add_argument(
        "--base", default="smollm2", help="'smollm2' (embedded) or a local transformers folder"
    )
    io.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="FILE[:WEIGHT]",
        help="a .jsonl file, optionally with a sampling weight; repeat to mix files",
    )
    io.add_argument("--out", required=True, help="output folder (checkpoints in OUT/checkpoints)")
    io.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    io.add_argument("--overwrite", action="store_true", help="replace an earlier run in OUT")

    adapter = parser.add_argument_group("adapter")
    adapter.add_argument("--rank", type=int, default=lora.rank, help="LoRA rank r")
    adapter.add_argument("--alpha", type=float, default=lora.alpha, help="LoRA alpha")
    adapter.add_argument(
        "--targets",
        nargs="+",
        default=list(LLAMA_TARGETS),
        metavar="NAME",
        help="linear modules to adapt",
    )
    adapter.add_argument("--dropout", type=float, default=lora.dropout, help="LoRA dropout")

    training = parser.add_argument_group("training")
    training.add_argument("--lr", type=float, default=t.lr, help="peak learning rate")
    training.add_argument("--epochs", type=float, default=t.epochs, help="passes over the data")
    training.add_argument("--max-steps", type=int, default=t.max_steps, help="overrides --epochs")
    training.add_argument("--batch-size", type=int, default=t.batch_size)
    training.add_argument("--grad-accum", type=int, default=t.grad_accum, help="steps per update")
    training.add_argument("--seed", type=int, default=t.seed)
    training.add_argument("--max-length", type=int, default=t.max_length, help="tokens per example")
    training.add_argument(
        "--chat", action="store_true", help="render prompt/completion with the chat template"
    )
    training.add_argument(
        "--eval-fraction", type=float, default=t.eval_fraction, help="share held out per file"
    )
    training.add_argument("--save-steps", type=int, default=t.save_steps)
    training.add_argument(
        "--eval-steps", type=int, default=t.eval_steps, help="--save-steps if unset"
    )
    training.add_argument("--save-total-limit", type=int, default=t.save_total_limit)
    training.add_argument("--warmup", type=float, default=t.warmup, help="fraction (<1) or steps")
    training.add_argument("--lr-scheduler", choices=SCHEDULERS, default=t.lr_scheduler)
    training.add_argument("--logging-steps", type=int, default=t.logging_steps)
    training.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    training.add_argument("--dtype", choices=_DTYPES, default="float32", help="base weights dtype")


def run(args: argparse.Namespace) -> int:
    """Train the expert; print the output folder, or the error and how to fix it."""
    import torch

    from loramix.train_expert import train_expert

    try:
        out = train_expert(
            args.base,
            args.data,
            args.out,
            rank=args.rank,
            alpha=args.alpha,
            targets=args.targets,
            dropout=args.dropout,
            lr=args.lr,
            epochs=args.epochs,
            max_steps=args.max_steps,
            batch_size=args.batch_size,
            grad_accum=args.grad_accum,
            seed=args.seed,
            max_length=args.max_length,
            chat=args.chat,
            eval_fraction=args.eval_fraction,
            save_steps=args.save_steps,
            eval_steps=args.eval_steps,
            save_total_limit=args.save_total_limit,
            warmup=args.warmup,
            lr_scheduler=args.lr_scheduler,
            logging_steps=args.logging_steps,
            progress=not args.no_progress,
            resume=args.resume,
            overwrite=args.overwrite,
            dtype=getattr(torch, args.dtype),
        )
    except (ValueError, FileNotFoundError) as error:
        print(f"loramix train-expert: error: {error}", file=sys.stderr)
        return 2
    print(f"saved the LoRA adapter to {out}")
    return 0
