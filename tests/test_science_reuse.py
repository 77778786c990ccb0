"""Tests of loramix.science.reuse: a new run folder started from another run's finished steps."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from test_science_pipeline import TINY
from tiny_tokenizer import save_tiny_model

from loramix.science.pipeline import MULTITASK, SELECTION_JSON, RetrainSettings, retrain
from loramix.science.retrain_jobs import DEV_SCORES_JSON, REUSED_JSON, RUN_JSON, TIMINGS_JSON
from loramix.science.reuse import reuse_run
from loramix.science.selection import GateCandidate


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, RetrainSettings]:
    root = tmp_path_factory.mktemp("reuse")
    base = save_tiny_model(root / "tiny-llama")
    settings = RetrainSettings(base=str(base), **TINY)
    retrain(root / "run", seed=3, settings=settings, bundle_dir=None)
    return root / "run", settings


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int, int]]:
    """Each file's bytes, inode and modification time: a write through a link changes the
    time even when it writes the same bytes."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_ino, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file()
    }


def test_a_new_gate_candidate_trains_alone_and_the_source_is_untouched(source, tmp_path, caplog):
    run, settings = source
    before = _snapshot(run)
    more = settings.gate_candidates + (
        GateCandidate("c", steps=2, temperature=0.5, layerwise=False),
    )
    wider = dataclasses.replace(settings, gate_candidates=more)
    out = tmp_path / "run-2"
    reused = reuse_run(run, out, seed=3, settings=wider)
    assert reused["data"] and reused["multitask"]
    assert reused["experts"] == list(settings.domains)
    assert reused["gates"] == ["a", "b"]
    carried = json.loads((out / DEV_SCORES_JSON).read_text())
    source_selection = json.loads((run / SELECTION_JSON).read_text())["candidates"]
    assert {n: e["dev_nll"] for n, e in carried.items()} == {
        n: source_selection[n]["dev_nll"] for n in ("a", "b")
    }
    with caplog.at_level("INFO", logger="loramix.science.selection"):
        timings = retrain(out, seed=3, settings=wider, bundle_dir=None)
    assert "dev scores kept (same gate files): ['a', 'b']" in caplog.text
    assert timings["experts"] is None and timings[MULTITASK] is None
    assert timings["gates"] is not None and timings["select"] is not None
    assert sorted(p.name for p in (out / "gates").iterdir()) == ["a", "b", "c"]
    for name, layerwise in (("a", True), ("c", False)):  # c overrides the run's setting
        config = json.loads((out / "gates" / name / "xlora_config.json").read_text())
        assert config["layerwise_scalings"] is layerwise
        assert config["softmax_temperature"] == (0.5 if name == "c" else 1.0)
    selection = json.loads((out / SELECTION_JSON).read_text())
    assert sorted(selection["candidates"]) == ["a", "b", "c"]
    assert set(json.loads((out / DEV_SCORES_JSON).read_text())) == {"a", "b", "c"}
    assert (out / "eval" / "eval.json").is_file()
    recorded = json.loads((out / TIMINGS_JSON).read_text())
    assert set(recorded["experts"]["each"]) == set(settings.domains)  # the source's times
    assert recorded["experts"]["reused_from"] == str(run.resolve())
    assert json.loads((out / REUSED_JSON).read_text())["from"] == str(run.resolve())
    assert not list(tmp_path.glob(".*reusing"))  # the staging folder is gone
    assert _snapshot(run) == before  # nothing written through the links


def test_only_the_steps_whose_settings_match_are_reused(source, tmp_path):
    run, settings = source
    changed_candidate = dataclasses.replace(
        settings, gate_candidates=(settings.gate_candidates[0], GateCandidate("b", steps=3))
    )
    assert reuse_run(run, tmp_path / "1", 3, changed_candidate)["gates"] == ["a"]
    wider_gate = dataclasses.replace(settings, gate_size=16)
    reused = reuse_run(run, tmp_path / "2", 3, wider_gate)
    assert reused["experts"] == list(settings.domains) and reused["multitask"]
    assert reused["gates"] == []
    longer = dataclasses.replace(settings, expert_steps=3)
    reused = reuse_run(run, tmp_path / "3", 3, longer)
    assert reused["data"] and not reused["experts"] and not reused["multitask"]
    assert not (tmp_path / "3" / "experts").exists()
    assert reused["not_reused"] == dict.fromkeys(("experts", MULTITASK), "expert_steps: 2 -> 3")
    other_seed = reuse_run(run, tmp_path / "4", 4, settings)
    assert not other_seed["data"] and not (tmp_path / "4" / "data").exists()
    assert other_seed["not_reused"] == {"data": "seed: 3 -> 4"}
    recorded = json.loads((tmp_path / "4" / RUN_JSON).read_text())
    assert recorded["seed"] == 4  # the new folder records its own run


def test_reuse_names_the_folder_it_cannot_use(source, tmp_path):
    run, settings = source
    with pytest.raises(FileNotFoundError, match="run.json.*--reuse"):
        reuse_run(tmp_path, tmp_path / "new", 3, settings)
    with pytest.raises(ValueError, match="own folder"):
        reuse_run(run, run, 3, settings)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty.*without --reuse"):
        reuse_run(run, tmp_path / "busy", 3, settings)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"


def test_retrain_cli_reuse_names_a_missing_run(tmp_path, capsys):
    from loramix.cli import main

    args = ["science", "retrain", "--out", str(tmp_path / "new"), "--no-export"]
    assert main([*args, "--reuse", str(tmp_path / "nothing")]) == 2
    error = capsys.readouterr().err
    assert "nothing/run.json: missing or unreadable" in error
    assert not (tmp_path / "new").exists()  # refused before anything was written


