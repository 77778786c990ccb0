"""The main job run by `make demo`: the bundled science X-LoRA (issue 5).

Loads SmolLM2-135M-Instruct and the experts and gate kept in `models/science-xlora`, answers
one question of each domain and a composite one with every token coloured by its dominant
expert, prints a quick evaluation table and writes the heatmaps into `runs/demo`. Same as
`loramix science demo`; extra arguments are passed on (e.g. `--out DIR`, `--n-eval N`).
"""

from __future__ import annotations

import sys

from loramix.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["science", "demo", *sys.argv[1:]]))
