"""Tests of loramix.science.multitask_choice: the multitask LoRA's schedule chosen on dev."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_science_pipeline import TINY
from tiny_tokenizer import save_tiny_model

from loramix.science.final_eval import PARTS, part_inputs
from loramix.science.lora_jobs import train_lora_job
from loramix.science.multitask_choice import (
    MULTITASK_SELECTION_JSON,
    chosen_multitask,
    parse_candidate,
    recorded_choice,
    score_loras,
)
from loramix.science.pipeline import MULTITASK, RetrainPaths, RetrainSettings, retrain
from loramix.science.retrain_jobs import REUSED_JSON, RUN_JSON, TIMINGS_JSON
from loramix.science.reuse import reuse_run
from loramix.training.outputs import folder_digest

DEV_SETS = {"biology", "proteins", "composite", "mixed"}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, RetrainSettings]:
    """A finished tiny run; its own multitask LoRA: 2 domains x 2 steps, best on dev."""
    root = tmp_path_factory.mktemp("multitask-choice")
    settings = RetrainSettings(base=str(save_tiny_model(root / "tiny-llama")), **TINY)
    retrain(root / "run", seed=3, settings=settings)
    return root / "run", settings


def test_a_candidate_name_spells_its_schedule():
    assert parse_candidate("s4000") == (4000, False)
    assert parse_candidate("s4000-best") == (4000, True)
    for name in ("s0", "4000", "s4000-last", "s-4", "s04", "", "S4000"):
        assert parse_candidate(name) is None, name


def test_settings_refuse_candidates_that_cannot_be_chosen():
    own = RetrainSettings()  # its own multitask LoRA: 8 x 1000 steps, best on dev
    cases = {
        ("s8000-best",): "is the run's own multitask LoRA (8000 steps, keep_best=True)",
        ("s4000", "s4000"): "a name is repeated",
        ("4000",): "spell it s<steps>",
        "s4000": "give a tuple of names",
    }
    for names, message in cases.items():
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            dataclasses.replace(own, multitask_candidates=names)
    with pytest.raises(ValueError, match="trains no multitask LoRA"):
        dataclasses.replace(own, multitask=False, multitask_candidates=("s4000",))
    assert dataclasses.replace(own, multitask_candidates=("s4000", "s8000")).multitask_candidates


def test_the_choice_reads_dev_files_only(tmp_path):
    with pytest.raises(ValueError, match="not dev files: .*biology_test.jsonl"):
        score_loras("no-such-base", {"a": tmp_path}, {"biology": tmp_path / "biology_test.jsonl"})


def test_a_run_without_candidates_scores_its_own(run):
    out, settings = run
    assert chosen_multitask(RetrainPaths(out), settings) == (MULTITASK, out / "experts" / MULTITASK)
    report = json.loads((out / "eval" / "eval.json").read_text())
    assert report["settings"]["multitask_lora"]["name"] == MULTITASK
    assert report["settings"]["multitask_lora"]["chosen_on_dev"] is False
    with pytest.raises(ValueError, match="no choice among"):  # candidates, not yet selected
        chosen_multitask(
            RetrainPaths(out), dataclasses.replace(settings, multitask_candidates=("s1",))
        )


def test_candidates_train_and_the_report_scores_the_one_chosen_on_dev(run, tmp_path):
    source, settings = run
    out = tmp_path / "run"
    shutil.copytree(source, out)
    wider = dataclasses.replace(settings, multitask_candidates=("s1", "s3-best"))
    timings = retrain(out, seed=3, settings=wider)
    assert timings["experts"] is None and timings["gates"] is None and timings[MULTITASK] is None
    assert timings["multitask-candidates"] is not None and timings["multitask-select"] is not None
    assert json.loads((out / RUN_JSON).read_text())["multitask_candidates"] == ["s1", "s3-best"]
    each = json.loads((out / TIMINGS_JSON).read_text())["multitask-candidates"]["each"]
    assert set(each) == {"multitask-s1", "multitask-s3-best"}

    for name, steps, best in (("s1", 1, False), ("s3-best", 3, True)):
        folder = out / "experts" / f"multitask-{name}"
        plan = json.loads((folder / "multitask.json").read_text())
        assert (plan["steps"], plan["keep_best"], plan["rank"]) == (steps, best, 2 * settings.rank)
        record = json.loads((folder / "training_args.json").read_text())
        assert record["global_step"] == steps
        assert bool(record["run"].get("eval_data")) == best  # dev read only to keep the best
        if not best:
            assert plan["kept_step"] == steps

    selection = json.loads((out / MULTITASK_SELECTION_JSON).read_text())
    candidates = selection["candidates"]
    assert list(candidates) == [MULTITASK, "s1", "s3-best"]
    assert all(set(c["dev_nll"]) == DEV_SETS for c in candidates.values())
    means = {name: c["mean"] for name, c in candidates.items()}
    assert means[selection["chosen"]] == min(means.values())

    paths = RetrainPaths(out)
    chosen, folder = chosen_multitask(paths, wider)
    assert chosen == selection["chosen"] == recorded_choice(paths)
    report = json.loads((out / "eval" / "eval.json").read_text())
    assert report["settings"]["multitask_lora"]["name"] == chosen
    assert report["settings"]["multitask_lora"]["chosen_on_dev"] is True
    part = json.loads((out / "eval" / PARTS / f"{MULTITASK}.json").read_text())
    assert part["inputs"]["models"] == {MULTITASK: folder_digest(folder)}
    assert part["inputs"] == part_inputs(paths, wider, [f"expert:{MULTITASK}"])

    again = retrain(out, seed=3, settings=wider)  # nothing left to do
    assert again["multitask-candidates"] is None and again["multitask-select"] is None
    assert again["eval"] is None

    fewer = dataclasses.replace(settings, multitask_candidates=("s1",))
    assert retrain(out, seed=3, settings=fewer)["multitask-select"] is not None  # chosen again
    kept = json.loads((out / MULTITASK_SELECTION_JSON).read_text())["candidates"]
    assert list(kept) == [MULTITASK, "s1"]
    assert all(kept[n]["dev_nll"] == candidates[n]["dev_nll"] for n in kept)  # same files

    retrain(out, seed=3, settings=settings)  # candidates dropped: the run's own again
    part = json.loads((out / "eval" / PARTS / f"{MULTITASK}.json").read_text())
    assert part["inputs"]["models"] == {MULTITASK: folder_digest(out / "experts" / MULTITASK)}
    assert json.loads((out / RUN_JSON).read_text())["multitask_candidates"] == []
    assert recorded_choice(paths) == MULTITASK


def test_a_new_run_takes_the_sources_own_lora_as_the_candidate_of_its_schedule(run, tmp_path):
    source, settings = run
    shorter = dataclasses.replace(settings, expert_steps=1, multitask_candidates=("s4-best", "s3"))
    out = tmp_path / "shorter"
    reused = reuse_run(source, out, seed=3, settings=shorter)
    assert not reused["multitask"]  # its own schedule is now 2 x 1 steps
    assert reused["multitask_candidates"] == {"s4-best": MULTITASK}  # 2 x 2 steps, best on dev
    linked = out / "experts" / "multitask-s4-best"
    assert folder_digest(linked) == folder_digest(source / "experts" / MULTITASK)
    assert not (out / "experts" / "multitask-s3").exists()
    each = json.loads((out / TIMINGS_JSON).read_text())["multitask-candidates"]["each"]
    assert set(each) == {"multitask-s4-best"}
    assert json.loads((out / REUSED_JSON).read_text())["multitask_candidates"] == {
        "s4-best": MULTITASK
    }


def test_candidates_train_in_the_background_beside_the_multitask_lora(run, tmp_path):
    source, settings = run
    out = tmp_path / "run"
    shutil.copytree(source, out)
    shutil.rmtree(out / "experts" / MULTITASK)  # experts, gates and selection stay done
    two = dataclasses.replace(settings, workers=2, multitask_candidates=("s1",))
    timings = retrain(out, seed=3, settings=two, bundle_dir=None)
    assert timings["experts"] is None and timings["gates"] is None
    recorded = json.loads((out / TIMINGS_JSON).read_text())
    assert recorded[MULTITASK]["job"]["wall_s"] > 0  # its own job, in a worker
    step = recorded["multitask-candidates"]
    assert step["background"] is True  # beside it, not after it
    assert set(step["each"]) == {"multitask-s1"}
    assert step["cpu_s"] == step["each"]["multitask-s1"]["cpu_s"] > 0
    assert json.loads((out / MULTITASK_SELECTION_JSON).read_text())["chosen"] in (MULTITASK, "s1")

    # The same LoRAs as trained here, one after the other (one thread per worker there vs
    # the test's threads here: rounding only).
    here = tmp_path / "here"
    shutil.copytree(source, here)
    shutil.rmtree(here / "experts" / MULTITASK)
    for name in (MULTITASK, "multitask-s1"):
        train_lora_job(RetrainPaths(here), name, 3, two)
        weights = f"experts/{name}/adapter_model.safetensors"
        there, mine = load_file(out / weights), load_file(here / weights)
        assert there.keys() == mine.keys()
        for key in mine:
            torch.testing.assert_close(there[key], mine[key], atol=1e-5, rtol=1e-4)
