"""Tests of loramix.training.trainer: config validation, checkpoints, atomic publishing."""

from __future__ import annotations

from pathlib import Path

import pytest

from loramix.training.trainer import TrainingConfig, last_checkpoint, publish

FINAL = ("adapter_config.json", "adapter_model.safetensors")


def test_config_collects_every_problem_with_its_fix():
    with pytest.raises(ValueError) as info:
        TrainingConfig(lr=0, batch_size=0, eval_fraction=1.0, lr_scheduler="step")
    message = str(info.value)
    assert "lr=0: use a positive learning rate" in message
    assert "batch_size=0: use a whole number >= 1" in message
    assert "eval_fraction=1.0: use a fraction in [0, 1)" in message
    assert "lr_scheduler='step': use one of" in message


def make_checkpoint(checkpoints: Path, step: int, complete: bool = True) -> Path:
    folder = checkpoints / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    if complete:
        (folder / "trainer_state.json").write_text("{}")
    return folder


def test_last_checkpoint_skips_incomplete(tmp_path):
    make_checkpoint(tmp_path, 2)
    good = make_checkpoint(tmp_path, 10)
    make_checkpoint(tmp_path, 12, complete=False)  # interrupted while saving
    assert last_checkpoint(tmp_path) == good
    assert last_checkpoint(tmp_path / "missing") is None


def test_publish_replaces_files_and_leaves_no_temp(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_config.json").write_text("old")

    def write(folder: Path) -> None:
        (folder / "adapter_model.safetensors").write_text("weights")
        (folder / "adapter_config.json").write_text("new")

    published = publish(out, write, marker="adapter_config.json")
    assert {p.name for p in published} == set(FINAL)
    assert (out / "adapter_config.json").read_text() == "new"
    assert sorted(p.name for p in out.iterdir()) == sorted(FINAL)  # no .publish-* left


def test_publish_without_marker_changes_nothing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_config.json").write_text("old")
    with pytest.raises(ValueError, match="wrote no adapter_config.json"):
        publish(out, lambda f: (f / "x.bin").write_text("x"), marker="adapter_config.json")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json"]
    assert (out / "adapter_config.json").read_text() == "old"


def test_publish_after_interrupted_write_keeps_old_result(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_config.json").write_text("old")

    def crash(folder: Path) -> None:
        (folder / "adapter_model.safetensors").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        publish(out, crash, marker="adapter_config.json")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json"]


def test_report_to_needs_its_package_and_reaches_the_trainer(monkeypatch, tmp_path: Path):
    import importlib.util

    from loramix.training.trainer import training_arguments

    with pytest.raises(ValueError, match="report_to='nowhere': use one of none, tensorboard"):
        TrainingConfig(report_to="nowhere")
    original = importlib.util.find_spec

    def installed(packages):
        def find_spec(name, *args):
            if name in ("wandb", "tensorboard"):
                return object() if name in packages else None
            return original(name, *args)

        return find_spec

    monkeypatch.setattr(importlib.util, "find_spec", installed(()))
    with pytest.raises(ValueError, match=r"wandb package is not installed; .*pip install wandb"):
        TrainingConfig(report_to="wandb")
    monkeypatch.setattr(importlib.util, "find_spec", installed(("tensorboard",)))
    config = TrainingConfig(report_to="tensorboard", device="cpu")
    arguments = training_arguments(config, tmp_path, has_eval=False)
    assert arguments.report_to == ["tensorboard"] and arguments.use_cpu
    assert training_arguments(TrainingConfig(), tmp_path, has_eval=False).report_to == []
