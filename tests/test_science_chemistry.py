"""Chemistry tasks: molar mass, atom count and formula design, cross-checked with periodictable."""

from __future__ import annotations

import random

import pytest

pytest.importorskip(
    "periodictable", reason="science extra not installed: pip install 'loramix[science]'"
)

from loramix.science import chemistry  # noqa: E402
from loramix.science.registry import get_task  # noqa: E402


def test_library_cross_checks():
    assert chemistry.molar_mass({"H": 2, "O": 1}) == pytest.approx(18.015, abs=0.001)
    assert chemistry.molar_mass({"C": 6, "H": 12, "O": 6}) == pytest.approx(180.156, abs=0.01)
    assert chemistry.atom_count({"C": 2, "H": 6, "O": 1}) == 9
    assert list(chemistry.hill_order({"O": 1, "Cl": 1, "H": 5, "C": 2})) == ["C", "H", "Cl", "O"]


@pytest.mark.parametrize("task", chemistry.TASKS, ids=lambda t: t.name)
def test_ground_truth_verifies_and_garbage_does_not(task):
    rng = random.Random(0)
    for _ in range(20):
        example = task.sample(rng)
        assert example["prompt"].endswith("?")
        assert task.verify(example, example["completion"]), example
        assert not task.verify(example, "I do not know")


def test_molar_mass_tolerance_is_one_decimal():
    task = get_task("chemistry", "molar_mass")
    example = {"domain": "chemistry", "task": "molar_mass", "answer": 46.069}
    assert task.verify(example, "46.1")
    assert task.verify(example, "46.07 g/mol")
    assert not task.verify(example, "46.2")
    assert not task.verify(example, "44.1")


def test_atom_count_is_exact():
    task = get_task("chemistry", "atom_count")
    example = {"domain": "chemistry", "task": "atom_count", "answer": 9}
    assert task.verify(example, "9")
    assert not task.verify(example, "8")
    assert not task.verify(example, "9.5")


def test_design_formula_accepts_any_valid_design():
    task = get_task("chemistry", "design_formula")
    answer = {"elements": ["C", "H", "O"], "low": 40, "high": 50}
    example = {"domain": "chemistry", "task": "design_formula", "answer": answer}
    assert task.verify(example, "C2 H6 O")  # ethanol, 46.07
    assert task.verify(example, "C H4 O2")  # another formula, 48.04
    assert not task.verify(example, "C3 H8 O")  # 60.1: out of range
    assert not task.verify(example, "C2 H6")  # 30.1, and no O
    assert not task.verify(example, "C2 H4 N")  # N is not allowed
    assert not task.verify(example, "C2 H6 Xx")  # not an element
