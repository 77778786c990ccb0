"""Gate selection on the dev split: candidates, the dev-only guard and the choice."""

from __future__ import annotations

import math

import pytest

from loramix.science.selection import (
    DEFAULT_CANDIDATES,
    GateCandidate,
    check_dev_files,
    choose,
    score_candidates,
    selection_record,
)

DOMAINS = ("biology", "chemistry")


def test_lowest_mean_dev_nll_wins_and_ties_keep_the_first():
    scores = {
        "a": {"biology_dev": 1.0, "mixed_dev": 3.0},  # mean 2.0
        "b": {"biology_dev": 1.5, "mixed_dev": 2.0},  # mean 1.75
        "c": {"biology_dev": 2.0, "mixed_dev": 1.5},  # mean 1.75, later
    }
    assert choose(scores) == "b"
    record = selection_record([GateCandidate("a"), GateCandidate("b")], scores, "b")
    assert record["chosen"] == "b"
    assert record["candidates"]["b"]["mean"] == pytest.approx(1.75)


def test_choose_refuses_no_candidates_or_non_finite_scores():
    with pytest.raises(ValueError, match="no gate candidate"):
        choose({})
    with pytest.raises(ValueError, match=r"without finite dev NLL: \['a', 'b'\]"):
        choose({"a": {"mixed_dev": math.nan}, "b": {}})


def test_test_files_are_refused_by_construction(tmp_path):
    check_dev_files({"mixed": "data/mixed_dev.jsonl"})
    with pytest.raises(ValueError, match="not dev files: data/mixed_test.jsonl"):
        check_dev_files({"mixed": "data/mixed_test.jsonl", "bio": "data/biology_dev.jsonl"})
    with pytest.raises(ValueError, match="no dev file"):
        check_dev_files({})
    # the scorer checks before loading anything: no model folder is needed to be refused
    with pytest.raises(ValueError, match="chosen on the dev split only"):
        score_candidates("no-such-model", {"a": tmp_path}, {"mixed": tmp_path / "x_test.jsonl"})


def test_candidates_validate_every_field():
    assert all(not c.problems(DOMAINS) for c in DEFAULT_CANDIDATES)
    bad = GateCandidate(
        "a b", steps=0, lr=-1, weights={"physics": 0}, temperature=0, layerwise="yes"
    )
    problems = "\n".join(bad.problems(DOMAINS))
    for text in (
        "letters, digits",
        "steps=0",
        "lr=-1",
        "temperature=0",
        "'physics'",
        "layerwise='yes'",
    ):
        assert text in problems
