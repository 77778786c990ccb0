"""The checks every settings object shares: numbers that are not bools, one joined error.

Settings are validated by collecting every problem ("name=value: the fix") and raising one
`ValueError` that lists them all (litgpt and safetensors do the same):

    problems = []
    if not is_int(rank) or rank < 1:
        problems.append(f"rank={rank!r}: use a whole number >= 1, e.g. 8.")
    raise_problems("Invalid LoraSettings", problems)
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def is_int(value: object) -> bool:
    """An `int` that is not a `bool` (`True` is an int to Python, not to a setting)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """An `int` or `float` that is not a `bool`."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_finite(value: object) -> bool:
    """A number (see `is_number`) that is neither infinite nor NaN."""
    return is_number(value) and math.isfinite(value)  # type: ignore[arg-type]


def raise_problems(what: str, problems: Sequence[str]) -> None:
    """Raises `ValueError("<what>:\\n  <problem>\\n  ...")` if there is any problem.

    Args:
        what: What was checked, e.g. "Invalid TrainingConfig".
        problems: One "name=value: fix" line each; empty raises nothing.
    """
    if problems:
        raise ValueError(f"{what}:\n  " + "\n  ".join(problems))
