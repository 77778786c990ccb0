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
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loramix.science.pipeline import RetrainPaths, RetrainSettings

logger = logging.getLogger(__name__)

ACCURACY_PNG = "accuracy.png"


def evaluate_run(paths: RetrainPaths, settings: RetrainSettings) -> None:
    """Evaluate every system of the run on its test files; write eval.json/md and the PNGs."""
    from loramix.config import XLoraConfig
    from loramix.evaluation.plots import plot_accuracy, write_eval_plots
    from loramix.evaluation.runner import (
        BASE,
        EXPERT_PREFIX,
        UNIFORM,
        XLORA,
        XLORA_FROZEN,
        evaluate,
        load_test_set,
    )
    from loramix.model import XLoraModel
    from loramix.science.pipeline import MIXED, MULTITASK
    from loramix.science.registry import COMPOSITE
    from loramix.science.targets import check_targets, science_verifier
    from loramix.smollm2 import load_base_model

    base, tokenizer = load_base_model(settings.base)
    model = XLoraModel.from_pretrained(base, paths.xlora)
    test_sets = {name: str(path) for name, path in paths.test_sets(settings.domains).items()}
    options = dict(
        chat=False,
        verifier=science_verifier,
        limit=settings.eval_limit,
        max_new_tokens=settings.max_new_tokens,
        max_length=settings.max_length,
    )
    report = evaluate(model, tokenizer, test_sets, [BASE, UNIFORM, XLORA, XLORA_FROZEN], **options)
    for domain in settings.domains:  # each expert where the targets compare it
        own = EXPERT_PREFIX + domain
        subset = {k: v for k, v in test_sets.items() if k in (domain, COMPOSITE, MIXED)}
        report.add_system(own, evaluate(model, tokenizer, subset, [own], **options).scores[own])
    if settings.multitask:
        alone = XLoraModel(
            load_base_model(settings.base)[0],
            XLoraConfig(adapters={MULTITASK: str(paths.multitask)}, xlora_size=8),
        )
        system = EXPERT_PREFIX + MULTITASK  # fixed scaling 1: exactly the plain LoRA
        scores = evaluate(alone, tokenizer, test_sets, [system], **options).scores[system]
        report.add_system(MULTITASK, scores)
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
    samples = {
        name: load_test_set(path, tokenizer, chat=False, limit=1)[0].input_ids
        for name, path in test_sets.items()
        if name != MIXED
    }
    write_eval_plots(model, tokenizer, samples, paths.eval, usage=report.usage)
    plot_accuracy(report, paths.eval / ACCURACY_PNG)
