"""The main job run by `make demo`: the bundled science X-LoRA.

Loads SmolLM2-135M-Instruct and the experts and gate kept in `models/science-xlora`, answers
one question of each domain and a composite one with every token coloured by its dominant
expert, prints a quick evaluation table and writes the heatmaps into `runs/demo`. Same as
`loramix science demo --model models/science-xlora`; extra arguments are passed on (e.g.
`--out DIR`, `--n-eval N`, or another `--model DIR`).
"""

from __future__ import annotations

import os

# OpenMP threads wait passively (unless set otherwise): on a machine busy with other jobs,
# spinning threads stall every parallel op until the others' time slices end (BENCHMARKS.md,
# "make demo on a busy machine"). Set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from loramix.cli import main  # noqa: E402
from loramix.science.bundle import DEFAULT_BUNDLE

BUNDLE = Path(__file__).resolve().parents[1] / DEFAULT_BUNDLE  # this repository's bundle

if __name__ == "__main__":
    raise SystemExit(main(["science", "demo", "--model", str(BUNDLE), *sys.argv[1:]]))