def test_a_run_recorded_before_a_candidate_field_existed_still_matches(source, tmp_path):
    import shutil

    run, settings = source
    older = tmp_path / "older"
    shutil.copytree(run, older)
    recorded = json.loads((older / RUN_JSON).read_text())
    for candidate in recorded["gate_candidates"]:
        del candidate["layerwise"]  # as run.json was written before the field existed
    (older / RUN_JSON).write_text(json.dumps(recorded))
    assert retrain(older, seed=3, settings=settings, bundle_dir=None)["gates"] is None
    assert reuse_run(older, tmp_path / "new", 3, settings)["gates"] == ["a", "b"]
    recorded["gate_candidates"][0]["temperature"] = 2.0  # a real difference still counts
    (older / RUN_JSON).write_text(json.dumps(recorded))
    with pytest.raises(ValueError, match="gate candidate a: .*temperature.: 2.0"):
        retrain(older, seed=3, settings=settings, bundle_dir=None)


def test_dev_scores_follow_the_gate_files(source, tmp_path, caplog):
    import shutil

    run, settings = source
    older = tmp_path / "older"
    shutil.copytree(run, older)
    (older / DEV_SCORES_JSON).unlink()  # a run made before the file existed
    reused = tmp_path / "new"
    reuse_run(older, reused, 3, settings)
    carried = json.loads((reused / DEV_SCORES_JSON).read_text())
    selection = json.loads((older / SELECTION_JSON).read_text())["candidates"]
    assert {n: e["dev_nll"] for n, e in carried.items()} == {
        n: selection[n]["dev_nll"] for n in ("a", "b")
    }
    with caplog.at_level("INFO", logger="loramix.science.selection"):
        retrain(reused, seed=3, settings=settings, bundle_dir=None)
    assert "dev scores kept (same gate files): ['a', 'b']" in caplog.text
    # a gate trained again in the same folder is a new candidate: selected and scored again
    shutil.rmtree(reused / "gates" / "b")
    caplog.clear()
    with caplog.at_level("INFO", logger="loramix.science.selection"):
        timings = retrain(reused, seed=3, settings=settings, bundle_dir=None)
    assert timings["gates"] is not None and timings["select"] is not None
    assert timings["eval"] is not None  # a new selection gets a new report
    assert "dev scores kept (same gate files): ['a']" in caplog.text


def test_a_source_recorded_before_keep_best_existed_is_reused_without_it(source, tmp_path):
    run, settings = source
    old = tmp_path / "old"
    shutil.copytree(run, old, symlinks=True)
    record = json.loads((old / RUN_JSON).read_text())
    del record["keep_best"]  # as an older loramix wrote it: those runs had no keep_best
    (old / RUN_JSON).write_text(json.dumps(record))
    without = dataclasses.replace(settings, keep_best=False)
    reused = reuse_run(old, tmp_path / "1", 3, without)
    assert reused["experts"] == list(settings.domains) and reused["multitask"]
    reused = reuse_run(old, tmp_path / "2", 3, settings)
    assert not reused["experts"]
    assert reused["not_reused"]["experts"] == "keep_best: False -> True"


def test_a_later_source_fills_in_what_the_first_left_out(source, tmp_path):
    run, settings = source  # its own multitask LoRA: 2 domains x 2 steps, best on dev
    shorter = tmp_path / "shorter"  # the same data; its own multitask LoRA: 2 x 1 steps
    retrain(shorter, seed=3, settings=dataclasses.replace(settings, expert_steps=1))
    other_data = tmp_path / "other-data"
    shutil.copytree(shorter, other_data)
    dev = other_data / "data" / "biology_dev.jsonl"
    dev.write_text(dev.read_text().replace("A", "G", 1))
    manifest = json.loads((shorter / "data" / "manifest.json").read_text())
    manifest["versions"] = {"sympy": "0.0"}  # other libraries, the same data files: reusable
    (shorter / "data" / "manifest.json").write_text(json.dumps(manifest))
    wider = dataclasses.replace(settings, multitask_candidates=("s2-best",))
    out = tmp_path / "run-2"
    reused = reuse_run([run, other_data, shorter], out, seed=3, settings=wider)
    assert reused["data"] and reused["multitask"] and reused["gates"] == ["a", "b"]
    assert reused["multitask_candidates"] == {}  # the first source has no 2-step LoRA
    refused, filled = reused["also"]
    assert "*.jsonl files differ" in refused["not_reused"]["data"]
    assert refused["multitask_candidates"] == {}
    assert not filled["data"] and filled["experts"] == [] and filled["gates"] == []
    assert filled["multitask_candidates"] == {"s2-best": MULTITASK}
    assert _snapshot(out / "experts" / "multitask-s2-best") == _snapshot(
        shorter / "experts" / MULTITASK
    )  # hard links to the very same files
    assert _snapshot(out / "experts" / MULTITASK) == _snapshot(run / "experts" / MULTITASK)
    timings = json.loads((out / TIMINGS_JSON).read_text())
    each = timings["multitask-candidates"]["each"]
    assert set(each) == {"multitask-s2-best"}
    assert each["multitask-s2-best"]["reused_from"] == str(shorter.resolve())
    own = json.loads((shorter / TIMINGS_JSON).read_text())[MULTITASK]["job"]
    assert each["multitask-s2-best"] == {"reused_from": str(shorter.resolve()), **own}
    assert json.loads((out / REUSED_JSON).read_text()) == reused
