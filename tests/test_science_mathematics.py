"""Mathematics tasks: derivatives, linear equations, expansion and quadratic design (SymPy)."""

from __future__ import annotations

import random

import pytest

pytest.importorskip("sympy", reason="science extra not installed: pip install 'loramix[science]'")

from loramix.science import mathematics  # noqa: E402
from loramix.science.registry import get_task  # noqa: E402


def _example(task: str, answer):
    return {"domain": "mathematics", "task": task, "answer": answer}


def test_library_cross_checks():
    x = mathematics.symbol()
    assert mathematics.to_text(3 * x**2 - 5) == "3*x^2 - 5"
    assert mathematics.parse_expression("6*x - 5 is the answer") == 6 * x - 5
    assert mathematics.parse_expression("2x^2") == 2 * x**2  # implicit product
    assert mathematics.equal(mathematics.parse_expression("(x+1)^2"), x**2 + 2 * x + 1)


@pytest.mark.parametrize("task", mathematics.TASKS, ids=lambda t: t.name)
def test_ground_truth_verifies_and_garbage_does_not(task):
    rng = random.Random(0)
    for _ in range(20):
        example = task.sample(rng)
        assert example["prompt"].endswith("?")
        assert "**" not in example["prompt"] + example["completion"]  # ^ powers, as printed
        assert task.verify(example, example["completion"]), example
        assert not task.verify(example, "I do not know")
        assert not task.verify(example, "__import__('os')")  # never reaches the parser


def test_derivative_accepts_equal_forms_and_rejects_wrong_ones():
    task = get_task("mathematics", "derivative")
    example = _example("derivative", "6*x - 5")
    assert task.verify(example, "6*x - 5")
    assert task.verify(example, "-5 + 6x")
    assert not task.verify(example, "6*x + 5")
    assert not task.verify(example, "3*x^2 - 5*x")  # the antiderivative


def test_solve_linear_is_exact():
    task = get_task("mathematics", "solve_linear")
    example = _example("solve_linear", "-7/2")
    assert task.verify(example, "-7/2")
    assert task.verify(example, "-3.5")
    assert not task.verify(example, "-3")
    assert not task.verify(example, "x")  # not a number


def test_expand_requires_the_expanded_form():
    task = get_task("mathematics", "expand")
    example = _example("expand", "2*x^2 + x - 6")
    assert task.verify(example, "2*x^2 + x - 6")
    assert task.verify(example, "x + 2*x^2 - 6")
    assert not task.verify(example, "(x + 2)*(2*x - 3)")  # equal, but not expanded
    assert not task.verify(example, "2*x^2 - x - 6")


def test_design_quadratic_accepts_any_quadratic_with_those_roots():
    task = get_task("mathematics", "design_quadratic")
    example = _example("design_quadratic", {"roots": [-3, 2], "example": "x^2 + x - 6"})
    assert task.verify(example, "x^2 + x - 6")
    assert task.verify(example, "2*x^2 + 2*x - 12")
    assert not task.verify(example, "x^2 - x - 6")  # roots 3 and -2
    assert not task.verify(example, "x^3 + x^2 - 6*x")  # roots -3, 0, 2: not a quadratic
    assert not task.verify(example, "x^2/2 + x/2 - 3")  # not integer coefficients


def test_same_seed_same_examples():
    for task in mathematics.TASKS:
        first = [task.sample(random.Random(7)) for _ in range(3)]
        assert first == [task.sample(random.Random(7)) for _ in range(3)]
