"""Tests of loramix.science.retrain_jobs: a run folder's settings record (`run.json`)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from loramix.science.pipeline import RetrainSettings
from loramix.science.retrain_jobs import RUN_JSON, check_run_settings
from loramix.science.selection import GateCandidate

A, B, C = GateCandidate("a", steps=2), GateCandidate("b", steps=3), GateCandidate("c", steps=4)


def recorded_names(out) -> list[str]:
    return [c["name"] for c in json.loads((out / RUN_JSON).read_text())["gate_candidates"]]


def test_a_later_call_may_add_and_drop_gate_candidates(tmp_path):
    settings = RetrainSettings(gate_candidates=(A, B))
    check_run_settings(tmp_path, 0, settings)
    check_run_settings(tmp_path, 0, dataclasses.replace(settings, gate_candidates=(B, C)))
    assert recorded_names(tmp_path) == ["b", "c"]
    ignored = dataclasses.replace(settings, gate_candidates=(A,))
    check_run_settings(tmp_path, 0, ignored, ignore=("gate_candidates",))  # add-domain's check
    assert recorded_names(tmp_path) == ["b", "c"]  # left as it was


def test_a_kept_candidate_must_keep_its_settings(tmp_path):
    settings = RetrainSettings(gate_candidates=(A, B))
    check_run_settings(tmp_path, 0, settings)
    longer = dataclasses.replace(B, steps=30)
    with pytest.raises(ValueError, match=r"gate candidate b: .*'steps': 3.* -> .*'steps': 30"):
        check_run_settings(tmp_path, 0, dataclasses.replace(settings, gate_candidates=(A, longer)))
    steps = settings.expert_steps
    with pytest.raises(ValueError, match=f"expert_steps: {steps} -> {2 * steps}"):
        check_run_settings(tmp_path, 0, dataclasses.replace(settings, expert_steps=2 * steps))
    assert recorded_names(tmp_path) == ["a", "b"]  # a refused call changes nothing


def test_a_run_recorded_before_keep_best_existed_reads_as_without_it(tmp_path):
    old = dataclasses.replace(RetrainSettings(gate_candidates=(A,)), keep_best=False)
    check_run_settings(tmp_path, 0, old)
    record = json.loads((tmp_path / RUN_JSON).read_text())
    del record["keep_best"]  # as an older loramix wrote it
    (tmp_path / RUN_JSON).write_text(json.dumps(record))
    check_run_settings(tmp_path, 0, old)  # resumes
    with pytest.raises(ValueError, match="keep_best: False -> True"):
        check_run_settings(tmp_path, 0, dataclasses.replace(old, keep_best=True))
