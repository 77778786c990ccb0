"""`loramix eval`: score an X-LoRA folder against its base model, its experts and their average.

loramix eval runs/xlora --base smollm2 --test biology=data/biology_test.jsonl \
    --test mixed=data/mixed_test.jsonl --out runs/eval --verifier science --plots
"""

from __future__ import annotations

import argparse
from pathlib import Path

from loramix.commands.flags import (
    add_device_argument,
    add_dtype_argument,
    add_progress_argument,
    add_threads_argument,
    apply_threads,
    dtype_from_args,
)

VERIFIERS = ("exact", "science")
"""exact: `loramix.evaluation.runner.exact_match`; science: `loramix.science.targets`."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Declare the `eval` subcommand and its flags."""
    from loramix.evaluation.runner import DEFAULT_SYSTEMS

    parser = subparsers.add_parser(
        "eval",
        help="score an X-LoRA model, its base, each expert and their average on test sets",
        description=(
            "For every test set (JSON Lines of prompt/completion records) and every system "
            "(base model, each expert alone, the uniform average of the experts, X-LoRA): mean "
            "completion NLL and the share of verified greedy answers. Prints the table and "
            "writes eval.json and eval.md into --out; with --plots also heatmaps of the "
            "scalings. Test sets named like an expert (or given with --expert-for), 'mixed' "
            "and 'composite' are checked against the X-LoRA targets."
        ),
    )
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="an X-LoRA folder (save_pretrained)")
    parser.add_argument(
        "--base",
        default=None,
        help="'smollm2' (embedded) or a local transformers folder (default: the base recorded "
        "in MODEL_DIR, else smollm2)",
    )
    parser.add_argument(
        "--test",
        action="append",
        required=True,
        metavar="NAME=FILE",
        help="a test set (.jsonl with prompt and completion); repeat for several",
    )
    parser.add_argument("--out", required=True, help="output folder for eval.json, eval.md, PNGs")
    parser.add_argument(
        "--systems",
        nargs="+",
        default=list(DEFAULT_SYSTEMS),
        metavar="SYSTEM",
        help="base, experts (every expert alone), expert:NAME, uniform, xlora",
    )
    parser.add_argument("--limit", type=int, default=None, help="first N examples of each set")
    parser.add_argument(
        "--max-new-tokens", type=int, default=32, help="greedy tokens per answer; 0: NLL only"
    )
    parser.add_argument(
        "--verifier",
        choices=sorted(VERIFIERS),
        default="exact",
        help="exact: first line equals the completion; science: the task's own check",
    )
    parser.add_argument("--plots", action="store_true", help="write heatmaps (needs matplotlib)")
    parser.add_argument(
        "--blocks",
        default=None,
        metavar="START:END",
        help="token heatmaps average over the modules of blocks START..END-1 (default: all)",
    )
    parser.add_argument(
        "--expert-for",
        action="append",
        default=[],
        metavar="SET=EXPERT",
        help="the expert of a domain test set, for the targets (default: same name)",
    )
    parser.add_argument(
        "--reference",
        default=None,
        metavar="SYSTEM",
        help="eval.md adds every other system's NLL minus this one's, with paired 95%% "
        "bootstrap intervals (default: xlora when it is evaluated with another system)",
    )
    parser.add_argument("--mixed", default="mixed", help="name of the mixed test set")
    parser.add_argument("--composite", default="composite", help="name of the composite test set")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per model call")
    parser.add_argument("--max-length", type=int, default=1024, help="tokens per example")
    parser.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="render prompts with the chat template, or plain with --no-chat (default: as in "
        "training, from MODEL_DIR/training_args.json; chat if unrecorded)",
    )
    add_dtype_argument(parser)
    add_device_argument(parser)
    add_threads_argument(parser)
    add_progress_argument(parser)


