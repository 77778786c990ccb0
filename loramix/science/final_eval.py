"""The retrain's final report: every system on the test files, opened here and nowhere else.

Systems, rows of `OUT/eval/eval.md` (NLL and verified accuracy, each with a 95% bootstrap
interval):

    base            SmolLM2 without adapters
    expert:<d>      each domain's expert alone, on its own domain, the mixed and the
                    composite set (the sets the targets compare it on)
    uniform         the plain average of the experts
    multitask       one LoRA trained on the union of the training files, with as many
                    trainable parameters and training examples as the experts together
                    (`loramix.science.pipeline`), evaluated as the only expert of an X-LoRA
                    model with its scaling fixed to 1 (which equals plain LoRA)
    xlora           the chosen gate's per-token, per-layer mixture ("granular")
    xlora-frozen    the same, scalings frozen per example to their mean over the prompt

Then the targets (`loramix.science.targets.check_targets`, with the multitask LoRA as a
rival on every set, win or lose) and the pictures: scalings per layer and per token for one
example of each domain and of the composite set, expert usage per test set for every
expert, and the accuracy table as a chart.

Gate settings were chosen on the dev files before this step (`loramix.science.selection`);
nothing here feeds back into training.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from loramix.evaluation.report import EvalReport, Score
    from loramix.model import XLoraModel
    from loramix.science.pipeline import RetrainPaths, RetrainSettings

logger = logging.getLogger(__name__)

ACCURACY_PNG = "accuracy.png"
MIXTURE_PART = "mixture"  # the part of the evaluation that scores the X-LoRA systems


def evaluate_run(paths: RetrainPaths, settings: RetrainSettings) -> None:
    """Evaluate every system of the run on its test files; write eval.json/md and the PNGs.

    The systems are scored in parts (`evaluation_parts`), side by side in up to
    `settings.workers` processes, and gathered into one report.
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
    from loramix.science.pipeline import MIXED, MULTITASK, worker_plan
    from loramix.science.registry import COMPOSITE
    from loramix.science.targets import check_targets
    from loramix.smollm2 import load_base_model
    from loramix.training.jobs import run_jobs

    test_sets = {name: str(path) for name, path in paths.test_sets(settings.domains).items()}
    parts = evaluation_parts(settings)
    jobs = {name: (paths, settings, systems) for name, systems in parts.items()}
    workers, threads = worker_plan(settings, len(jobs))
    logger.info("evaluation: %d part(s), %d at a time", len(jobs), workers)
    done = {
        d.name: d.value for d in run_jobs(_evaluate_part, jobs, workers=workers, threads=threads)
    }
    report = done[MIXTURE_PART]  # the X-LoRA systems, with the expert usage
    for name in parts:
        if name != MIXTURE_PART:
            for system, scores in done[name].items():
                report.add_system(
                    MULTITASK if system == EXPERT_PREFIX + MULTITASK else system, scores
                )
    order = [BASE, *(EXPERT_PREFIX + d for d in settings.domains), UNIFORM, MULTITASK]
    report.systems = [s for s in order if s in report.systems] + [XLORA, XLORA_FROZEN]
    report.settings["systems_on_subsets"] = "expert:<d> on <d>, composite and mixed only"
    if settings.multitask:  # what the mixture buys: add a domain vs retrain the baseline
        from loramix.science.add_domain import add_domain_cost
        from loramix.science.pipeline import TIMINGS_JSON, read_json

        try:
            cost = add_domain_cost(read_json(paths.out / TIMINGS_JSON), settings)
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
    report.write(paths.eval, checks)
    logger.info("evaluation:\n%s", report.table())
    for check in checks:
        logger.info("target %s", check.line())
    base, tokenizer = load_base_model(settings.base)
    model = XLoraModel.from_pretrained(base, paths.xlora)
    samples = {
        name: load_test_set(path, tokenizer, chat=False, limit=1)[0].input_ids
        for name, path in test_sets.items()
        if name != MIXED
    }
    write_eval_plots(model, tokenizer, samples, paths.eval, usage=report.usage)
    plot_accuracy(report, paths.eval / ACCURACY_PNG)


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
) -> EvalReport | dict[str, dict[str, Score]]:
    """Score `systems` on their test sets (a job of `evaluate_run`).

    Returns:
        The report of the X-LoRA systems (the frame of the whole report: experts, test
        sets, usage) for the mixture part; system -> test set -> score for the others.
    """
    from loramix.config import XLoraConfig
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
        alone = XLoraModel(
            base, XLoraConfig(adapters={MULTITASK: str(paths.multitask)}, xlora_size=8)
        )
        return evaluate(alone, tokenizer, test_sets, systems, **options).scores
    model = XLoraModel.from_pretrained(base, paths.xlora)
    if XLORA in systems:
        return evaluate(model, tokenizer, test_sets, systems, **options)
    experts = [s.removeprefix(EXPERT_PREFIX) for s in systems if s.startswith(EXPERT_PREFIX)]
    others = [s for s in systems if not s.startswith(EXPERT_PREFIX)]
    scores = evaluate(model, tokenizer, test_sets, others, **options).scores if others else {}
    return {**scores, **score_experts_on_their_sets(model, tokenizer, test_sets, experts, options)}


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
