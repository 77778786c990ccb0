"""The science case study's targets and its verifier, checked on an evaluation report.

`check_targets` states what the case study claims of an X-LoRA model, by NLL on held-out
data (`loramix.evaluation.report.EvalReport`); `science_verifier` judges a greedy answer with
the task that wrote the question (`loramix.science.registry.verify`). `loramix eval
--verifier science`, `loramix science demo` and the retrain pipeline use both.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from loramix.evaluation.report import EvalReport, TargetCheck, nll_difference_interval
from loramix.evaluation.runner import EXPERT_PREFIX, UNIFORM, XLORA
from loramix.science.registry import verify


def science_verifier(example: Mapping[str, Any], generated: str) -> bool:
    """`loramix.science.verify`: the example's own task re-checks the answer.

    Raises:
        ValueError: If the record lacks the "domain" and "task" keys that science data has.
    """
    missing = [key for key in ("domain", "task", "answer") if key not in example]
    if missing:
        raise ValueError(
            f"the science verifier needs the keys domain, task and answer, but a record lacks "
            f"{', '.join(missing)}; use records written by `loramix.science.write_datasets`, "
            "or the exact-match verifier"
        )
    return verify(example, generated)  # type: ignore[arg-type]


def check_targets(
    report: EvalReport,
    domain_experts: Mapping[str, str],
    *,
    mixed: str | None = "mixed",
    composite: str | None = "composite",
    tolerance: float = 0.10,
    multitask: str | None = None,
) -> list[TargetCheck]:
    """The science case study's targets, by NLL on held-out data (README, "The science case study").

    - every domain: X-LoRA's NLL <= (1 + tolerance) * that domain's own expert's NLL;
    - the mixed set: X-LoRA's NLL is below every single expert's, the uniform average's and
      the multitask LoRA's (if `multitask` names it);
    - the composite set: X-LoRA's NLL is below every single expert's and the uniform
      average's;
    - with `multitask`, on every test set: X-LoRA against the multitask LoRA, reported as
      "pass" (X-LoRA's NLL lower) or "fail", win or lose.

    A tie does not beat. A target whose system or test set the report lacks is "missing".
    Each verdict goes by the two NLLs; its detail adds the paired 95% bootstrap interval of
    the difference (relative, for the domains) where the report keeps per-example values:
    an interval that holds 0 (or the 10%) says that these test examples cannot tell the two
    apart.

    Args:
        domain_experts: Test set name of a domain -> the name of that domain's expert.
        mixed: The mixed test set's name; None skips that target.
        composite: The composite test set's name; None skips that target.
        tolerance: The allowed relative excess of X-LoRA's NLL on a domain.
        multitask: The multitask LoRA's system name; None leaves it out.
    """
    checks = []
    for domain, expert in domain_experts.items():
        own = EXPERT_PREFIX + expert
        target = f"{domain}: X-LoRA NLL within {tolerance:.0%} of {own}"
        missing = _missing(report, [XLORA, own], domain)
        if missing:
            checks.append(TargetCheck(target, "missing", missing))
            continue
        ours, theirs = report.score(XLORA, domain).nll, report.score(own, domain).nll
        excess = ours / theirs - 1 if theirs > 0 else math.inf
        interval = _paired(report, own, domain, relative=True) if theirs > 0 else ""
        checks.append(
            TargetCheck(
                target,
                "pass" if ours <= (1 + tolerance) * theirs else "fail",
                f"X-LoRA {ours:.3f} vs {theirs:.3f} ({excess:+.1%}{interval})",
            )
        )
    experts = [EXPERT_PREFIX + name for name in report.expert_names]
    mixed_rivals = [*experts, UNIFORM] + ([multitask] if multitask else [])
    for name, rivals, what in (
        (
            mixed,
            mixed_rivals,
            "every single expert, the uniform average"
            + (" and the multitask LoRA" if multitask else ""),
        ),
        (composite, [*experts, UNIFORM], "every single expert and the uniform average"),
    ):
        if name is None:
            continue
        target = f"{name}: X-LoRA NLL beats {what}"
        missing = _missing(report, [XLORA, *rivals], name)
        if missing:
            checks.append(TargetCheck(target, "missing", missing))
            continue
        ours = report.score(XLORA, name).nll
        best = min(rivals, key=lambda s: report.score(s, name).nll)
        theirs = report.score(best, name).nll
        checks.append(
            TargetCheck(
                target,
                "pass" if ours < theirs else "fail",
                f"X-LoRA {ours:.3f} vs best rival {best} {theirs:.3f}"
                + _difference(report, best, name),
            )
        )
    if multitask is not None:
        for name in report.test_sets:
            target = f"{name}: X-LoRA NLL vs the multitask LoRA (reported, win or lose)"
            missing = _missing(report, [XLORA, multitask], name)
            if missing:
                checks.append(TargetCheck(target, "missing", missing))
                continue
            ours, theirs = report.score(XLORA, name).nll, report.score(multitask, name).nll
            checks.append(
                TargetCheck(
                    target,
                    "pass" if ours < theirs else "fail",
                    f"X-LoRA {ours:.3f} vs multitask {theirs:.3f}"
                    + _difference(report, multitask, name),
                )
            )
    return checks


def _difference(report: EvalReport, rival: str, test_set: str) -> str:
    """ " (difference -0.013, paired 95% interval [-0.031, +0.004])", or "" (see `_paired`)."""
    ours, theirs = report.score(XLORA, test_set).nll, report.score(rival, test_set).nll
    interval = _paired(report, rival, test_set, relative=False)
    return f" (difference {ours - theirs:+.3f}{interval})" if interval else ""


def _paired(report: EvalReport, rival: str, test_set: str, *, relative: bool) -> str:
    """ ", paired 95% interval [a, b]" of X-LoRA's NLL against `rival`'s on `test_set` (as a
    share with `relative`), or "" when the scores cannot be paired (a report without
    per-example values, or other examples) or the rival's NLL is 0 in a resample."""
    try:
        interval = nll_difference_interval(
            report.score(XLORA, test_set), report.score(rival, test_set), relative=relative
        )
    except ValueError:  # a resample where the rival's NLL is 0: no relative interval
        interval = None
    if interval is None:
        return ""
    low, high = (f"{v:+.1%}" if relative else f"{v:+.3f}" for v in interval)
    return f", paired 95% interval [{low}, {high}]"


def _missing(report: EvalReport, systems: Sequence[str], test_set: str) -> str:
    if test_set not in report.test_sets:
        return f"no test set named {test_set!r} was evaluated"
    absent = [s for s in systems if test_set not in report.scores.get(s, {})]
    return f"not evaluated: {', '.join(absent)}" if absent else ""
