"""Bootstrap confidence intervals of ratios over examples."""

from __future__ import annotations

import random

import pytest

from loramix.evaluation.bootstrap import paired_interval, ratio_interval


def test_interval_holds_the_estimate_and_narrows_with_more_examples():
    rng = random.Random(0)
    small = [float(rng.random() < 0.6) for _ in range(50)]
    large = [float(rng.random() < 0.6) for _ in range(2000)]
    for values in (small, large):
        low, high = ratio_interval(values)
        assert low <= sum(values) / len(values) <= high
    assert ratio_interval(large)[1] - ratio_interval(large)[0] < (
        ratio_interval(small)[1] - ratio_interval(small)[0]
    )


def test_binomial_interval_matches_the_normal_approximation():
    values = [1.0] * 60 + [0.0] * 40  # p = 0.6, n = 100: +-1.96 * sqrt(.24 / 100) = +-0.096
    low, high = ratio_interval(values, n_resamples=5000)
    assert low == pytest.approx(0.504, abs=0.02)
    assert high == pytest.approx(0.696, abs=0.02)


def test_ratio_weights_by_denominators_and_is_deterministic():
    sums, tokens = [2.0, 9.0, 1.0], [2, 3, 1]  # NLL per token 12 / 6 = 2
    low, high = ratio_interval(sums, tokens)
    assert low <= 2.0 <= high
    assert ratio_interval(sums, tokens) == (low, high)  # same seed, same interval
    assert ratio_interval([1.0, 1.0], [1, 1]) == (1.0, 1.0)  # no spread, no width


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (([],), {}, "give one value per example"),
        (([1.0, 2.0], [1]), {}, "1 values for 2 numerators"),
        (([1.0], [0]), {}, "positive count"),
        (([1.0],), {"level": 95}, "between 0 and 1"),
        (([1.0],), {"n_resamples": 0}, "whole number >= 1"),
    ],
)
def test_bad_inputs_name_the_fix(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ratio_interval(*args, **kwargs)


def test_paired_interval_sees_a_steady_gain_the_separate_intervals_hide():
    rng = random.Random(1)
    hard = [rng.uniform(0.5, 3.0) for _ in range(100)]  # the examples' own difficulty
    tokens = [rng.randint(2, 9) for _ in range(100)]
    theirs = [h * t for h, t in zip(hard, tokens, strict=True)]
    ours = [(h - 0.05) * t for h, t in zip(hard, tokens, strict=True)]  # 0.05 lower on each
    our_low, our_high = ratio_interval(ours, tokens)
    their_low, their_high = ratio_interval(theirs, tokens)
    assert our_high > their_low  # the separate intervals overlap widely
    low, high = paired_interval((ours, tokens), (theirs, tokens))
    assert low == pytest.approx(-0.05) and high == pytest.approx(-0.05)  # the pairs agree
    low, high = paired_interval((ours, tokens), (theirs, tokens), relative=True)
    mean = sum(theirs) / sum(tokens)
    assert low < -0.05 / mean * 0.9 and high > -0.05 / mean * 1.1 and high < 0


def test_paired_interval_of_a_noisy_difference_holds_zero():
    rng = random.Random(2)
    tokens = [5] * 200
    theirs = [rng.uniform(1, 2) * 5 for _ in range(200)]
    ours = [value + rng.gauss(0, 1) for value in theirs]  # no gain, only noise
    low, high = paired_interval((ours, tokens), (theirs, tokens))
    assert low < 0 < high
    assert paired_interval((theirs, tokens), (theirs, tokens)) == (0.0, 0.0)


def test_paired_interval_needs_the_same_examples():
    with pytest.raises(ValueError, match="3 examples against 2"):
        paired_interval(([1.0, 2.0, 3.0], [1, 1, 1]), ([1.0, 2.0], [1, 1]))
    with pytest.raises(ValueError, match="theirs: denominators: every example"):
        paired_interval(([1.0], [1]), ([1.0], [0]))
