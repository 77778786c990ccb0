"""`loramix science`: the science case study, the project's main job.

loramix science demo [--model DIR] [--out DIR]        answer, colour, evaluate, draw
loramix science retrain [--out DIR] [--seed N]        data, experts, gate, eval, bundle
loramix science add-domain DOMAIN [--out DIR]         one more expert and gate on a run

retrain and add-domain take one flag per `RetrainSettings` field (`add_settings_arguments`).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loramix.commands.flags import add_dtype_argument, dtype_from_args


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Declare `science demo` and `science retrain` and their flags."""
    from loramix.commands.flags import add_device_argument, add_progress_argument
    from loramix.commands.generate import add_colour_argument
    from loramix.science.bundle import DEFAULT_BUNDLE

    parser = subparsers.add_parser(
        "science",
        help="the science case study: bundled demo, or retrain everything from scratch",
        description=(
            "LoRA experts of eight science domains (biology, chemistry, proteins, mechanics, "
            "quantum, mathematics, reasoning, bio-inspired materials) on "
            "SmolLM2-135M-Instruct, mixed per token and per layer by a trained X-LoRA gate."
        ),
    )
    actions = parser.add_subparsers(dest="science_command", metavar="ACTION", required=True)

    demo = actions.add_parser(
        "demo",
        help="answer a question of each domain with the bundled model, evaluate, draw heatmaps",
    )
    demo.add_argument("--model", default=str(DEFAULT_BUNDLE), help="the X-LoRA folder to run")
    demo.add_argument("--out", default="runs/demo", help="folder for eval files and heatmaps")
    demo.add_argument("--base", default="smollm2", help="the base model the bundle was made on")
    demo.add_argument(
        "--n-eval", type=int, default=4, help="examples per test set in the quick evaluation"
    )
    demo.add_argument("--max-new-tokens", type=int, default=16, help="greedy tokens per answer")
    add_colour_argument(demo)
    add_device_argument(demo)
    add_progress_argument(demo)
    add_dtype_argument(demo)
    demo.add_argument(
        "--no-colour", action="store_true", help="same as --colour never: tag tokens by index"
    )

    retrain = actions.add_parser(
        "retrain",
        help="retrain data, experts and gate from scratch, evaluate, and export the bundle",
        description=(
            "Every step skips itself when its output exists in --out, so running the same "
            "command again resumes an interrupted retrain."
        ),
    )
    retrain.add_argument("--out", default="runs/retrain", help="the run's working folder")
    retrain.add_argument("--seed", type=int, default=0, help="seed of data, experts and gate")
    retrain.add_argument(
        "--bundle",
        default=None,
        help="where to export the float16 model (default: OUT/bundle-v2; the bundled model "
        f"is in {DEFAULT_BUNDLE} and is replaced only when named here)",
    )
    retrain.add_argument("--no-export", action="store_true", help="do not touch the bundle")
    retrain.add_argument(
        "--reuse",
        metavar="RUN",
        nargs="+",
        default=None,
        help="start --out (a new folder) from the finished steps of the run in RUN whose "
        "settings match: data, experts, multitask LoRAs and gate candidates (linked, RUN "
        "is left unchanged); gate selection and evaluation run again. With several runs, "
        "each later one fills in what the ones before left out, on the same data",
    )
    add_settings_arguments(retrain)

    add = actions.add_parser(
        "add-domain",
        help="train one more domain's expert and a new gate on a finished retrain run",
        description=(
            "Trains the domain's expert and a gate over every expert (the run's chosen gate "
            "settings), and records the time beside the run's multitask LoRA time. Give the "
            "settings flags the run was made with (they are checked against its run.json)."
        ),
    )
    add.add_argument("domain", help="the domain to add (one of loramix.science.DOMAINS)")
    add.add_argument("--out", default="runs/retrain", help="the finished run's folder")
    add.add_argument("--seed", type=int, default=0, help="the run's seed")
    # The new gate takes the settings of the gate the run chose: no gate flags here.
    add_settings_arguments(add, gate_flags=False)
    add.set_defaults(domains=None)  # every domain but the added one


