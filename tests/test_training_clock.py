"""Tests of loramix.training.clock: a training's time adds up over the calls that resume it."""

from __future__ import annotations

import json
import time

import pytest
from helpers import StopAfterSave
from tiny_tokenizer import save_tiny_model
from transformers import TrainerCallback

from loramix.training.clock import CLOCK_NAME, JobClock, JobTime, read_clock
from loramix.training.expert import train_expert
from loramix.training.trainer import TrainingConfig, last_checkpoint

SETTINGS = TrainingConfig(
    batch_size=4, progress=False, warmup=0, lr=1e-2, max_steps=6, save_steps=3, eval_fraction=0.0
)


class Sleep(TrainerCallback):
    """Makes each step take at least `seconds` of wall time (and no CPU time)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        time.sleep(self.seconds)


def test_no_checkpoint_is_a_fresh_start_and_an_older_one_is_timed_from_its_step(tmp_path):
    assert read_clock(None) == JobTime()
    older = tmp_path / "checkpoint-40"
    older.mkdir()
    assert read_clock(older) == JobTime(timed_from_step=40)
    (older / CLOCK_NAME).write_text('{"wall": 3}')
    with pytest.raises(ValueError, match=f"{older / CLOCK_NAME}: not a training clock"):
        read_clock(older)


def test_a_resumed_training_adds_the_time_kept_in_its_checkpoint(tmp_path):
    base = save_tiny_model(tmp_path / "tiny-llama")
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"prompt": "two plus two? ", "completion": "four."}) + "\n")
    data.write_text(data.read_text() * 12)
    out = tmp_path / "expert"
    first = JobClock()
    with pytest.raises(KeyboardInterrupt):  # the clock writes before the interruption
        train_expert(
            base, [data], out, training=SETTINGS, callbacks=[Sleep(0.2), first, StopAfterSave(3)]
        )
    checkpoint = last_checkpoint(out / "checkpoints")
    assert checkpoint is not None and checkpoint.name == "checkpoint-3"
    kept = read_clock(checkpoint)
    assert kept.timed_from_step == 0
    assert 0.6 <= kept.wall_s <= first.total().wall_s  # three steps' sleeps, at least
    assert kept.cpu_s > 0

    second = JobClock.resuming(checkpoint)
    assert second.earlier == kept
    train_expert(base, [data], out, training=SETTINGS, resume=True, callbacks=[Sleep(0.2), second])
    last = read_clock(out / "checkpoints" / "checkpoint-6")
    assert last.timed_from_step == 0
    assert kept.wall_s + 0.6 <= last.wall_s <= second.total().wall_s
    assert second.total().cpu_s > last.cpu_s > kept.cpu_s
