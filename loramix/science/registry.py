"""All science tasks by domain, and `verify`, which judges generated text for any example."""

from __future__ import annotations

from loramix.science import (
    bioinspired,
    biology,
    chemistry,
    composite,
    mathematics,
    mechanics,
    proteins,
    quantum,
    reasoning,
)
from loramix.science.task import Example, Task

DOMAINS: tuple[str, ...] = (
    "biology",
    "chemistry",
    "proteins",
    "mechanics",
    "quantum",
    "mathematics",
    "reasoning",
    "bioinspired",
)
"""The expert domains, in a fixed order; each gets its own training data."""

COMPOSITE = composite.DOMAIN

TASKS: dict[str, tuple[Task, ...]] = {
    biology.DOMAIN: biology.TASKS,
    chemistry.DOMAIN: chemistry.TASKS,
    proteins.DOMAIN: proteins.TASKS,
    mechanics.DOMAIN: mechanics.TASKS,
    quantum.DOMAIN: quantum.TASKS,
    mathematics.DOMAIN: mathematics.TASKS,
    reasoning.DOMAIN: reasoning.TASKS,
    bioinspired.DOMAIN: bioinspired.TASKS,
    composite.DOMAIN: composite.TASKS,
}
"""Domain -> its tasks; "composite" holds the held-out cross-domain questions."""


def get_task(domain: str, name: str) -> Task:
    """The task called `name` in `domain`.

    Raises:
        KeyError: If there is no such task; the message lists the known ones.
    """
    for task in TASKS.get(domain, ()):
        if task.name == name:
            return task
    known = ", ".join(f"{t.domain}/{t.name}" for tasks in TASKS.values() for t in tasks)
    raise KeyError(f"no science task {domain}/{name}; known tasks: {known}")


def verify(example: Example, generated: str) -> bool:
    """Whether `generated` (a model's continuation of `example["prompt"]`) answers correctly.

    Symbolic answers must match exactly, numbers within the task's tolerance, and designs must
    pass the library's re-check (any valid design counts). Only the first line is read.
    """
    return get_task(example["domain"], example["task"]).verify(example, generated)
