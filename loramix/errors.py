"""The error type for mistakes in what a user gave: a flag, a file, a folder, a setting.

`UsageError` is a `ValueError`, so library callers that catch `ValueError` keep working. The
`loramix` command prints its message on one line (no traceback; `-v` adds it) and exits with
status 2, as it does for the library's other input errors (`ValueError`, missing files, a
missing optional package). Anything else is a bug and keeps its traceback.

`TrainingInterrupted` is what a trainer raises when Ctrl-C stops it: a `KeyboardInterrupt`
that knows the step reached and the last complete checkpoint, so the command can say where it
stopped and how to resume instead of printing a traceback.
"""

from __future__ import annotations

from pathlib import Path


class UsageError(ValueError):
    """A mistake in the user's input; the message names it and says how to fix it."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a training run.

    Attributes:
        step: The optimizer steps completed when it stopped.
        checkpoint: The newest complete checkpoint (a resume continues from it), or None if
            none was saved yet.
        out: The run's output folder.
    """

    def __init__(self, step: int, checkpoint: Path | None, out: Path) -> None:
        super().__init__(f"training interrupted at step {step}")
        self.step = step
        self.checkpoint = checkpoint
        self.out = out
