"""Reasoning tasks: orderings, who-is-where and ordering design, solved and checked by z3."""

from __future__ import annotations

import random

import pytest

pytest.importorskip("z3", reason="science extra not installed: pip install 'loramix[science]'")

from loramix.science import reasoning  # noqa: E402
from loramix.science.registry import get_task  # noqa: E402

PEOPLE = ["Ann", "Ben", "Cal", "Dan"]


def _example(task: str, answer):
    return {"domain": "reasoning", "task": task, "answer": answer}


def test_solver_cross_checks():
    clues = [["at", "Dan", 3], ["next", "Ann", "Ben"], ["left", "Ben", "Cal"]]
    assert reasoning.solve_order(PEOPLE, clues) == [["Ann", "Ben", "Cal", "Dan"]]
    assert len(reasoning.solve_order(PEOPLE, [])) == 24  # every permutation
    assert reasoning.satisfies(PEOPLE, clues, ["Ann", "Ben", "Cal", "Dan"])
    assert not reasoning.satisfies(PEOPLE, clues, ["Ben", "Ann", "Cal", "Dan"])
    assert not reasoning.satisfies(PEOPLE, clues, ["Ann", "Ben", "Cal"])  # someone missing
    cities = ["Rome", "Paris", "London"]
    found = reasoning.solve_cities(
        PEOPLE[:3], cities, [["in", "Cal", "Rome"], ["not_in", "Ann", "Paris"]]
    )
    assert found == [{"Ann": "London", "Ben": "Paris", "Cal": "Rome"}]


@pytest.mark.parametrize("task", reasoning.TASKS, ids=lambda t: t.name)
def test_ground_truth_verifies_and_garbage_does_not(task):
    rng = random.Random(0)
    for _ in range(15):
        example = task.sample(rng)
        assert example["prompt"].endswith("?")
        assert task.verify(example, example["completion"]), example
        assert not task.verify(example, "I do not know")


def test_puzzles_have_exactly_one_solution_by_z3():
    rng = random.Random(1)
    task = get_task("reasoning", "ordering")
    for _ in range(10):
        answer = task.sample(rng)["answer"]
        assert reasoning.solve_order(answer["people"], answer["clues"]) == [answer["order"]]
    task = get_task("reasoning", "where")
    for _ in range(10):
        answer = task.sample(rng)["answer"]
        found = reasoning.solve_cities(answer["people"], answer["cities"], answer["clues"])
        assert {f[answer["person"]] for f in found} == {answer["city"]}


def test_ordering_and_where_are_exact():
    clues = [["at", "Dan", 3], ["next", "Ann", "Ben"], ["left", "Ben", "Cal"]]
    answer = {"people": PEOPLE, "clues": clues, "order": ["Ann", "Ben", "Cal", "Dan"]}
    task = get_task("reasoning", "ordering")
    assert task.verify(_example("ordering", answer), "Ann Ben Cal Dan")
    assert task.verify(_example("ordering", answer), "Ann, Ben, Cal, Dan.")
    assert not task.verify(_example("ordering", answer), "Ann Ben Dan Cal")
    assert not task.verify(_example("ordering", answer), "Ann Ben Cal")
    where = get_task("reasoning", "where")
    assert where.verify(_example("where", {"city": "London"}), "London, I think")
    assert not where.verify(_example("where", {"city": "London"}), "Paris")


def test_design_order_accepts_any_consistent_order():
    task = get_task("reasoning", "design_order")
    answer = {"people": PEOPLE[:3], "clues": [["left", "Cal", "Ann"]], "example": []}
    example = _example("design_order", answer)
    assert task.verify(example, "Cal Ann Ben")
    assert task.verify(example, "Ben Cal Ann")
    assert not task.verify(example, "Ann Cal Ben")  # breaks the clue
    assert not task.verify(example, "Cal Ann Ann")  # not a permutation
    assert not task.verify(example, "Cal Ann Ben Dan")  # someone extra


def test_same_seed_same_examples():
    for task in reasoning.TASKS:
        first = [task.sample(random.Random(3)) for _ in range(3)]
        assert first == [task.sample(random.Random(3)) for _ in range(3)]
