"""The retrain's training settings of its LoRA adapters (`loramix.science.lora_jobs`)."""

from __future__ import annotations

import pytest

from loramix.science.lora_jobs import EVAL_POINTS, multitask_schedule, training_config
from loramix.science.pipeline import RetrainSettings


def test_keep_best_measures_a_tenth_of_the_run_apart_and_resumes_from_every_save_step():
    settings = RetrainSettings(save_steps=50)
    config = training_config(settings, 0, lr=1e-3, steps=8000, keep_best=True)
    assert config.eval_steps == 8000 // EVAL_POINTS == 800
    assert config.save_steps == 50  # an interruption loses under 50 steps, not under 800
    assert config.keep_best and config.save_total_limit == 1


def test_measurements_are_never_closer_than_the_save_steps():
    config = training_config(RetrainSettings(save_steps=50), 0, lr=1e-3, steps=200, keep_best=True)
    assert (config.eval_steps, config.save_steps) == (50, 50)


def test_without_keep_best_nothing_is_measured():
    config = training_config(RetrainSettings(save_steps=50), 0, lr=1e-3, steps=8000)
    assert (config.eval_steps, config.save_steps, config.keep_best) == (None, 50, False)


@pytest.mark.parametrize(
    ("name", "expected"),
    [("multitask", (8 * 1000, True)), ("multitask-s4000", (4000, False))],
)
def test_multitask_schedules(name, expected):
    assert multitask_schedule(name, RetrainSettings(expert_steps=1000, keep_best=True)) == expected


def test_a_name_that_spells_no_candidate_is_refused():
    with pytest.raises(ValueError, match="multitask-s<steps>"):
        multitask_schedule("multitask-fast", RetrainSettings())