def run(args: argparse.Namespace) -> int:
    """Evaluate; print the table and the targets, or the error and how to fix it."""

    from loramix.evaluation.report import format_targets
    from loramix.evaluation.runner import evaluate, exact_match, load_test_set, resolve_systems
    from loramix.model import XLoraModel
    from loramix.records import base_to_load, choose_chat
    from loramix.science.targets import check_targets, science_verifier
    from loramix.smollm2 import load_base_model

    tests = _pairs(args.test, "--test", "NAME=FILE")
    domain_experts = _pairs(args.expert_for, "--expert-for", "SET=EXPERT")
    blocks = _blocks(args.blocks)
    apply_threads(args)
    if args.plots:
        from loramix.evaluation.plots import require_matplotlib

        require_matplotlib()  # fail before the model is loaded, not after the evaluation
    base_name = base_to_load(args.model_dir, args.base)
    base, tokenizer = load_base_model(
        base_name, dtype=dtype_from_args(args), device_map=args.device
    )
    chat = choose_chat(args.model_dir, args.chat, tokenizer, fallback=True)
    model = XLoraModel.from_pretrained(base, args.model_dir)
    domain_experts = domain_experts or {name: name for name in tests if name in model.expert_names}
    unknown = sorted(set(domain_experts.values()) - set(model.expert_names))
    if unknown:  # these checks come before the evaluation, which can take long
        raise ValueError(
            f"--expert-for names unknown expert(s) {', '.join(unknown)}; the model's "
            f"experts are {', '.join(model.expert_names)}"
        )
    if blocks is not None and args.plots:
        from loramix.evaluation.plots import modules_in_blocks

        modules_in_blocks(model.adapted_modules, blocks)
    _check_out(Path(args.out))
    try:
        systems = resolve_systems(args.systems, model.expert_names)
    except ValueError:  # `evaluate` names it, with any other problem of the arguments
        systems = None
    reference = _reference(args.reference, systems) if systems is not None else None
    report = evaluate(
        model,
        tokenizer,
        {name: Path(path) for name, path in tests.items()},
        args.systems,
        max_new_tokens=args.max_new_tokens,
        chat=chat,
        verifier=science_verifier if args.verifier == "science" else exact_match,
        limit=args.limit,
        batch_size=args.batch_size,
        max_length=args.max_length,
    )
    targets = check_targets(
        report,
        {d: e for d, e in domain_experts.items() if d in tests},
        mixed=args.mixed if args.mixed in tests else None,
        composite=args.composite if args.composite in tests else None,
    )
    written = list(report.write(args.out, targets, reference=reference).values())
    if args.plots:
        from loramix.evaluation.plots import write_eval_plots

        samples = {
            name: load_test_set(path, tokenizer, chat=chat, limit=1, max_length=args.max_length)[
                0
            ].input_ids
            for name, path in tests.items()
        }
        written += write_eval_plots(
            model, tokenizer, samples, args.out, usage=report.usage or None, blocks=blocks
        )
    print(report.table())
    if targets:
        print()
        print(format_targets(targets))
    print()
    for path in written:
        print(f"wrote {path}")
    return 0


def _check_out(out: Path) -> None:
    """Refuses an --out that is a file or lies under one (the report is a folder)."""
    for path in (out, *out.parents):
        if path.exists() and not path.is_dir():
            raise ValueError(
                f"--out {out}: {path} is a file; give a folder for the report (eval.json, "
                "eval.md and the pictures)"
            )


def _reference(chosen: str | None, systems: list[str]) -> str | None:
    """The system the paired table compares the others with: `chosen`, or xlora when it is
    evaluated (None: no table).

    Raises:
        ValueError: If `chosen` is not one of the evaluated systems.
    """
    from loramix.evaluation.runner import XLORA

    if chosen is None:
        return XLORA if XLORA in systems and len(systems) > 1 else None
    if chosen not in systems or len(systems) < 2:
        raise ValueError(
            f"--reference {chosen!r}: compare it with other evaluated systems (evaluated: "
            f"{', '.join(systems)}); name one of them, or add systems to --systems"
        )
    return chosen


def _pairs(values: list[str], flag: str, shape: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for value in values:
        key, sep, rest = value.partition("=")
        if not sep or not key or not rest:
            raise ValueError(f"{flag} {value!r}: write it as {shape}")
        if key in pairs:
            raise ValueError(f"{flag}: {key!r} is given twice; use distinct names")
        pairs[key] = rest
    return pairs


def _blocks(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    start, sep, end = value.partition(":")
    try:
        bounds = (int(start), int(end)) if sep else None
    except ValueError:
        bounds = None
    if bounds is None or not 0 <= bounds[0] < bounds[1]:
        raise ValueError(f"--blocks {value!r}: write it as START:END with 0 <= START < END")
    return bounds
