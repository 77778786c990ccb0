"""loramix.science.targets: the case study's targets on crafted reports, the verifier."""

from __future__ import annotations

import pytest
from helpers import NUMBERS, crafted_report

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
