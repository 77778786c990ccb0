"""A training's own time over all the calls that resumed it, kept in its checkpoints.

A run that is interrupted and resumed times only its last call. `JobClock` writes the time
so far (the earlier calls' from the checkpoint it resumed from, plus this call's) into every
checkpoint Trainer saves, so that the call that finishes knows the time of all its steps:

    clock = JobClock.resuming(last_checkpoint(out / "checkpoints"))
    train_expert(..., callbacks=[clock])
    total = clock.total()          # JobTime(wall_s, cpu_s, timed_from_step)

Steps an interrupted call made after its last checkpoint are made again by the next call
and counted there once; the lost minutes of the interrupted call are not counted. A call
killed between Trainer's checkpoint and its clock file leaves a checkpoint without one: the
next call reads it as an older checkpoint, timed from its step on (`read_clock`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from loramix.atomic import write_text_atomic

logger = logging.getLogger(__name__)

CLOCK_NAME = "job_clock.json"  # in each checkpoint folder


@dataclass(frozen=True)
class JobTime:
    """Wall and CPU seconds of a training over the steps from `timed_from_step` on (0 when
    every call was timed; a checkpoint written before clocks were kept starts later)."""

    wall_s: float = 0.0
    cpu_s: float = 0.0
    timed_from_step: int = 0

    def plus(self, wall_s: float, cpu_s: float) -> JobTime:
        return JobTime(self.wall_s + wall_s, self.cpu_s + cpu_s, self.timed_from_step)


def read_clock(checkpoint: Path | None) -> JobTime:
    """The time kept in `checkpoint` (a `checkpoint-STEP` folder); without a clock file (an
    older checkpoint), no time, timed from its step; no checkpoint: a fresh start."""
    if checkpoint is None:
        return JobTime()
    path = checkpoint / CLOCK_NAME
    if not path.is_file():
        from loramix.training.trainer import checkpoint_step

        return JobTime(timed_from_step=checkpoint_step(checkpoint))
    try:
        return JobTime(**json.loads(path.read_text()))
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"{path}: not a training clock ({error}); delete the file to time the run "
            f"from this checkpoint on"
        ) from None


class JobClock(TrainerCallback):
    """Times a training from its creation, on top of the time `earlier` calls took, and keeps
    the sum in each checkpoint Trainer saves (`CLOCK_NAME`)."""

    def __init__(self, earlier: JobTime | None = None) -> None:
        self.earlier = earlier or JobTime()
        self.start_wall = time.perf_counter()
        self.start_cpu = time.process_time()  # this process: all its threads

    @classmethod
    def resuming(cls, checkpoint: Path | None) -> JobClock:
        """A clock for a call that resumes from `checkpoint` (None: starts afresh)."""
        return cls(read_clock(checkpoint))

    def total(self) -> JobTime:
        """The earlier calls' time and this call's so far."""
        return self.earlier.plus(
            time.perf_counter() - self.start_wall, time.process_time() - self.start_cpu
        )

    def on_save(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if folder.is_dir():
                total = dataclasses.asdict(self.total())
                write_text_atomic(folder / CLOCK_NAME, json.dumps(total, indent=2) + "\n")
            else:
                logger.warning("%s: no such checkpoint; its time is not kept", folder)
        return control
