"""loramix.formats.peft: what peft's PeftModel.from_pretrained loads."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from formats_helpers import build, logits
from helpers import random_ids, tiny_gpt2, tiny_llama
from peft import PeftModel

from loramix import XLoraConfig, XLoraModel


def test_peft_loads_what_loramix_wrote(llama_experts: dict[str, str], tmp_path: Path) -> None:
    model = build(llama_experts, xlora_depth=3, xlora_size=16, layerwise_scalings=True)
    model.save_pretrained(tmp_path / "peft", format="peft")
    base = tiny_llama()
    base.config.use_cache = False  # peft's X-LoRA refuses a base with the cache on
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    ids = random_ids(2, 9)
    torch.testing.assert_close(logits(theirs, ids), logits(model, ids), atol=1e-5, rtol=0)
    written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert list(written["adapters"]) == ["0", "1", "2"]
    assert all(Path(p).is_absolute() for p in written["adapters"].values())


def test_moved_peft_folder_falls_back_to_its_sub_folders(
    llama_experts: dict[str, str], tmp_path: Path
) -> None:
    model = build(llama_experts)
    model.save_pretrained(tmp_path / "a", format="peft")
    (tmp_path / "a").rename(tmp_path / "b")
    loaded = XLoraModel.from_pretrained(tiny_llama(), tmp_path / "b")
    assert loaded.expert_names == ["bio", "chem", "mech"]
    assert all(str(tmp_path / "b") in path for path in loaded.xlora_config.adapters.values())


def test_peft_refuses_what_it_cannot_load(
    llama_experts: dict[str, str], gpt2_experts: dict[str, str], tmp_path: Path
) -> None:
    model = build(llama_experts, xlora_depth=2, xlora_size=8, use_bias=False)
    with pytest.raises(ValueError, match="use_bias=False.*format='xlora'"):
        model.save_pretrained(tmp_path / "p", format="peft")
    gpt2 = XLoraModel(tiny_gpt2(), XLoraConfig(adapters=gpt2_experts))
    with pytest.raises(ValueError, match="do not start with 'model.'"):
        gpt2.save_pretrained(tmp_path / "p", format="peft")
    assert not (tmp_path / "p").exists()  # nothing written
