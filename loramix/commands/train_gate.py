"""`loramix train-gate`: train an X-LoRA gate over frozen LoRA experts on JSON Lines data.

loramix train-gate --base smollm2 --expert bio=experts/bio --expert chem=experts/chem \\
    --data mix.jsonl --out xlora-bio-chem

Several processes (data parallel, gloo on CPUs):

torchrun --nproc_per_node 2 -m loramix.cli train-gate ... (same flags)
"""

from __future__ import annotations

import argparse
import os

from loramix.commands.flags import (
    add_data_arguments,
    add_fields,
    add_training_arguments,
    from_args,
    run_options,
)
from loramix.errors import UsageError


def parse_expert(spec: str) -> tuple[str, str]:
    """Parse one `--expert NAME=DIR`.

    Raises:
        argparse.ArgumentTypeError: If the text is not NAME=DIR with both parts non-empty.
    """
    name, sep, folder = spec.partition("=")
    if not sep or not name.strip() or not folder.strip():
        raise argparse.ArgumentTypeError(
            f"{spec!r}: use NAME=DIR, e.g. --expert math=experts/math (DIR is a PEFT adapter "
            "folder; repeat --expert for each expert)"
        )
    return name.strip(), folder.strip()


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Declare the `train-gate` subcommand and its flags (`XLoraConfig`, `GateRegularizer`,
    `TrainingConfig`)."""
    parser = subparsers.add_parser(
        "train-gate",
        help="train an X-LoRA gate over frozen LoRA experts",
        description=(
            "Train only the X-LoRA gate (base model and experts frozen) with the cross-entropy "
            "of the mixed pass, and write a folder that XLoraModel.from_pretrained reads. "
            "Data lines are as for train-expert. Runs unchanged under torchrun."
        ),
    )
    io = parser.add_argument_group("input and output")
    io.add_argument(
        "--base", default="smollm2", help="'smollm2' (embedded) or a local transformers folder"
    )
    io.add_argument(
        "--expert",
        action="append",
        required=True,
        type=parse_expert,
        metavar="NAME=DIR",
        help="an expert's name and PEFT adapter folder; repeat for each expert (order = axis)",
    )
    add_data_arguments(io)

    from loramix.config import XLoraConfig
    from loramix.training.regularizer import GateRegularizer

    xlora = parser.add_argument_group("X-LoRA")
    add_fields(xlora, XLoraConfig, skip={"adapters"})
    add_fields(xlora, GateRegularizer)
    add_training_arguments(parser, skip={"keep_best"})  # the gate refuses it


def run(args: argparse.Namespace) -> int:
    """Train the gate; print the output folder, or the error and how to fix it."""
    from loramix.config import XLoraConfig
    from loramix.training.gate import train_gate
    from loramix.training.regularizer import GateRegularizer
    from loramix.training.trainer import TrainingConfig

    experts: dict[str, str] = {}
    for name, folder in args.expert:
        if name in experts:
            raise UsageError(
                f"expert name {name!r} is given twice; give each --expert a different NAME."
            )
        experts[name] = folder
    out = train_gate(
        args.base,
        from_args(XLoraConfig, args, adapters=experts),
        args.data,
        args.out,
        from_args(TrainingConfig, args),
        from_args(GateRegularizer, args),
        **run_options(args),
    )
    if os.environ.get("RANK", "0") == "0":  # once under torchrun
        print(f"saved the X-LoRA model to {out}")
    return 0
