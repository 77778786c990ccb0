"""Flags shared by `loramix train-expert` and `loramix train-gate` (see `TrainingConfig`)."""

from __future__ import annotations

import argparse
from typing import Any

from loramix.smollm2 import DEVICES
from loramix.training import REPORTERS, SCHEDULERS, TrainingConfig

DTYPES = ("float32", "bfloat16", "float16")


def add_data_arguments(group: argparse._ArgumentGroup) -> None:
    """`--data`, `--out`, `--resume`, `--overwrite`."""
    group.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="FILE[:WEIGHT]",
        help="a .jsonl file, optionally with a sampling weight; repeat to mix files",
    )
    group.add_argument(
        "--out", required=True, help="output folder (checkpoints in OUT/checkpoints)"
    )
    group.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    group.add_argument("--overwrite", action="store_true", help="replace an earlier run in OUT")


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """The optimisation, schedule, checkpoint and data-length flags."""
    t = TrainingConfig()
    training = parser.add_argument_group("training")
    training.add_argument("--lr", type=float, default=t.lr, help="peak learning rate")
    training.add_argument("--epochs", type=float, default=t.epochs, help="passes over the data")
    training.add_argument("--max-steps", type=int, default=t.max_steps, help="overrides --epochs")
    training.add_argument("--batch-size", type=int, default=t.batch_size, help="per process")
    training.add_argument("--grad-accum", type=int, default=t.grad_accum, help="steps per update")
    training.add_argument("--seed", type=int, default=t.seed, help="seed of init, split, mix")
    training.add_argument("--max-length", type=int, default=t.max_length, help="tokens per example")
    training.add_argument(
        "--chat", action="store_true", help="render prompt/completion with the chat template"
    )
    training.add_argument(
        "--eval-fraction", type=float, default=t.eval_fraction, help="share held out per file"
    )
    training.add_argument(
        "--save-steps", type=int, default=t.save_steps, help="steps between checkpoints"
    )
    training.add_argument(
        "--eval-steps", type=int, default=t.eval_steps, help="--save-steps if unset"
    )
    training.add_argument(
        "--save-total-limit", type=int, default=t.save_total_limit, help="checkpoints kept"
    )
    training.add_argument("--warmup", type=float, default=t.warmup, help="fraction (<1) or steps")
    training.add_argument(
        "--lr-scheduler", choices=SCHEDULERS, default=t.lr_scheduler, help="after warmup"
    )
    training.add_argument(
        "--weight-decay", type=float, default=t.weight_decay, help="AdamW weight decay"
    )
    training.add_argument(
        "--logging-steps", type=int, default=t.logging_steps, help="steps between loss logs"
    )
    add_progress_argument(training)
    training.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute activations in the backward pass: less memory, about 30%% more time",
    )
    training.add_argument("--dtype", choices=DTYPES, default="float32", help="base weights dtype")
    add_device_argument(training)
    training.add_argument(
        "--report-to",
        choices=REPORTERS,
        default=t.report_to,
        help="also send the training logs to TensorBoard or Weights & Biases (package needed)",
    )


def add_progress_argument(group: argparse._ActionsContainer) -> None:
    """`--no-progress`: no progress bar at all (the `loramix` command turns them off)."""
    group.add_argument(
        "--no-progress", action="store_true", help="hide every progress bar (weight loading too)"
    )


def add_device_argument(group: argparse._ActionsContainer) -> None:
    """`--device auto|cpu|cuda|mps`: where the model runs (auto: a GPU if there is one)."""
    group.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="where the model runs: auto = CUDA if available, else MPS, else the CPU",
    )


def training_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments that `train_expert` and `train_gate` share, from parsed flags."""
    import torch

    names = [
        "lr",
        "epochs",
        "max_steps",
        "batch_size",
        "grad_accum",
        "seed",
        "max_length",
        "chat",
        "eval_fraction",
        "save_steps",
        "eval_steps",
        "save_total_limit",
        "warmup",
        "lr_scheduler",
        "weight_decay",
        "logging_steps",
        "gradient_checkpointing",
        "device",
        "report_to",
        "resume",
        "overwrite",
    ]
    options = {name: getattr(args, name) for name in names}
    options["progress"] = not args.no_progress
    options["dtype"] = getattr(torch, args.dtype)
    return options
