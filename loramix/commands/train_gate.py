"""`loramix train-gate`: train an X-LoRA gate over frozen LoRA experts on JSON Lines data.

loramix train-gate --base smollm2 --expert bio=experts/bio --expert chem=experts/chem \\
    --data mix.jsonl --out xlora-bio-chem

Several processes (data parallel, gloo on CPUs):

torchrun --nproc_per_node 2 -m loramix.cli train-gate ... (same flags)
"""

from __future__ import annotations

import argparse
import os
import sys

from loramix.config import XLoraConfig
from loramix.training import SCHEDULERS, TrainingConfig

_DTYPES = ("float32", "bfloat16", "float16")


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
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
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

    xlora = parser.add_argument_group("X-LoRA")
    xlora.add_argument(
        "--layerwise-scalings", action="store_true", help="one set of scalings per adapted module"
    )
    xlora.add_argument("--xlora-depth", type=int, default=x.xlora_depth, help="gate layers")
    xlora.add_argument("--xlora-size", type=int, default=x.xlora_size, help="gate hidden width")
    xlora.add_argument(
        "--xlora-dropout-p", type=float, default=x.xlora_dropout_p, help="gate dropout"
    )
    xlora.add_argument("--softmax-temperature", type=float, default=x.softmax_temperature)
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


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """The training flags shared with `train-expert` (see `TrainingConfig`)."""
    t = TrainingConfig()
    training = parser.add_argument_group("training")
    training.add_argument("--lr", type=float, default=t.lr, help="peak learning rate")
    training.add_argument("--epochs", type=float, default=t.epochs, help="passes over the data")
    training.add_argument("--max-steps", type=int, default=t.max_steps, help="overrides --epochs")
    training.add_argument("--batch-size", type=int, default=t.batch_size, help="per process")
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
    training.add_argument("--weight-decay", type=float, default=t.weight_decay)
    training.add_argument("--logging-steps", type=int, default=t.logging_steps)
    training.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    training.add_argument("--dtype", choices=_DTYPES, default="float32", help="base weights dtype")


def run(args: argparse.Namespace) -> int:
    """Train the gate; print the output folder, or the error and how to fix it."""
    import torch

    from loramix.train_gate import train_gate

    experts: dict[str, str] = {}
    for name, folder in args.expert:
        if name in experts:
            print(
                f"loramix train-gate: error: expert name {name!r} is given twice; give each "
                "--expert a different NAME.",
                file=sys.stderr,
            )
            return 2
        experts[name] = folder
    try:
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
            weight_decay=args.weight_decay,
            logging_steps=args.logging_steps,
            progress=not args.no_progress,
            resume=args.resume,
            overwrite=args.overwrite,
            dtype=getattr(torch, args.dtype),
        )
    except (ValueError, FileNotFoundError) as error:
        print(f"loramix train-gate: error: {error}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":  # once under torchrun
        print(f"saved the X-LoRA model to {out}")
    return 0
