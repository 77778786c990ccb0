"""The scripts in benchmarks/ import what loramix has: every `from loramix... import name`
(also the ones inside functions, which only one of a script's options reaches) names a
module and an attribute that exist, and every script loads without running."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(BENCHMARKS.glob("*.py"))


def loramix_imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) of every `from loramix... import name` in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("loramix"):
            found += [(node.module, alias.name) for alias in node.names]
    return found


def test_there_are_benchmark_scripts():
    assert len(SCRIPTS) >= 5


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_every_loramix_name_a_benchmark_imports_exists(path):
    missing = []
    for module, name in loramix_imports(path):
        if not hasattr(importlib.import_module(module), name):
            try:
                importlib.import_module(f"{module}.{name}")  # a submodule
            except ImportError:
                missing.append(f"{module}.{name}")
    assert not missing, f"{path.name} imports names loramix lacks: {missing}"


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_every_benchmark_script_loads(path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # scripts import benchmarks/common.py
    spec = importlib.util.spec_from_file_location(f"benchmark_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # top level only: main() runs under __main__
    assert callable(getattr(module, "main", None)) or path.name == "common.py"


def test_retrain_times_reads_a_published_runs_folder(monkeypatch, capsys, tmp_path):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import retrain_times

    # the earlier published run, whose jobs resumed from checkpoints without clocks
    published = BENCHMARKS.parent / "docs" / "science-v2" / "experts-1000-gates-600"
    timings = json.loads((published / "timings.json").read_text())
    quantum = timings["experts"]["each"]["quantum"]  # resumed at 600 of 1000, before clocks
    monkeypatch.setattr(sys, "argv", ["retrain_times.py", str(published)])
    assert retrain_times.main() == 0
    printed = capsys.readouterr().out
    row = next(line for line in printed.splitlines() if line.startswith("| expert quantum"))
    scaled = quantum["cpu_s"] * 1000 / (1000 - quantum["resumed_from_step"])
    assert row.split(" | ")[3] == "40%"
    assert row.split(" | ")[-1] == f"{scaled / 60:.1f} min |"
    assert "| multitask LoRA | 8000 | 6400 | 20% |" in printed
    assert "core-hours in all" in printed and "Adding a domain" in printed

    latest = published.parent  # the published run: the chosen multitask LoRA's time was lost
    monkeypatch.setattr(sys, "argv", ["retrain_times.py", str(latest)])
    assert retrain_times.main() == 0
    printed = capsys.readouterr().out
    assert "| gate lr3e-3-s1200 | 1200 | - | 100% |" in printed
    assert "Adding a domain: not measurable" in printed and "lacks 's4000'" in printed

    older = tmp_path / "older"  # a dropped gate candidate, a job from before CPU times
    older.mkdir()
    timings["gates"]["each"]["lr1e-2-s300"] = {"wall_s": 500.0}
    del timings["experts"]["each"]["biology"]["cpu_s"]
    (older / "timings.json").write_text(json.dumps(timings))
    (older / "run.json").write_text((published / "run.json").read_text())
    monkeypatch.setattr(sys, "argv", ["retrain_times.py", str(older)])
    assert retrain_times.main() == 0
    printed = capsys.readouterr().out
    assert "| gate lr1e-2-s300 | - | - | 100% | 8.3 min | - | - | - |" in printed
    assert "Not counted (no time recorded): biology, lr1e-2-s300." in printed

    monkeypatch.setattr(sys, "argv", ["retrain_times.py", str(tmp_path)])  # no run there
    assert retrain_times.main() == 2
    assert "timings.json" in capsys.readouterr().err
