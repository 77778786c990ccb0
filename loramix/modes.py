"""The scalings modes of X-LoRA generation, named in one place. It imports nothing heavy, so
that the command line and the server's settings can list them without loading torch.

- granular: the gate mixes the experts afresh for every token;
- frozen: one mix per sequence, the mean of the prompt's (or of the first k generated
  tokens') scalings, then fixed;
- merged: that fixed mix merged into the weights, so decoding runs at the base's speed.
"""

from __future__ import annotations

from typing import Literal, get_args

ScalingsMode = Literal["granular", "frozen", "merged"]
SCALINGS_MODES: tuple[str, ...] = get_args(ScalingsMode)
