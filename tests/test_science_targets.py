"""loramix.science.targets: the case study's targets on crafted reports, the verifier."""

from __future__ import annotations

import dataclasses

import pytest
from helpers import NUMBERS, crafted_report

from loramix.evaluation.report import nll_difference_interval
from loramix.science.targets import check_targets, science_verifier


def test_science_verifier_uses_the_examples_task() -> None:
    import random

    from loramix.science import TASKS

    example = TASKS["biology"][0].sample(random.Random(0))
    assert science_verifier(example, example["completion"] + "\nextra")
    assert not science_verifier(example, "no idea")
    with pytest.raises(ValueError, match="exact-match verifier"):
        science_verifier({"prompt": "a", "completion": "b"}, "b")


def test_targets_pass_and_fail_on_crafted_numbers() -> None:
    checks = check_targets(crafted_report(NUMBERS), {"bio": "bio", "chem": "chem"})
    status = {check.target.split(":")[0]: check.status for check in checks}
    # bio +9% passes; chem +20% fails; mixed ties the uniform average (a tie does not beat);
    # composite 2.3 beats both experts but not the uniform average's 2.0.
    assert status == {"bio": "pass", "chem": "fail", "mixed": "fail", "composite": "fail"}
    mixed = next(c for c in checks if c.target.startswith("mixed"))
    assert "uniform 1.600" in mixed.detail


def test_targets_missing_systems_or_sets_are_reported_not_passed() -> None:
    numbers = {k: v for k, v in NUMBERS.items() if k != "uniform"}
    checks = check_targets(crafted_report(numbers), {"bio": "bio", "phys": "chem"})
    status = {check.target.split(":")[0]: check.status for check in checks}
    assert status == {
        "bio": "pass",
        "phys": "missing",
        "mixed": "missing",
        "composite": "missing",
    }
    assert not any(c.passed for c in checks if c.status == "missing")


def test_multitask_is_a_rival_on_mixed_and_reported_on_every_set() -> None:
    numbers = {
        **NUMBERS,
        "xlora": {"bio": 1.09, "chem": 1.05, "mixed": 1.5, "composite": 1.9},
        "multitask": {"bio": 1.00, "chem": 1.1, "mixed": 1.4, "composite": 2.2},
    }
    checks = check_targets(
        crafted_report(numbers), {"bio": "bio", "chem": "chem"}, multitask="multitask"
    )
    mixed = next(c for c in checks if c.target.startswith("mixed: X-LoRA NLL beats"))
    assert "multitask LoRA" in mixed.target and mixed.status == "fail"  # 1.5 vs 1.4
    assert "best rival multitask 1.400" in mixed.detail
    versus = {
        c.target.split(":")[0]: c.status for c in checks if "vs the multitask LoRA" in c.target
    }
    assert versus == {"bio": "fail", "chem": "pass", "mixed": "fail", "composite": "pass"}


def with_examples(report, system: str, test_set: str, nlls, tokens):
    """`report` with per-example values for one score (their ratio becomes its NLL)."""
    score = report.scores[system][test_set]
    report.scores[system][test_set] = dataclasses.replace(
        score,
        nll=sum(nlls) / sum(tokens),
        example_nlls=tuple(nlls),
        example_tokens=tuple(tokens),
    )


def test_target_details_add_the_paired_interval_where_examples_are_kept() -> None:
    report = crafted_report(NUMBERS)
    tokens = [4, 6, 5, 5]
    theirs = [1.0 * t for t in tokens]  # expert:bio, NLL 1.0 on every example
    with_examples(report, "expert:bio", "bio", theirs, tokens)
    with_examples(report, "xlora", "bio", [v * 1.05 for v in theirs], tokens)  # 5% above
    with_examples(report, "uniform", "mixed", [1.6 * t for t in tokens], tokens)
    with_examples(report, "xlora", "mixed", [1.5 * t for t in tokens], tokens)
    checks = {c.target.split(":")[0]: c for c in check_targets(report, {"bio": "bio"})}
    assert checks["bio"].detail == (
        "X-LoRA 1.050 vs 1.000 (+5.0%, paired 95% interval [+5.0%, +5.0%])"
    )
    assert checks["mixed"].status == "pass"
    assert checks["mixed"].detail.endswith(
        "uniform 1.600 (difference -0.100, paired 95% interval [-0.100, -0.100])"
    )
    assert "interval" not in checks["composite"].detail  # no per-example values there


def test_scores_of_other_examples_are_not_paired() -> None:
    report = crafted_report(NUMBERS)
    with_examples(report, "expert:bio", "bio", [4.0, 6.0], [4, 6])
    with_examples(report, "xlora", "bio", [4.4, 6.6], [5, 5])  # other token counts
    (check,) = [c for c in check_targets(report, {"bio": "bio"}) if c.target.startswith("bio")]
    assert "interval" not in check.detail
    assert (
        nll_difference_interval(report.score("xlora", "bio"), report.score("uniform", "bio"))
        is None
    )


def test_a_rival_with_zero_nll_in_a_resample_leaves_the_relative_interval_out() -> None:
    report = crafted_report(NUMBERS)
    with_examples(report, "expert:bio", "bio", [0.0, 3.0], [2, 2])  # a resample of [0, 0]
    with_examples(report, "xlora", "bio", [1.0, 2.0], [2, 2])
    (check,) = [c for c in check_targets(report, {"bio": "bio"}) if c.target.startswith("bio")]
    assert check.status == "pass" and "interval" not in check.detail  # no crash, no interval
