"""Tests of loramix.science.demo and `loramix science demo` on a tiny retrained bundle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_tokenizer import save_tiny_model

from loramix.cli import main
from loramix.science.demo import run_demo, write_test_sets
from loramix.science.pipeline import RetrainSettings, retrain
from loramix.science.selection import GateCandidate


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """(base model folder, bundle) of a two-expert retrain with a few steps."""
    root = tmp_path_factory.mktemp("demo")
    base = save_tiny_model(root / "tiny-llama")
    settings = RetrainSettings(
        base=str(base),
        domains=("biology", "proteins"),
        n_train=8,
        n_test=4,
        n_dev=4,
        targets=("q_proj", "k_proj"),
        expert_steps=1,
        gate_candidates=(GateCandidate("only", steps=1),),
        multitask=False,
        gate_size=8,
        batch_size=2,
        max_length=128,
        eval_limit=1,
        max_new_tokens=2,
    )
    retrain(root / "run", seed=1, settings=settings, bundle_dir=root / "bundle")
    return base, root / "bundle"


def test_demo_answers_each_domain_and_a_composite_question(tiny, tmp_path):
    base, bundle = tiny
    lines: list[str] = []
    result = run_demo(
        bundle, tmp_path, base=str(base), n_eval=2, max_new_tokens=4, log=lines.append
    )
    assert [a.test_set for a in result.answers] == ["biology", "proteins", "composite"]
    for answer in result.answers:
        assert answer.prompt and answer.reference
        assert 0 < len(answer.token_ids) <= 4
        assert len(answer.experts) == len(answer.token_ids)
        assert all(e in (0, 1) for e in answer.experts)
    assert result.report is not None and result.report.settings["limit"] == 2
    assert {"biology", "proteins", "composite", "mixed"} == set(result.report.test_sets)
    report = result.report
    assert report.systems == ["base", "expert:biology", "expert:proteins", "uniform", "xlora"]
    assert set(report.scores["xlora"]) == {"biology", "proteins", "composite", "mixed"}
    assert set(report.scores["expert:biology"]) == {"biology", "composite", "mixed"}
    recorded = json.loads((bundle / "eval.json").read_text())
    assert [t.status for t in result.verdicts] == [t["status"] for t in recorded["targets"]]
    assert {t.target.split(":")[0] for t in result.verdicts} >= {"biology", "mixed", "composite"}
    assert result.verdict_examples == 1  # the tiny retrain's eval_limit
    sample = json.loads((tmp_path / "eval.json").read_text())
    assert sample["settings"]["chat"] is False and not sample.get("targets")  # no verdicts
    names = {p.name for p in result.plots}
    assert {"layers_biology.png", "tokens_composite.png", "expert_usage.png"} <= names
    assert all(p.is_file() for p in result.plots)
    assert lines and "loaded" in lines[0]


def test_test_sets_are_the_retrain_runs_held_out_sets(tiny, tmp_path):
    _, bundle = tiny
    sets = write_test_sets(bundle, tmp_path / "data", ["biology", "proteins"])
    run_sets = bundle.parent / "run" / "data"
    for name, path in sets.items():
        assert path.read_text() == (run_sets / path.name).read_text(), name


def test_cli_prints_tagged_answers_and_the_table(tiny, tmp_path, capsys):
    base, bundle = tiny
    args = ["science", "demo", "--model", str(bundle), "--base", str(base)]
    args += ["--out", str(tmp_path), "--n-eval", "1", "--max-new-tokens", "2", "--no-colour"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "[0] biology  [1] proteins" in out
    assert "[composite]" in out and "reference:" in out
    assert "| xlora |" in out and "| expert:biology |" in out
    verdicts, sample = out.split("Targets, from the bundle's full evaluation (1 held-out", 1)[
        1
    ].split("A sample, the first 1 held-out examples", 1)
    recorded = json.loads((bundle / "eval.json").read_text())["targets"]
    assert len(recorded) >= 3
    for target in recorded:
        assert f"{target['status'].upper():7} {target['target']}" in verdicts
    assert "PASS" not in sample and "FAIL" not in sample and "no pass/fail" in sample


def test_cli_names_the_fix_for_a_missing_model(tmp_path, capsys):
    assert main(["science", "demo", "--model", str(tmp_path)]) == 2
    assert "loramix science retrain" in capsys.readouterr().err


def test_test_sets_follow_the_bundles_experts_not_the_registry(tiny, tmp_path):
    _, bundle = tiny
    sets = write_test_sets(bundle, tmp_path / "data", ["biology", "not-a-domain"])
    assert list(sets) == ["biology", "mixed"]  # no composite task chains biology alone
    assert all(path.is_file() for path in sets.values())
