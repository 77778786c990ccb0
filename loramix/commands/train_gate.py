"""`loramix train-gate`: train an X-LoRA gate over frozen LoRA experts on JSON Lines data.

loramix train-gate --base smollm2 --expert bio=experts/bio --expert chem=experts/chem \\
    --data mix.jsonl --out xlora-bio-chem

Several processes (data parallel, gloo on CPUs):

torchrun --nproc_per_node 2 -m loramix.cli train-gate ... (same flags)
"""

from __future__ import annotations

import argparse
import os

from loramix.commands.training_flags import (
    add_data_arguments,
    add_training_arguments,
    training_options,
)
from loramix.config import XLoraConfig
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
    """Declare the `train-gate` subcommand and its flags."""
    x = XLoraConfig(adapters={"_": "_"})
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

    xlora = parser.add_argument_group("X-LoRA")
    xlora.add_argument(
        "--layerwise-scalings", action="store_true", help="one set of scalings per adapted module"
    )
    xlora.add_argument("--xlora-depth", type=int, default=x.xlora_depth, help="gate layers")
    xlora.add_argument("--xlora-size", type=int, default=x.xlora_size, help="gate hidden width")
    xlora.add_argument(
        "--xlora-dropout-p", type=float, default=x.xlora_dropout_p, help="gate dropout"
    )
    xlora.add_argument(
        "--softmax-temperature",
        type=float,
        default=x.softmax_temperature,
        help="divides the gate's logits before the softmax",
    )
    xlora.add_argument(
        "--top-k-lora", type=int, default=x.top_k_lora, help="keep the k largest scalings"
    )
    xlora.add_argument(
        "--enable-softmax-topk", action="store_true", help="softmax again over the top k"
    )
    xlora.add_argument("--no-softmax", action="store_true", help="no softmax over experts")
    xlora.add_argument(
        "--scaling-pass-value",
        type=float,
        default=x.scaling_pass_value,
        help="experts' scaling in the scaling pass",
    )
    xlora.add_argument(
        "--global-scaling-weight",
        type=float,
        default=x.global_scaling_weight,
        help="factor on every mixed LoRA term",
    )
    xlora.add_argument(
        "--use-trainable-adapters",
        action="store_true",
        help="train the experts' LoRA weights together with the gate",
    )
    xlora.add_argument(
        "--balance-weight",
        type=float,
        default=0.0,
        help="weight of the load-balancing term (CV^2 of mean expert usage)",
    )
    xlora.add_argument(
        "--entropy-weight",
        type=float,
        default=0.0,
        help="weight of KL(scalings || uniform) per token; > 0 spreads, < 0 sharpens",
    )
    add_training_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Train the gate; print the output folder, or the error and how to fix it."""
    from loramix.train_gate import train_gate

    experts: dict[str, str] = {}
    for name, folder in args.expert:
        if name in experts:
            raise UsageError(
                f"expert name {name!r} is given twice; give each --expert a different NAME."
            )
        experts[name] = folder
    out = train_gate(
        args.base,
        experts,
        args.data,
        args.out,
        layerwise_scalings=args.layerwise_scalings,
        xlora_depth=args.xlora_depth,
        xlora_size=args.xlora_size,
        xlora_dropout_p=args.xlora_dropout_p,
        softmax_temperature=args.softmax_temperature,
        top_k_lora=args.top_k_lora,
        enable_softmax_topk=args.enable_softmax_topk,
        enable_softmax=not args.no_softmax,
        scaling_pass_value=args.scaling_pass_value,
        global_scaling_weight=args.global_scaling_weight,
        use_trainable_adapters=args.use_trainable_adapters,
        balance_weight=args.balance_weight,
        entropy_weight=args.entropy_weight,
        **training_options(args),
    )
    if os.environ.get("RANK", "0") == "0":  # once under torchrun
        print(f"saved the X-LoRA model to {out}")
    return 0
