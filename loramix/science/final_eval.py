"""The retrain's final report: every system on the test files, opened here and nowhere else.

Systems, rows of `OUT/eval/eval.md` (NLL and verified accuracy, each with a 95% bootstrap
interval):

    base            SmolLM2 without adapters
    expert:<d>      each domain's expert alone, on its own domain, the mixed and the
                    composite set (the sets the targets compare it on)
    uniform         the plain average of the experts
    multitask       one LoRA trained on the union of the training files, with as many
                    trainable parameters as the experts together and, unless another
                    schedule was chosen on dev (`loramix.science.multitask_choice`), as many
                    training examples (`loramix.science.pipeline`), evaluated as the only
                    expert of an X-LoRA model with its scaling fixed to 1 (plain LoRA)
    xlora           the chosen gate's per-token, per-layer mixture ("granular")
    xlora-frozen    the same as frozen generation runs it: the prompt per token, then the
                    completion with its prompt's mean scalings (`loramix.evaluation.frozen`)

Then the targets (`loramix.science.targets.check_targets`, with the multitask LoRA as a
rival on every set, win or lose) and the pictures: scalings per layer and per token for one
example of each domain and of the composite set, expert usage per test set for every
expert, and the accuracy table as a chart.

Gate settings were chosen on the dev files before this step (`loramix.science.selection`);
nothing here feeds back into training.

The systems are scored in parts (`evaluation_parts`), each saved as it finishes into
`OUT/eval/parts/<part>.json` with what its scores were made from (`part_inputs`: the digests
of the models it loads and of the test files, the evaluation settings and loramix's source).
A part whose saved inputs match is not scored again: an interrupted evaluation loses only the
parts in progress, and the parts that do not need the multitask LoRA can be scored while it
still trains (`score_parts`). `eval.json` records the digest of all the parts' inputs, so that
`report_is_current` tells a report made from today's models, test files and code from a stale
one. Removing `OUT/eval` scores everything again.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loramix.atomic import write_text_atomic

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from loramix.evaluation.report import EvalReport, Score
    from loramix.model import XLoraModel
    from loramix.science.pipeline import RetrainPaths, RetrainSettings

logger = logging.getLogger(__name__)

ACCURACY_PNG = "accuracy.png"
MIXTURE_PART = "mixture"  # the part of the evaluation that scores the X-LoRA systems
PARTS = "parts"  # OUT/eval/parts/<part>.json: a part's scores and what they were made from
INPUTS_KEY = "inputs_sha256"  # eval.json's settings: the digest of all its parts' inputs


def evaluate_run(paths: RetrainPaths, settings: RetrainSettings) -> dict[str, Any]:
    """Evaluate every system of the run on its test files; write eval.json/md and the PNGs.

    The systems are scored in parts (`evaluation_parts`), side by side in up to
    `settings.workers` processes, and gathered into one report; parts saved earlier from the
    same inputs are kept (`score_parts`).

    Returns:
        The parts scored in this call and those kept (see `score_parts`).
    """
    from loramix.evaluation.plots import plot_accuracy, write_eval_plots
    from loramix.evaluation.runner import (
        BASE,
        EXPERT_PREFIX,
        UNIFORM,
        XLORA,
        XLORA_FROZEN,
        load_test_set,
    )
    from loramix.model import XLoraModel
    from loramix.science.pipeline import MIXED, MULTITASK
    from loramix.science.registry import COMPOSITE
    from loramix.science.targets import check_targets
    from loramix.smollm2 import load_base_model

    test_sets = {name: str(path) for name, path in paths.test_sets(settings.domains).items()}
    parts = evaluation_parts(settings)
    scored = score_parts(paths, settings)
    done = {name: saved_part(paths, name) for name in parts}
    inputs_digest = _inputs_digest(paths, settings)
    report = done[MIXTURE_PART]  # the X-LoRA systems, with the expert usage
    for name in parts:
        if name != MIXTURE_PART:
            for system, scores in done[name].scores.items():
                report.add_system(
                    MULTITASK if system == EXPERT_PREFIX + MULTITASK else system, scores
                )
    order = [BASE, *(EXPERT_PREFIX + d for d in settings.domains), UNIFORM, MULTITASK]
    report.systems = [s for s in order if s in report.systems] + [XLORA, XLORA_FROZEN]
    report.settings["systems_on_subsets"] = "expert:<d> on <d>, composite and mixed only"
    report.settings[INPUTS_KEY] = inputs_digest
    if settings.multitask:  # which multitask LoRA; what the mixture buys against it
        from loramix.science.multitask_choice import chosen_multitask, multitask_plan

        chosen, folder = chosen_multitask(paths, settings)
        report.settings["multitask_lora"] = {
            "name": chosen,
            "folder": str(folder.relative_to(paths.out)),
            **multitask_plan(folder),
            "chosen_on_dev": bool(settings.multitask_candidates),
        }
        from loramix.science.add_domain import add_domain_cost
        from loramix.science.pipeline import TIMINGS_JSON, read_json

        try:
            cost = add_domain_cost(read_json(paths.out / TIMINGS_JSON), settings, chosen)
        except ValueError as error:  # e.g. steps timed in an earlier call were lost
            logger.warning("add-a-domain cost not reported: %s", error)
        else:
            report.settings["add_domain_vs_multitask_s"] = cost

    checks = check_targets(
        report,
        {domain: domain for domain in settings.domains},
        composite=COMPOSITE if COMPOSITE in test_sets else None,
        multitask=MULTITASK if settings.multitask else None,
    )
    report.write(paths.eval, checks, reference=XLORA)  # every system against X-LoRA, paired
    logger.info("evaluation:\n%s", report.table())
    for check in checks:
        logger.info("target %s", check.line())
    base, tokenizer = load_base_model(settings.base)
    model = XLoraModel.from_pretrained(base, paths.xlora)
    samples = {
        name: load_test_set(path, tokenizer, chat=False, limit=1, max_length=settings.max_length)[
            0
        ].input_ids
        for name, path in test_sets.items()
        if name != MIXED
    }
    write_eval_plots(model, tokenizer, samples, paths.eval, usage=report.usage)
    plot_accuracy(report, paths.eval / ACCURACY_PNG)
    return scored


def score_parts(
    paths: RetrainPaths,
    settings: RetrainSettings,
    names: Sequence[str] | None = None,
    busy: int = 0,
) -> dict[str, Any]:
    """Score the evaluation parts `names` (default: all of `evaluation_parts`) that have no
    saved scores made from today's inputs, side by side in up to `settings.workers - busy`
    processes, saving each as it finishes.

    Returns:
        {"scored": the parts scored now, "kept": those whose saved scores still hold, "each":
        part -> its own wall and CPU time (when it was scored)}.
    """
    from loramix.science.pipeline import worker_plan
    from loramix.training.jobs import run_jobs

    parts = evaluation_parts(settings)
    names = list(parts) if names is None else list(names)
    inputs = {name: part_inputs(paths, settings, parts[name]) for name in names}
    todo = [name for name in names if _read_part(paths, name).get("inputs") != inputs[name]]
    kept = [name for name in names if name not in todo]
    if kept:
        logger.info("evaluation: kept the saved scores of %s (same models and test files)", kept)
    if todo:
        workers, threads = worker_plan(settings, len(todo), busy=busy)
        logger.info("evaluation: %d part(s), %d at a time", len(todo), workers)
        jobs = {name: (paths, settings, parts[name]) for name in todo}
        for done in run_jobs(_evaluate_part, jobs, workers=workers, threads=threads):
            record = {
                "inputs": inputs[done.name],
                "wall_s": round(done.wall_s, 2),
                "cpu_s": round(done.cpu_s, 1),
                "report": done.value.to_dict(),
            }
            folder = paths.eval / PARTS
            folder.mkdir(parents=True, exist_ok=True)
            write_text_atomic(folder / f"{done.name}.json", json.dumps(record, indent=2) + "\n")
            logger.info("evaluation: part %s done in %.1f s", done.name, done.wall_s)
    each = {}
    for name in names:
        record = _read_part(paths, name)
        each[name] = {key: record[key] for key in ("wall_s", "cpu_s") if key in record}
    return {"scored": todo, "kept": kept, "each": each}


def report_is_current(paths: RetrainPaths, settings: RetrainSettings) -> bool:
    """Whether `OUT/eval` holds a whole report (eval.json and its pictures) made from the
    parts' inputs of today: the same models, test files, settings and code."""
    from loramix.evaluation.plots import USAGE_PNG
    from loramix.evaluation.report import REPORT_JSON

    files = [paths.eval / name for name in (REPORT_JSON, USAGE_PNG, ACCURACY_PNG)]
    if not all(path.is_file() for path in files):
        return False
    try:
        recorded = json.loads(files[0].read_text(encoding="utf-8"))["settings"][INPUTS_KEY]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return recorded == _inputs_digest(paths, settings)