def add_settings_arguments(parser: argparse.ArgumentParser, gate_flags: bool = True) -> None:
    """One flag per `RetrainSettings` field (help from its docstring), and `--gate-steps`.

    `--domains` and `--multitask-candidates` take names separated by spaces or commas
    (`biology,chemistry`, the older spelling); `gate_candidates` is set by `--gate-candidates`
    (names of `loramix.science.selection.DEFAULT_CANDIDATES`, all by default, or names that
    spell the settings, `pick_candidates`) and `--gate-steps` (the steps of every candidate
    kept); without `gate_flags` neither is declared.
    """
    from loramix.commands.flags import add_fields
    from loramix.science.pipeline import TRAIN_DTYPES, RetrainSettings
    from loramix.science.selection import DEFAULT_CANDIDATES
    from loramix.training.trainer import SCHEDULERS

    group = parser.add_argument_group("retrain settings (loramix.science.RetrainSettings)")
    choices = {"lr_scheduler": SCHEDULERS, "train_dtype": TRAIN_DTYPES}
    add_fields(group, RetrainSettings, skip=("gate_candidates",), choices=choices)
    if not gate_flags:
        return
    group.add_argument(
        "--gate-candidates",
        nargs="+",
        metavar="NAME",
        default=None,
        help="the gate settings to try, chosen on dev (names separated by spaces or commas; "
        f"default: all of {', '.join(c.name for c in DEFAULT_CANDIDATES)}; another name "
        "spells its settings: lr<learning rate>-s<steps>[-shared], e.g. lr3e-3-s1200)",
    )
    group.add_argument(
        "--gate-steps",
        type=int,
        default=None,
        help="optimizer steps of every gate candidate (default: each candidate's own)",
    )


def settings_from_args(args: argparse.Namespace, **values: Any) -> Any:
    """The `RetrainSettings` that the flags of `add_settings_arguments` give, plus `values`."""
    import dataclasses

    from loramix.commands.flags import from_args
    from loramix.science.pipeline import RetrainSettings

    candidates = RetrainSettings().gate_candidates
    if getattr(args, "gate_candidates", None) is not None:
        candidates = pick_candidates(candidates, split_names(args.gate_candidates))
    if getattr(args, "gate_steps", None) is not None:
        candidates = tuple(dataclasses.replace(c, steps=args.gate_steps) for c in candidates)
    if args.domains is not None:
        values.setdefault("domains", split_names(args.domains))
    if getattr(args, "multitask_candidates", None) is not None:
        values.setdefault("multitask_candidates", split_names(args.multitask_candidates))
    return from_args(RetrainSettings, args, gate_candidates=candidates, **values)


def pick_candidates(candidates: Sequence[Any], names: Sequence[str]) -> tuple[Any, ...]:
    """The `candidates` (`GateCandidate`s) called `names`, in the order given; a name that is
    not one of them but spells its settings (`lr3e-3-s1200`, `lr3e-3-s1200-shared`: see
    `loramix.science.selection.CANDIDATE_NAME`) makes a new candidate.

    Raises:
        ValueError: If a name is unknown or repeated, or none is given; it lists the known names.
    """
    from loramix.science.selection import candidate_from_name

    known = {c.name: c for c in candidates}
    spelled = {name: candidate_from_name(name) for name in names if name not in known}
    unknown = [name for name, candidate in spelled.items() if candidate is None]
    problem = None
    if unknown:
        problem = f"unknown {unknown}"
    elif not names:
        problem = "no name given"
    elif len(set(names)) != len(names):
        problem = f"{list(names)} repeats a name"
    if problem:
        raise ValueError(
            f"--gate-candidates: {problem}; choose from {list(known)} or spell the settings "
            "as lr<learning rate>-s<steps>[-shared], e.g. lr3e-3-s1200"
        )
    return tuple(known[name] if name in known else spelled[name] for name in names)


