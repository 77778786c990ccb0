"""loramix.checks: numbers that are not bools, one error listing every problem."""

from __future__ import annotations

import math

import pytest

from loramix.checks import is_finite, is_int, is_number, raise_problems


def test_bools_are_not_numbers() -> None:
    assert is_int(3) and not is_int(True) and not is_int(3.0)
    assert is_number(3) and is_number(2.5) and not is_number(False) and not is_number("1")
    assert is_finite(1e9) and not is_finite(math.inf) and not is_finite(math.nan)
    assert not is_finite(True)


def test_every_problem_is_listed_in_one_error() -> None:
    raise_problems("Invalid Thing", [])  # nothing to report
    with pytest.raises(ValueError) as error:
        raise_problems("Invalid Thing", ["a=1: use 2.", "b=x: use a number."])
    assert str(error.value) == "Invalid Thing:\n  a=1: use 2.\n  b=x: use a number."
