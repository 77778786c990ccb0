"""loramix.formats.existing: saving into an existing folder, the same way in every format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from formats_helpers import build, logits
from helpers import random_ids, tiny_llama

from loramix import XLoraModel
from loramix.formats import FORMATS, read_folder

BASE_ID = "org/tiny-llama"
OTHER_KINDS = {
    "transformers": ({"config.json": "{}"}, "a transformers model (config.json)"),
    "peft adapter": (
        {"adapter_config.json": json.dumps({"peft_type": "LORA"})},
        "a PEFT adapter (adapter_config.json)",
    ),
}


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes, and every folder (as b"<dir>")."""
    return {
        p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else b"<dir>")
        for p in sorted(folder.rglob("*"))
    }


def save(model: XLoraModel, folder: Path, fmt: str) -> None:
    model.save_pretrained(folder, format=fmt, base_model_id=BASE_ID)


def add_user_files(folder: Path) -> dict[str, bytes]:
    (folder / "results").mkdir(parents=True, exist_ok=True)
    (folder / "results" / "my_notes.txt").write_text("keep me")
    (folder / "README.md").write_text("my model card")
    return {"results/my_notes.txt": b"keep me", "README.md": b"my model card"}


@pytest.mark.parametrize("fmt", FORMATS)
def test_user_files_survive_and_a_smaller_resave_leaves_no_stale_files(
    llama_experts: dict[str, str], tmp_path: Path, fmt: str
) -> None:
    target = tmp_path / "out"
    user = add_user_files(target)
    model = build(llama_experts)
    save(model, target, fmt)
    assert {k: v for k, v in tree(target).items() if k in user} == user
    files = read_folder(target)
    assert files.format == fmt and list(files.config.adapters) == ["bio", "chem", "mech"]
    ids = random_ids()
    reloaded = XLoraModel.from_pretrained(tiny_llama(), target)
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), atol=1e-5, rtol=0)

    two = build({name: llama_experts[name] for name in ("bio", "chem")}, seed=3)
    save(two, target, fmt)
    save(two, tmp_path / "fresh", fmt)  # what the same save writes into a new folder
    fresh = set(tree(tmp_path / "fresh"))
    after = tree(target)
    assert set(after) - set(user) - {"results"} == fresh  # no stale file of the first save
    assert {k: v for k, v in after.items() if k in user} == user
    assert list(read_folder(target).config.adapters) == ["bio", "chem"]
    reloaded = XLoraModel.from_pretrained(tiny_llama(), target)
    torch.testing.assert_close(logits(reloaded, ids), logits(two, ids), atol=1e-5, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_folder_of_another_kind_is_refused_unchanged(
    llama_experts: dict[str, str], tmp_path: Path, fmt: str
) -> None:
    model = build(llama_experts)
    folders = {}
    for kind, (files, what) in OTHER_KINDS.items():
        folder = tmp_path / kind.replace(" ", "_")
        folder.mkdir()
        for name, text in files.items():
            (folder / name).write_text(text)
        folders[kind] = (folder, what)
    for other in FORMATS:
        if other != fmt:
            save(model, tmp_path / f"x_{other}", other)
            add_user_files(tmp_path / f"x_{other}")
            folders[other] = (tmp_path / f"x_{other}", f"format={other!r}")
    for kind, (folder, what) in folders.items():
        before = tree(folder)
        with pytest.raises(ValueError, match="Nothing was written") as error:
            save(model, folder, fmt)
        assert what in str(error.value) and str(folder) in str(error.value), kind
        assert tree(folder) == before, kind
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_a_file_in_the_way_is_named_and_nothing_changes(
    llama_experts: dict[str, str], tmp_path: Path
) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "0").write_text("a file where peft writes the first expert's folder")
    before = tree(target)
    with pytest.raises(ValueError, match=r"out/0 is in the way .* Nothing was written"):
        save(build(llama_experts), target, "peft")
    assert tree(target) == before


def test_mistralrs_refuses_files_it_would_take_for_an_adapters(
    llama_experts: dict[str, str], tmp_path: Path
) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "bio_notes.txt").write_text("mistral.rs would parse me as bio's adapter config")
    before = tree(target)
    with pytest.raises(ValueError, match=r"holds \['bio_notes.txt'\], whose names contain"):
        save(build(llama_experts), target, "mistralrs")
    assert tree(target) == before
    save(build(llama_experts), target, "xlora")  # the xlora package reads exact file names
    assert (target / "bio_notes.txt").is_file()