def split_names(items: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """`["a,b", "c"]` -> `("a", "b", "c")`: names given with spaces, commas or both."""
    return tuple(name.strip() for item in items for name in item.split(",") if name.strip())


def run(args: argparse.Namespace) -> int:
    """Run the chosen action; print its results, or the error and how to fix it."""
    if args.science_command == "demo":
        return _demo(args)
    if args.science_command == "add-domain":
        return _add_domain(args)
    return _retrain(args)


def _add_domain(args: argparse.Namespace) -> int:
    from loramix.science.add_domain import add_domain

    settings = add_domain_settings(args)
    record = add_domain(args.out, args.domain, seed=args.seed, settings=settings)
    for key, value in record.items():
        print(f"{key:22} {value}")
    return 0


def add_domain_settings(args: argparse.Namespace) -> Any:
    """The run's `RetrainSettings` from the `add-domain` flags: without `--domains`, every
    domain but the added one."""
    from loramix.science.registry import DOMAINS

    if args.domains is not None:
        return settings_from_args(args)
    return settings_from_args(args, domains=tuple(d for d in DOMAINS if d != args.domain))


def _demo(args: argparse.Namespace) -> int:
    from loramix.science.demo import run_demo

    start = time.perf_counter()
    result = run_demo(
        args.model,
        args.out,
        base=args.base,
        n_eval=args.n_eval,
        max_new_tokens=args.max_new_tokens,
        dtype=dtype_from_args(args),
        device=args.device,
        log=print,
    )
    print()
    from loramix.commands.generate import use_colour

    coloured = not args.no_colour and use_colour(args.colour)
    print(format_answers(result, tokenizer_of(args.base), colour=coloured))
    print(format_verdicts(result, args.model))
    if result.report is not None:
        print()
        print(format_report(result, args.out))
    print(f"demo finished in {time.perf_counter() - start:.0f} s")
    return 0


def tokenizer_of(base: str) -> Any:
    """The base model's tokenizer (the model itself is cached, so this is fast)."""
    from loramix.smollm2 import load_base_model

    return load_base_model(base)[1]


def format_answers(result: Any, tokenizer: Any, colour: bool = True) -> str:
    """Questions, reference answers and X-LoRA's answers with tokens coloured by expert.

    Without `colour`, each token is followed by its expert's index in brackets.
    """
    from loramix.commands.generate import (
        colour_tokens,
        legend,
        plain_legend,
        tagged_tokens,
        token_pieces,
    )

    names = result.expert_names
    lines = [legend(names) if colour else plain_legend(names), ""]
    for answer in result.answers:
        pieces = token_pieces(tokenizer, answer.token_ids)
        shown = (colour_tokens if colour else tagged_tokens)(pieces, answer.experts)
        lines += [
            f"[{answer.test_set}] {answer.prompt}",
            f"  reference: {answer.reference}",
            f"  X-LoRA:    {shown}   ({'correct' if answer.correct else 'wrong'})",
            "",
        ]
    return "\n".join(lines)


def format_verdicts(result: Any, model_dir: str) -> str:
    """The bundle's full evaluation verdicts (from its eval.json), one line per target."""
    from loramix.evaluation.report import format_targets

    if not result.verdicts:
        return f"{model_dir} has no eval.json, so no full evaluation to show."
    n = result.verdict_examples
    held_out = f"{n} held-out examples per test set" if n else "every held-out example"
    return "\n".join(
        [
            f"Targets, from the bundle's full evaluation ({held_out}; {model_dir}/eval.md):",
            format_targets(result.verdicts),
        ]
    )


def format_report(result: Any, out_dir: str) -> str:
    """The sample evaluation table and X-LoRA's expert usage on it, with no verdicts."""
    report = result.report
    n = report.settings.get("limit")
    return "\n".join(
        [
            f"A sample, the first {n} held-out examples of each test set, scored here to show "
            "the evaluation running (too few to judge the targets on; no pass/fail). Cells: "
            "mean completion NLL / share of verified greedy answers:",
            "",
            report.table(),
            "",
            "X-LoRA expert usage on the sample (mean scalings):",
            "",
            report.usage_table(),
            "",
            f"wrote eval.md, eval.json and {len(result.plots)} heatmaps to {out_dir}",
        ]
    )


def _retrain(args: argparse.Namespace) -> int:
    from loramix.science.pipeline import RUN_BUNDLE, retrain

    settings = settings_from_args(args)
    bundle = args.bundle if args.bundle is not None else str(Path(args.out) / RUN_BUNDLE)
    if args.reuse is not None:
        from loramix.science.reuse import reuse_run

        reuse_run(args.reuse, args.out, args.seed, settings)  # logs what it reused
    timings = retrain(
        args.out,
        seed=args.seed,
        settings=settings,
        bundle_dir=None if args.no_export else bundle,
    )
    for step, seconds in timings.items():
        print(f"{step:20} {'already done' if seconds is None else f'{seconds:.0f} s'}")
    spent = sum(s for s in timings.values() if s is not None)
    print(f"{spent / 60:.1f} min in this call; run folder {args.out}")
    if not args.no_export:
        print(f"bundle: {bundle}")
    return 0
