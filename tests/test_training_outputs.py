"""Tests of loramix.training.outputs: whose output folder it is, what overwrite replaces,
what a resumed run must share."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loramix.training.outputs import check_output, finished, run_differences, start_output
from loramix.training.trainer import TrainingConfig

FINAL = ("adapter_config.json", "adapter_model.safetensors")
RUN = {"data": [{"path": "/d/a.jsonl", "sha256": "aa"}], "training": {"lr": 0.1}}


def check(out: Path, command: str = "train-expert", **flags):
    return check_output(
        out,
        command=command,
        resume=flags.get("resume", False),
        overwrite=flags.get("overwrite", False),
        final_files=FINAL,
    )


def make_checkpoint(out: Path, step: int) -> Path:
    folder = out / "checkpoints" / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text("{}")
    return folder


def test_fresh_folder_is_made_only_when_the_run_starts(tmp_path):
    out = tmp_path / "out"
    plan = check(out)
    assert not out.exists()  # checking writes nothing
    assert start_output(plan, RUN, TrainingConfig())
    record = json.loads((out / "training_args.json").read_text())
    assert record == {"command": "train-expert", "status": "running", "run": RUN}
    with pytest.raises(ValueError, match="Run without resume"):
        check(tmp_path / "empty", resume=True)


@pytest.mark.parametrize(
    ("files", "what"),
    [
        ({"adapter_config.json": "{}"}, "a PEFT adapter"),
        ({"xlora_config.json": "{}"}, "an X-LoRA model"),
        ({"notes.txt": "mine"}, r"files that no loramix run wrote \(notes.txt\)"),
        ({"training_args.json": '{"command": "train-gate"}'}, "the output of `loramix train-gate`"),
    ],
)
def test_foreign_content_is_refused_whatever_the_flags(tmp_path, files, what):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    for flags in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(ValueError, match=what + r".*Choose a new or empty output folder"):
            check(tmp_path, **flags)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)


def test_overwrite_replaces_only_the_earlier_run(tmp_path):
    start_output(check(tmp_path / "out"), RUN, TrainingConfig())
    out = tmp_path / "out"
    make_checkpoint(out, 4)
    (out / "adapter_config.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    (out / "eval.json").write_text('{"format": "loramix-eval/1"}')  # `loramix eval --out`
    (out / "eval.md").write_text("| stale |")
    (out / ".publish-x1y2").mkdir()  # left by a run killed while publishing
    with pytest.raises(ValueError, match=r"--resume.*--overwrite"):
        check(out)
    plan = check(out, overwrite=True)
    assert (out / "adapter_config.json").exists()  # nothing deleted before the run starts
    start_output(plan, {**RUN, "training": {"lr": 0.2}}, TrainingConfig())
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "training_args.json"]


def test_overwrite_keeps_files_named_like_reports_that_loramix_eval_did_not_write(tmp_path):
    out = tmp_path / "out"
    start_output(check(out), RUN, TrainingConfig())
    (out / "adapter_config.json").write_text("{}")
    (out / "eval.json").write_text('{"mine": true}')
    (out / "eval.md").write_text("my notes")
    start_output(check(out, overwrite=True), RUN, TrainingConfig())
    assert (out / "eval.json").read_text() == '{"mine": true}'
    assert (out / "eval.md").read_text() == "my notes"


def test_resume_names_every_differing_setting(tmp_path):
    out = tmp_path / "out"
    start_output(check(out), RUN, TrainingConfig())
    checkpoint = make_checkpoint(out, 2)
    plan = check(out, resume=True)
    assert plan.resume_from == checkpoint
    other = {"data": [{"path": "/d/b.jsonl", "sha256": "bb"}], "training": {"lr": 0.1}}
    with pytest.raises(ValueError, match=r'data: \[\{"path": "/d/a.jsonl"') as info:
        start_output(plan, other, TrainingConfig())
    assert '-> [{"path": "/d/b.jsonl"' in str(info.value)
    assert start_output(plan, RUN, TrainingConfig())


def test_run_differences_and_finished():
    assert run_differences({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}, "d": 4}) == [
        "a.c: 2 -> 3",
        "d: null -> 4",
    ]
    done = {"status": "finished", "global_step": 6, "training": {"max_steps": 6, "epochs": 1.0}}
    assert finished(done, TrainingConfig(max_steps=6))
    assert not finished(done, TrainingConfig(max_steps=8))  # raised: continue
    assert not finished({**done, "status": "running"}, TrainingConfig(max_steps=6))
    by_epochs = {
        "status": "finished",
        "global_step": 9,
        "training": {"max_steps": None, "epochs": 2},
    }
    assert finished(by_epochs, TrainingConfig(epochs=2))
    assert not finished(by_epochs, TrainingConfig(epochs=3))
