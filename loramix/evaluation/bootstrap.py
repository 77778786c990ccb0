"""95% bootstrap confidence intervals of the evaluation's per-set numbers.

Both numbers of a system on a test set are ratios of sums over the set's examples:

    NLL       sum of the examples' completion-token NLLs / sum of their completion tokens
    accuracy  verified answers / examples

`ratio_interval` resamples the examples with replacement (the percentile bootstrap: draw
`n_resamples` sets of the same size, recompute the ratio on each, take the 2.5th and 97.5th
percentiles), with a fixed seed, so the same numbers always give the same interval.
Resampling whole examples keeps each example's tokens together, as they are not independent.
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
    values = np.asarray(numerators, dtype=np.float64)  # (N,)
    weights = np.ones_like(values) if denominators is None else np.asarray(denominators, float)
    problems = []
    if values.ndim != 1 or values.size == 0:
        problems.append(f"numerators: give one value per example (got shape {values.shape})")
    elif weights.shape != values.shape:
        problems.append(
            f"denominators: {weights.shape[0] if weights.ndim else 0} values for "
            f"{values.size} numerators; give one per example"
        )
    elif not (weights > 0).all():
        problems.append("denominators: every example needs a positive count")
    if not 0 < level < 1:
        problems.append(f"level={level!r}: use a coverage between 0 and 1, e.g. 0.95")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 1:
        problems.append(f"n_resamples={n_resamples!r}: use a whole number >= 1")
    if problems:
        raise ValueError("cannot bootstrap: " + "; ".join(problems))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, values.size, size=(n_resamples, values.size))  # (R, N)
    ratios = values[picks].sum(axis=1) / weights[picks].sum(axis=1)  # (R,)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(ratios, [tail, 100 - tail])
    return float(low), float(high)
