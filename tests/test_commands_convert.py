"""`loramix convert`: files-only conversion between formats, and with a base model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import LLAMA_TARGETS, make_expert, random_ids
from tiny_tokenizer import save_tiny_model, tiny_llama, tiny_tokenizer

from loramix import XLoraConfig, XLoraModel
from loramix.cli import main
from loramix.records import base_to_load, named_base_record
from loramix.smollm2 import load_base_model


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(base model folder, loramix X-LoRA folder) for a tiny Llama with two experts."""
    root = tmp_path_factory.mktemp("convert")
    base_dir = save_tiny_model(root / "base")
    vocab = len(tiny_tokenizer())

    def factory() -> torch.nn.Module:
        return tiny_llama(vocab)

    experts = {
        name: str(make_expert(factory, root / name, seed, LLAMA_TARGETS, rank=4))
        for seed, name in enumerate(["math", "chem"], start=1)
    }
    model = XLoraModel(
        load_base_model(base_dir)[0], XLoraConfig(adapters=experts, xlora_depth=2, xlora_size=8)
    )
    with torch.no_grad():
        for param in model.gate.parameters():
            param.normal_()
    model.save_pretrained(root / "xlora")
    return base_dir, root / "xlora"


def logits_of(base_dir: Path, folder: Path) -> torch.Tensor:
    model = XLoraModel.from_pretrained(load_base_model(base_dir)[0], folder)
    with torch.no_grad():
        return model(input_ids=random_ids(2, 9)).logits


def test_files_only_chain_keeps_the_logits(
    folders: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    base_dir, source = folders
    expected = logits_of(base_dir, source)
    previous = source
    for fmt in ("xlora", "peft", "loramix"):
        target = tmp_path / fmt
        argv = ["convert", str(previous), str(target), "--to", fmt, "--base-model-id", "org/b"]
        assert main(argv) == 0
        assert "from the files alone" in capsys.readouterr().out
        torch.testing.assert_close(logits_of(base_dir, target), expected, atol=0, rtol=0)
        previous = target
    assert XLoraModel.from_pretrained(load_base_model(base_dir)[0], previous).expert_names == [
        "math",
        "chem",
    ]


def test_the_recorded_base_travels_through_every_format(
    folders: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    base_dir, source = folders
    recorded = json.loads((source / "base_model.json").read_text())
    assert recorded["name"] == str(base_dir.resolve())
    assert main(["convert", str(source), str(tmp_path / "same"), "--to", "loramix"]) == 0
    assert json.loads((tmp_path / "same" / "base_model.json").read_text()) == recorded
    previous = source
    for fmt in ("xlora", "peft", "loramix"):  # no --base-model-id: the record is carried
        target = tmp_path / fmt
        assert main(["convert", str(previous), str(target), "--to", fmt]) == 0
        assert base_to_load(target, None) == recorded["name"]  # what generate and eval load
        previous = target
    assert json.loads((previous / "base_model.json").read_text()) == named_base_record(base_dir)
    unrecorded = tmp_path / "unrecorded"
    shutil.copytree(source, unrecorded)
    (unrecorded / "base_model.json").unlink()
    capsys.readouterr()
    assert main(["convert", str(unrecorded), str(tmp_path / "x"), "--to", "xlora"]) == 2
    assert "(convert: --base-model-id)" in capsys.readouterr().err


def test_mistralrs_needs_the_base(
    folders: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    base_dir, source = folders
    argv = ["convert", str(source), str(tmp_path / "m"), "--to", "mistralrs"]
    assert main([*argv, "--base-model-id", "org/b"]) == 2
    assert "--base" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    assert main([*argv, "--base", str(base_dir), "--base-model-id", "org/b"]) == 0
    assert "checked against the base model" in capsys.readouterr().out
    ordering = json.loads((tmp_path / "m" / "ordering.json").read_text())
    assert ordering["order"] == ["math", "chem"] and ordering["base_model_id"] == "org/b"
    torch.testing.assert_close(
        logits_of(base_dir, tmp_path / "m"), logits_of(base_dir, source), atol=1e-5, rtol=0
    )


def test_bad_source_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["convert", str(tmp_path), str(tmp_path / "out"), "--to", "peft"]) == 2
    assert "holds no X-LoRA model" in capsys.readouterr().err


def tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


@pytest.mark.parametrize("where", ["same", "inside"])
def test_target_in_the_source_is_refused(
    folders: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture, where: str
) -> None:
    source = tmp_path / "src"
    shutil.copytree(folders[1], source)
    before = tree(source)
    target = source if where == "same" else source / "sub"
    assert main(["convert", str(source), str(target), "--to", "loramix"]) == 2
    err = capsys.readouterr().err
    expected = "is the source folder" if where == "same" else "is inside the source folder"
    assert f"the target {target} {expected} {source}; write to a folder outside it" in err
    assert tree(source) == before and sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_convert_into_an_existing_folder_keeps_the_users_files(
    folders: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    base_dir, source = folders
    target = tmp_path / "out"
    (target / "results").mkdir(parents=True)
    (target / "results" / "my_notes.txt").write_text("keep me")
    argv = ["convert", str(source), str(target), "--base-model-id", "org/b"]
    assert main([*argv, "--to", "xlora"]) == 0
    assert (target / "results" / "my_notes.txt").read_text() == "keep me"
    torch.testing.assert_close(
        logits_of(base_dir, target), logits_of(base_dir, source), atol=1e-5, rtol=0
    )
    before = tree(target)
    capsys.readouterr()
    assert main([*argv, "--to", "peft"]) == 2  # another format's X-LoRA is there
    err = capsys.readouterr().err
    assert f"{target} holds an X-LoRA in the xlora package's format" in err
    assert "save with format='xlora' (convert: --to xlora) to replace that X-LoRA" in err
    assert tree(target) == before