def _inputs_digest(paths: RetrainPaths, settings: RetrainSettings) -> str:
    """SHA-256 of every part's inputs (`part_inputs`)."""
    import hashlib

    inputs = {
        name: part_inputs(paths, settings, systems)
        for name, systems in evaluation_parts(settings).items()
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


@functools.cache
def source_digest() -> str:
    """SHA-256 over loramix's Python source files (names and bytes), as this process first
    read them: scores made by other code are not kept."""
    import loramix
    from loramix.training.outputs import tree_digest

    return tree_digest(Path(loramix.__file__).parent, "*.py")


def part_inputs(paths: RetrainPaths, settings: RetrainSettings, systems: list[str]) -> dict:
    """What the scores of a part scoring `systems` are made from: the SHA-256 of each model
    folder it loads (the chosen gate's folder with every file under it, and the experts, or
    the multitask LoRA, with the candidates it was chosen among) and of each test file, the
    evaluation settings, loramix's code and the versions of the libraries that run it."""
    from loramix.evaluation.runner import EXPERT_PREFIX
    from loramix.science.pipeline import MULTITASK
    from loramix.training.outputs import file_digest, folder_digest, tree_digest

    choice = {}
    if systems == [EXPERT_PREFIX + MULTITASK]:
        from loramix.science.multitask_choice import chosen_multitask

        chosen, folder = chosen_multitask(paths, settings)
        models = {MULTITASK: folder}
        choice = {"multitask": {"chosen": chosen, "among": sorted(settings.multitask_candidates)}}
    else:
        models = {"xlora": paths.xlora, **{d: paths.expert(d) for d in settings.domains}}
    return {
        "systems": list(systems),
        **choice,
        "models": {
            name: tree_digest(folder) if folder == paths.xlora else folder_digest(folder)
            for name, folder in models.items()
        },
        "test_files": {
            name: file_digest(path) for name, path in paths.test_sets(settings.domains).items()
        },
        "settings": {
            "base": settings.base,
            "eval_limit": settings.eval_limit,
            "max_new_tokens": settings.max_new_tokens,
            "max_length": settings.max_length,
        },
        "code": source_digest(),
        "libraries": library_versions(),
    }


def library_versions() -> dict[str, str]:
    """The versions of the libraries that compute the scores (torch, transformers, peft,
    tokenizers, and gguf, which reads the default base model's weights)."""
    from importlib.metadata import version

    import peft
    import tokenizers
    import torch
    import transformers

    return {
        "gguf": version("gguf"),
        "tokenizers": tokenizers.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def saved_part(paths: RetrainPaths, name: str) -> EvalReport:
    """The saved scores of the part `name` (`score_parts` writes them)."""
    from loramix.evaluation.report import EvalReport

    return EvalReport.from_dict(_read_part(paths, name)["report"])


def _read_part(paths: RetrainPaths, name: str) -> dict[str, Any]:
    """A part's saved record, or {} when there is none or it cannot be read as a report."""
    from loramix.evaluation.report import EvalReport

    path = Path(paths.eval) / PARTS / f"{name}.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        EvalReport.from_dict(record["report"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return record if isinstance(record, dict) else {}


def evaluation_parts(settings: RetrainSettings) -> dict[str, list[str]]:
    """Part name -> the systems it scores; the largest parts first, so that side by side
    they finish at about the same time: the X-LoRA systems (two passes each), the base and
    the uniform average, the multitask LoRA, and the experts in two halves (each on its own
    domain, the mixed and the composite set only).
    """
    from loramix.evaluation.runner import BASE, EXPERT_PREFIX, UNIFORM, XLORA, XLORA_FROZEN
    from loramix.science.pipeline import MULTITASK

    parts = {MIXTURE_PART: [XLORA, XLORA_FROZEN], "references": [BASE, UNIFORM]}
    if settings.multitask:
        parts[MULTITASK] = [EXPERT_PREFIX + MULTITASK]
    experts = [EXPERT_PREFIX + d for d in settings.domains]
    half = (len(experts) + 1) // 2
    for i, chunk in enumerate((experts[:half], experts[half:]), start=1):
        if chunk:
            parts[f"experts-{i}"] = chunk
    return parts


def _evaluate_part(
    paths: RetrainPaths, settings: RetrainSettings, systems: list[str]
) -> EvalReport:
    """Score `systems` on their test sets (a job of `score_parts`).

    Returns:
        The report of the X-LoRA systems (the frame of the whole report: experts, test
        sets, usage) for the mixture part; for the others, a report holding their scores.
    """
    from loramix.config import XLoraConfig
    from loramix.evaluation.report import EvalReport
    from loramix.evaluation.runner import EXPERT_PREFIX, XLORA, evaluate
    from loramix.model import XLoraModel
    from loramix.science.pipeline import MULTITASK
    from loramix.science.targets import science_verifier
    from loramix.smollm2 import load_base_model

    base, tokenizer = load_base_model(settings.base)
    test_sets = {name: str(path) for name, path in paths.test_sets(settings.domains).items()}
    options = dict(
        chat=False,
        verifier=science_verifier,
        limit=settings.eval_limit,
        max_new_tokens=settings.max_new_tokens,
        max_length=settings.max_length,
    )
    if systems == [EXPERT_PREFIX + MULTITASK]:  # fixed scaling 1: exactly the plain LoRA
        from loramix.science.multitask_choice import chosen_multitask

        folder = chosen_multitask(paths, settings)[1]
        alone = XLoraModel(base, XLoraConfig(adapters={MULTITASK: str(folder)}, xlora_size=8))
        return evaluate(alone, tokenizer, test_sets, systems, **options)
    model = XLoraModel.from_pretrained(base, paths.xlora)
    if XLORA in systems:
        return evaluate(model, tokenizer, test_sets, systems, **options)
    experts = [s.removeprefix(EXPERT_PREFIX) for s in systems if s.startswith(EXPERT_PREFIX)]
    others = [s for s in systems if not s.startswith(EXPERT_PREFIX)]
    scores = evaluate(model, tokenizer, test_sets, others, **options).scores if others else {}
    scores |= score_experts_on_their_sets(model, tokenizer, test_sets, experts, options)
    return EvalReport(list(model.expert_names), test_sets, list(scores), scores)


def score_experts_on_their_sets(
    model: XLoraModel,
    tokenizer: PreTrainedTokenizerBase,
    test_sets: dict[str, str],
    experts: list[str],
    options: dict[str, Any],
) -> dict[str, dict[str, Score]]:
    """ "expert:<d>" -> its scores on its own domain's set and the composite and mixed sets
    (the sets the targets compare it on), with `evaluate`'s keyword `options`."""
    from loramix.evaluation.runner import EXPERT_PREFIX, evaluate
    from loramix.science.pipeline import MIXED
    from loramix.science.registry import COMPOSITE

    scores = {}
    for expert in experts:
        system = EXPERT_PREFIX + expert
        subset = {k: v for k, v in test_sets.items() if k in (expert, COMPOSITE, MIXED)}
        if subset:
            found = evaluate(model, tokenizer, subset, [system], **options)
            scores[system] = found.scores[system]
    return scores
