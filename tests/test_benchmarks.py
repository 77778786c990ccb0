"""The scripts in benchmarks/ import what loramix has: every `from loramix... import name`
(also the ones inside functions, which only one of a script's options reaches) names a
module and an attribute that exist, and every script loads without running."""

from __future__ import annotations

import ast
import importlib
import importlib.util
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
