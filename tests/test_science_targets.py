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
    # composite 2.3 beats both experts (the uniform average is not a rival there).
    assert status == {"bio": "pass", "chem": "fail", "mixed": "fail", "composite": "pass"}
    mixed = next(c for c in checks if c.target.startswith("mixed"))
    assert "uniform 1.600" in mixed.detail


def test_targets_missing_systems_or_sets_are_reported_not_passed() -> None:
    numbers = {k: v for k, v in NUMBERS.items() if k != "uniform"}
    checks = check_targets(crafted_report(numbers), {"bio": "bio", "phys": "chem"})
    status = {check.target.split(":")[0]: check.status for check in checks}
    assert status == {"bio": "pass", "phys": "missing", "mixed": "missing", "composite": "pass"}
    assert not any(c.passed for c in checks if c.status == "missing")
