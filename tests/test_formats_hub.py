"""loramix.formats.hub: X-LoRA models given by Hugging Face Hub id, from a cache (no network)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers import random_ids, tiny_llama

from loramix import XLoraConfig, XLoraModel
from loramix.formats import hub

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(cache: Path, repo_id: str, folder: Path, revision: str = "main") -> Path:
    """Puts `folder` into a Hugging Face cache as the snapshot of `repo_id` at `revision`."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / revision).write_text(COMMIT)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.mark.parametrize("fmt", ["loramix", "xlora", "peft"])
def test_hub_id_loads_from_the_cache(
    fmt: str, llama_experts: dict[str, str], offline_cache: Path, tmp_path: Path
) -> None:
    model = XLoraModel(tiny_llama(), XLoraConfig(adapters=llama_experts, xlora_depth=2))
    with torch.no_grad():
        for param in model.gate.parameters():
            param.normal_()
    model.save_pretrained(tmp_path / "saved", format=fmt, base_model_id="org/base")
    snapshot = cache_repo(offline_cache, "someone/science-xlora", tmp_path / "saved")
    shutil.rmtree(tmp_path / "saved")  # only the cache holds it now (peft: via sub-folders)
    loaded = XLoraModel.from_pretrained(tiny_llama(), "someone/science-xlora")
    ids = random_ids()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0
        )
    assert all(str(snapshot) in p for p in loaded.xlora_config.adapters.values())


def test_revision_and_explicit_cache_dir(
    llama_experts: dict[str, str], offline_cache: Path, tmp_path: Path, monkeypatch
) -> None:
    XLoraModel(tiny_llama(), XLoraConfig(adapters=llama_experts)).save_pretrained(tmp_path / "s")
    other = tmp_path / "other-cache"
    cache_repo(other, "someone/x", tmp_path / "s", revision="v1")
    monkeypatch.delenv("HF_HUB_CACHE")
    path = hub.resolve("someone/x", revision="v1", cache_dir=str(other))
    assert path == other / "models--someone--x" / "snapshots" / COMMIT


def test_missing_from_the_offline_cache_says_where_it_looked(offline_cache: Path) -> None:
    with pytest.raises(FileNotFoundError) as error:
        XLoraModel.from_pretrained(tiny_llama(), "someone/not-there")
    message = str(error.value)
    assert "someone/not-there" in message
    assert "HF_HUB_OFFLINE=1" in message and str(offline_cache) in message


def test_neither_folder_nor_hub_id(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a Hugging Face Hub id"):
        hub.resolve(tmp_path / "no" / "such" / "folder")
