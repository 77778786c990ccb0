"""Task, require and close of loramix.science.task (no science extra needed)."""

from __future__ import annotations

import random

import pytest

from loramix.science.task import Task, close, require


def _gen(rng: random.Random) -> tuple[str, str, int]:
    n = rng.randint(1, 100)
    return f"What is {n} + 1?", str(n + 1), n + 1


def _check(answer: int, generated: str) -> bool:
    return int(generated) == answer  # raises on garbage


TASK = Task("toy", "add_one", _gen, _check)


def test_sample_fills_domain_task_and_is_seeded():
    a, b = TASK.sample(random.Random(3)), TASK.sample(random.Random(3))
    assert a == b
    assert set(a) == {"prompt", "completion", "domain", "task", "answer"}
    assert (a["domain"], a["task"]) == ("toy", "add_one")


def test_verify_is_false_on_garbage_instead_of_raising():
    example = TASK.sample(random.Random(0))
    assert TASK.verify(example, example["completion"])
    assert not TASK.verify(example, "not a number")


def test_require_names_the_extra():
    with pytest.raises(ImportError, match=r"loramix\[science\]"):
        require("loramix_no_such_module")


def test_close_uses_the_larger_tolerance():
    assert close(10.05, 10.0, abs_tol=0.1)
    assert close(101.0, 100.0, rel_tol=0.01)
    assert not close(10.2, 10.0, abs_tol=0.1, rel_tol=0.01)
