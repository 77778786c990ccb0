"""`loramix train-expert`: train one LoRA adapter (an expert) on JSON Lines data.

loramix train-expert --base smollm2 --data math.jsonl:2 --data chat.jsonl --out experts/math
"""

from __future__ import annotations

import argparse

from loramix.commands.flags import (
    add_data_arguments,
    add_fields,
    add_training_arguments,
    from_args,
    run_options,
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Declare the `train-expert` subcommand and its flags (`LoraSettings`, `TrainingConfig`)."""
    from loramix.training.expert import LoraSettings

    parser = subparsers.add_parser(
        "train-expert",
        help="train one LoRA expert on JSON Lines data",
        description=(
            "Train one LoRA adapter with peft and write a standard PEFT adapter folder "
            "(adapter_config.json + adapter_model.safetensors). Data lines are "
            '{"prompt", "completion"} (loss on the completion), {"messages": [...]} '
            '(chat template; loss on assistant turns) or {"text"} (loss on all tokens).'
        ),
    )
    io = parser.add_argument_group("input and output")
    io.add_argument(
        "--base", default="smollm2", help="'smollm2' (embedded) or a local transformers folder"
    )
    add_data_arguments(io)
    io.add_argument(
        "--eval-data",
        action="append",
        default=[],
        metavar="FILE",
        help="a .jsonl file (e.g. a dev split) for the held-out loss, used whole instead of "
        "--eval-fraction of the training data; repeat for several; with --keep-best the "
        "adapter is the checkpoint that did best on them",
    )
    add_fields(parser.add_argument_group("adapter"), LoraSettings)
    add_training_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Train the expert; print the output folder, or the error and how to fix it."""
    from loramix.training.expert import LoraSettings, train_expert
    from loramix.training.trainer import TrainingConfig

    out = train_expert(
        args.base,
        args.data,
        args.out,
        from_args(LoraSettings, args),
        from_args(TrainingConfig, args),
        **run_options(args),
        eval_data=args.eval_data,
    )
    print(f"saved the LoRA adapter to {out}")
    return 0
