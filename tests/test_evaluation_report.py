"""loramix.evaluation.report: Markdown tables, eval.json and eval.md written and read back."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from helpers import NUMBERS, crafted_report

from loramix.evaluation.report import EvalReport
from loramix.science.targets import check_targets


def test_report_files_are_written_and_read_back(tmp_path: Path) -> None:
    report = crafted_report(NUMBERS)
    checks = check_targets(report, {"bio": "bio"})
    paths = report.write(tmp_path / "out", checks)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["eval.json", "eval.md"]
    assert EvalReport.read(tmp_path / "out") == report
    assert EvalReport.read(paths["eval.json"]) == report
    data = json.loads(paths["eval.json"].read_text())
    assert data["targets"][0]["status"] == "pass"
    markdown = paths["eval.md"].read_text()
    assert "| xlora | 1.090 / 50% |" in markdown
    assert "| expert:bio | **1.000** / 50% |" in markdown  # lowest NLL of the column in bold
    assert "| bio | **0.750** | 0.250 |" in markdown
    assert "**PASS** bio: X-LoRA NLL within 10% of expert:bio" in markdown


def test_reading_a_foreign_json_names_the_cause(tmp_path: Path) -> None:
    path = tmp_path / "eval.json"
    path.write_text('{"scores": {}}')
    with pytest.raises(ValueError, match="not a loramix evaluation report"):
        EvalReport.read(path)


def test_the_paired_table_compares_every_system_with_the_reference() -> None:
    report = crafted_report(NUMBERS)
    tokens = (4, 6)
    for system, nll in (("xlora", 1.0), ("uniform", 1.5)):
        report.scores[system]["bio"] = dataclasses.replace(
            report.score(system, "bio"),
            nll=nll,
            n_examples=2,
            n_tokens=10,
            example_nlls=(nll * 4, nll * 6),
            example_tokens=tokens,
        )
    del report.scores["expert:chem"]["mixed"]  # not scored there: an empty cell
    rows = {line.split(" | ")[0]: line for line in report.paired_table("xlora").splitlines()}
    assert "| xlora" not in rows  # the reference has no row of its own
    assert "| uniform | +0.500 [+0.500, +0.500] |" in rows["| uniform"]  # paired: bio
    assert "| +0.300 (unpaired) |" in rows["| uniform"]  # chem: no per-example values kept
    assert "## Against xlora, paired" in report.to_markdown(reference="xlora")
    assert "paired" not in report.to_markdown()
    assert rows["| expert:chem"].endswith("|  |")  # mixed, the last column, is empty
    with pytest.raises(ValueError, match="reference system 'gpt' is not in the report"):
        report.paired_table("gpt")


def test_a_bad_reference_writes_no_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reference system 'gpt'"):
        crafted_report(NUMBERS).write(tmp_path / "out", reference="gpt")
    assert not (tmp_path / "out").exists()
