"""95% bootstrap confidence intervals of the evaluation's per-set numbers.

Both numbers of a system on a test set are ratios of sums over the set's examples:

    NLL       sum of the examples' completion-token NLLs / sum of their completion tokens
    accuracy  verified answers / examples

`ratio_interval` resamples the examples with replacement (the percentile bootstrap: draw
`n_resamples` sets of the same size, recompute the ratio on each, take the 2.5th and 97.5th
percentiles), with a fixed seed, so the same numbers always give the same interval.
Resampling whole examples keeps each example's tokens together, as they are not independent.

`paired_interval` compares two systems scored on the same examples: each resample draws one
set of examples and recomputes both ratios on it, so the interval of their difference (or of
their relative difference) leaves out what the two share, the examples' own difficulty. It is
much narrower than the two systems' own intervals suggest when they overlap, and it is the one
that says whether one system beats the other on these examples.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

N_RESAMPLES = 2000
LEVEL = 0.95


def ratio_interval(
    numerators: Sequence[float],
    denominators: Sequence[float] | None = None,
    *,
    n_resamples: int = N_RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
) -> tuple[float, float]:
    """The percentile bootstrap interval of sum(numerators) / sum(denominators).

    Args:
        numerators: One value per example (its NLL sum, or 1.0 / 0.0 for a verified answer).
        denominators: One value per example (its token count); None counts each example once.
        n_resamples: Bootstrap resamples.
        level: Coverage of the interval, e.g. 0.95.
        seed: Seed of the resampling.

    Returns:
        (low, high).

    Raises:
        ValueError: On empty or mismatched inputs, a bad level or resample count.
    """
    values, weights = _checked(numerators, denominators)
    _check_resampling(level, n_resamples)
    picks = _picks(values.size, n_resamples, seed)  # (R, N)
    ratios = values[picks].sum(axis=1) / weights[picks].sum(axis=1)  # (R,)
    return _percentiles(ratios, level)


def paired_interval(
    ours: tuple[Sequence[float], Sequence[float]],
    theirs: tuple[Sequence[float], Sequence[float]],
    *,
    relative: bool = False,
    n_resamples: int = N_RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
) -> tuple[float, float]:
    """The percentile bootstrap interval of ratio(ours) - ratio(theirs), both ratios computed
    on the same resampled examples (see the module docstring).

    Args:
        ours: (numerators, denominators) per example, as for `ratio_interval`.
        theirs: The same for the other system, on the same examples in the same order.
        relative: Give the interval of ratio(ours) / ratio(theirs) - 1 instead.
        n_resamples, level, seed: As for `ratio_interval`.

    Returns:
        (low, high).

    Raises:
        ValueError: On empty or mismatched inputs (the two systems must cover the same
            number of examples), a bad level or resample count, or (with `relative`) a
            resample where ratio(theirs) is 0.
    """
    our_values, our_weights = _checked(*ours, what="ours: ")
    their_values, their_weights = _checked(*theirs, what="theirs: ")
    if our_values.size != their_values.size:
        raise ValueError(
            f"cannot bootstrap a paired difference: {our_values.size} examples against "
            f"{their_values.size}; score both systems on the same examples"
        )
    _check_resampling(level, n_resamples)
    picks = _picks(our_values.size, n_resamples, seed)  # (R, N)
    our_ratios = our_values[picks].sum(axis=1) / our_weights[picks].sum(axis=1)  # (R,)
    their_ratios = their_values[picks].sum(axis=1) / their_weights[picks].sum(axis=1)  # (R,)
    if relative:
        if not (their_ratios > 0).all():
            raise ValueError("cannot bootstrap a relative difference: theirs is 0 in a resample")
        return _percentiles(our_ratios / their_ratios - 1, level)
    return _percentiles(our_ratios - their_ratios, level)


def _checked(
    numerators: Sequence[float], denominators: Sequence[float] | None, what: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    """The values `(N,)` and their weights `(N,)` (ones without `denominators`)."""
    values = np.asarray(numerators, dtype=np.float64)  # (N,)
    weights = np.ones_like(values) if denominators is None else np.asarray(denominators, float)
    problem = None
    if values.ndim != 1 or values.size == 0:
        problem = f"numerators: give one value per example (got shape {values.shape})"
    elif weights.shape != values.shape:
        problem = (
            f"denominators: {weights.shape[0] if weights.ndim else 0} values for "
            f"{values.size} numerators; give one per example"
        )
    elif not (weights > 0).all():
        problem = "denominators: every example needs a positive count"
    if problem:
        raise ValueError(f"cannot bootstrap: {what}{problem}")
    return values, weights


def _check_resampling(level: float, n_resamples: int) -> None:
    problems = []
    if not 0 < level < 1:
        problems.append(f"level={level!r}: use a coverage between 0 and 1, e.g. 0.95")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 1:
        problems.append(f"n_resamples={n_resamples!r}: use a whole number >= 1")
    if problems:
        raise ValueError("cannot bootstrap: " + "; ".join(problems))


def _picks(n_examples: int, n_resamples: int, seed: int) -> np.ndarray:
    """`(R, N)` example indices: `n_resamples` draws of `n_examples` with replacement."""
    return np.random.default_rng(seed).integers(0, n_examples, size=(n_resamples, n_examples))


def _percentiles(resampled: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(resampled, [tail, 100 - tail])
    return float(low), float(high)
