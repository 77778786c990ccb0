"""The core imports none of the workflow packages (training, evaluation, science, serving)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

WORKFLOWS = ("loramix.training", "loramix.evaluation", "loramix.science", "loramix.serving")
ROOT = Path(__file__).resolve().parents[1]


def test_importing_the_core_pulls_in_no_workflow() -> None:
    code = (
        "import json, sys\n"
        "import loramix, loramix.cache, loramix.generation, loramix.saving, loramix.smollm2\n"
        "from loramix import XLoraConfig, XLoraModel\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('loramix'))))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert "loramix.model" in loaded  # the probe did import the core
    pulled = [m for m in loaded if m.startswith(WORKFLOWS)]
    assert pulled == [], f"the core imports workflow modules: {pulled}"
