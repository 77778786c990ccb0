"""Bio-inspired materials: Gibson-Ashby foams, rule of mixtures, nacre, checked with pint."""

from __future__ import annotations

import random

import pytest

pytest.importorskip("pint", reason="science extra not installed: pip install 'loramix[science]'")

from loramix.science import bioinspired  # noqa: E402
from loramix.science.registry import get_task  # noqa: E402


def _example(task: str, answer):
    return {"domain": "bioinspired", "task": task, "answer": answer}


def test_library_cross_checks():
    # hand-computed: 2 GPa * 0.1^2 = 20 MPa; 0.3 * 300 MPa * 0.2^1.5 = 8.05 MPa
    assert bioinspired.foam_modulus_mpa(0.1, 2) == pytest.approx(20.0)
    assert bioinspired.foam_strength_mpa(0.2, 300) == pytest.approx(8.0498, rel=1e-4)
    assert bioinspired.mixture_modulus_gpa(40, 200, 3) == pytest.approx(81.8)
    # Gao et al.: 1/E = 4(1-f)/(G f^2 s^2) + 1/(f E_m), f=0.9, s=10, G=1, E_m=100
    expected = 1 / (4 * 0.1 / (1 * 0.81 * 100) + 1 / 90)
    assert bioinspired.nacre_modulus_gpa(90, 10, 100, 1) == pytest.approx(expected)


@pytest.mark.parametrize("task", bioinspired.TASKS, ids=lambda t: t.name)
def test_ground_truth_verifies_and_garbage_does_not(task):
    rng = random.Random(0)
    for _ in range(20):
        example = task.sample(rng)
        assert example["prompt"].endswith("?")
        assert task.verify(example, example["completion"]), example
        assert not task.verify(example, "I do not know")


def test_forward_answers_are_read_within_one_percent():
    task = get_task("bioinspired", "foam_modulus")
    example = _example("foam_modulus", 20.0)
    assert task.verify(example, "20.0")
    assert task.verify(example, "20.1 MPa")
    assert not task.verify(example, "21")
    assert not task.verify(example, "0.02")  # GPa, not MPa


def test_design_density_accepts_any_density_in_range():
    task = get_task("bioinspired", "design_density")
    example = _example("design_density", {"solid_gpa": 2, "low_mpa": 10, "high_mpa": 30})
    assert task.verify(example, "0.1")  # 20 MPa
    assert task.verify(example, "0.12")  # 28.8 MPa
    assert not task.verify(example, "0.05")  # 5 MPa
    assert not task.verify(example, "1.5")  # not a relative density


def test_design_fraction_accepts_any_fraction_in_range():
    task = get_task("bioinspired", "design_fraction")
    answer = {"fibre_gpa": 200, "matrix_gpa": 3, "low_gpa": 50, "high_gpa": 65}
    example = _example("design_fraction", answer)
    assert task.verify(example, "30")  # 62.1 GPa
    assert task.verify(example, "25")  # 52.25 GPa
    assert not task.verify(example, "40")  # 81.8 GPa
    assert not task.verify(example, "130")


def test_same_seed_same_examples():
    for task in bioinspired.TASKS:
        first = [task.sample(random.Random(5)) for _ in range(3)]
        assert first == [task.sample(random.Random(5)) for _ in range(3)]
