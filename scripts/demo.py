"""The main job run by `make demo`: the bundled science X-LoRA.

Loads SmolLM2-135M-Instruct and the experts and gate kept in `models/science-xlora`, answers
one question of each domain and a composite one with every token coloured by its dominant
expert, prints a quick evaluation table and writes the heatmaps into `runs/demo`. Same as
`loramix science demo --model models/science-xlora`; extra arguments are passed on (e.g.
`--out DIR`, `--n-eval N`, or another `--model DIR`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from loramix.cli import main
from loramix.science.bundle import DEFAULT_BUNDLE

BUNDLE = Path(__file__).resolve().parents[1] / DEFAULT_BUNDLE  # this repository's bundle

if __name__ == "__main__":
    raise SystemExit(main(["science", "demo", "--model", str(BUNDLE), *sys.argv[1:]]))
