"""`ServeConfig`: the settings of one server (its `loramix serve` flags are built from it).

Kept apart from `app.py` so that the command line can declare the flags without FastAPI.
"""

from __future__ import annotations

from dataclasses import dataclass

from loramix.modes import SCALINGS_MODES as MODES


@dataclass
class ServeConfig:
    """Settings of one server.

    Attributes:
        model_name: The id clients pass as `model` (and `/v1/models` lists).
        mode: Scalings mode of requests that do not set `scalings_mode`.
        max_batch: Sequences decoded together at most (over all requests); others wait.
        default_max_tokens: `max_tokens` of requests that give none (capped by the context).
    """

    model_name: str = "xlora"
    mode: str = "granular"
    max_batch: int = 16
    default_max_tokens: int = 256

    def __post_init__(self) -> None:
        problems = []
        if not self.model_name:
            problems.append("model_name='': give the id clients will pass as `model`")
        if self.mode not in MODES:
            problems.append(f"mode={self.mode!r}: use one of {', '.join(MODES)}")
        if self.max_batch < 1:
            problems.append(f"max_batch={self.max_batch}: use an int >= 1")
        if self.default_max_tokens < 1:
            problems.append(f"default_max_tokens={self.default_max_tokens}: use an int >= 1")
        if problems:
            raise ValueError("Invalid server settings:\n  " + "\n  ".join(problems))
