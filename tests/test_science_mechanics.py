"""Mechanics tasks: stress, Hooke's law, unit conversion and area design, checked with pint."""

from __future__ import annotations

import random

import pytest

pytest.importorskip("pint", reason="science extra not installed: pip install 'loramix[science]'")

from loramix.science import mechanics  # noqa: E402
from loramix.science.registry import get_task  # noqa: E402


def test_library_cross_checks():
    assert mechanics.stress_mpa(12, 40) == pytest.approx(300.0)
    assert mechanics.hooke_stress_mpa(200, 0.15) == pytest.approx(300.0)
    assert mechanics.convert(2.5, "kN", "N") == pytest.approx(2500.0)
    assert mechanics.convert(350, "mm", "m") == pytest.approx(0.35)


@pytest.mark.parametrize("task", mechanics.TASKS, ids=lambda t: t.name)
def test_ground_truth_verifies_and_garbage_does_not(task):
    rng = random.Random(0)
    for _ in range(20):
        example = task.sample(rng)
        assert example["prompt"].endswith("?")
        assert task.verify(example, example["completion"]), example
        assert not task.verify(example, "I do not know")


def test_stress_tolerance_is_one_percent():
    task = get_task("mechanics", "stress")
    example = {"domain": "mechanics", "task": "stress", "answer": 300.0}
    assert task.verify(example, "300.0")
    assert task.verify(example, "302 MPa")
    assert not task.verify(example, "310.0")


def test_convert_is_exact():
    task = get_task("mechanics", "convert")
    example = {"domain": "mechanics", "task": "convert", "answer": {"value": 2500.0, "unit": "N"}}
    assert task.verify(example, "2500")
    assert not task.verify(example, "250")


def test_design_area_accepts_any_valid_design():
    task = get_task("mechanics", "design_area")
    answer = {"force_kn": 12, "low_mpa": 40, "high_mpa": 60}
    example = {"domain": "mechanics", "task": "design_area", "answer": answer}
    assert task.verify(example, "240")  # 50 MPa
    assert task.verify(example, "290")  # 41.4 MPa, another valid area
    assert not task.verify(example, "100")  # 120 MPa
    assert not task.verify(example, "0")
