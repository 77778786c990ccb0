"""loramix.saving: save/load round trips, peft-readable experts, atomic writes, file errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_expert, random_ids, tiny_llama
from peft import PeftModel

from loramix import XLoraConfig, XLoraModel


def randomize_gate(model: XLoraModel, seed: int = 0, std: float = 1.0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.gate.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * std)


def test_save_load_bit_identical(llama_experts: dict[str, str], tmp_path: Path) -> None:
    config = XLoraConfig(adapters=llama_experts, layerwise_scalings=True, xlora_depth=2)
    model = XLoraModel(tiny_llama(), config)
    randomize_gate(model, seed=5, std=0.3)
    model.set_topk_lora(2)
    model.save_pretrained(tmp_path / "saved")
    for path in llama_experts.values():  # the folder must be self-contained
        shutil.rmtree(path)
    reloaded = XLoraModel.from_pretrained(tiny_llama(), tmp_path / "saved")
    assert reloaded.top_k_lora == 2
    assert reloaded.expert_names == model.expert_names
    ids = random_ids(2, 10)
    with torch.no_grad():
        first, second = model(input_ids=ids), reloaded(input_ids=ids)
    assert torch.equal(first.logits, second.logits)
    assert torch.equal(first.scalings, second.scalings)
    saved = json.loads((tmp_path / "saved" / "xlora_config.json").read_text())
    assert saved["adapters"] == {name: f"experts/{name}" for name in llama_experts}


def test_saved_experts_load_in_peft(llama_experts: dict[str, str], tmp_path: Path) -> None:
    model = XLoraModel(tiny_llama(), XLoraConfig(adapters=llama_experts))
    model.save_pretrained(tmp_path / "saved")
    ids = random_ids()
    for name, original in llama_experts.items():
        copy = PeftModel.from_pretrained(tiny_llama(), tmp_path / "saved" / "experts" / name)
        reference = PeftModel.from_pretrained(tiny_llama(), original)
        with torch.no_grad():
            assert torch.equal(copy(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_save_overwrites_atomically(llama_experts: dict[str, str], tmp_path: Path) -> None:
    model = XLoraModel(tiny_llama(), XLoraConfig(adapters=llama_experts))
    target = tmp_path / "saved"
    model.save_pretrained(target)
    randomize_gate(model, seed=9)
    model.save_pretrained(target)
    reloaded = XLoraModel.from_pretrained(tiny_llama(), target)
    assert torch.equal(reloaded.gate.layers[0].weight, model.gate.layers[0].weight)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "saved") == sorted(
        ["bio", "chem", "mech"]
    )  # no temporary folders left behind


def test_scalings_log(llama_experts: dict[str, str], tmp_path: Path) -> None:

    model = XLoraModel(tiny_llama(), XLoraConfig(adapters=llama_experts))
    model(input_ids=random_ids())
    assert model.get_scalings_log() == []
    model.enable_scalings_logging()
    model(input_ids=random_ids(1, 5))
    model(input_ids=random_ids(2, 3))
    log = model.get_scalings_log()
    assert [tuple(s.shape) for s in log] == [(1, 5, 14, 3), (2, 3, 14, 3)]
    model.disable_scalings_logging()
    model(input_ids=random_ids())
    assert len(model.get_scalings_log()) == 2
    model.save_scalings_log(tmp_path / "log.npz")
    with np.load(tmp_path / "log.npz") as saved:
        np.testing.assert_allclose(saved["scalings_1"], log[1].numpy())
        assert list(saved["expert_names"]) == ["bio", "chem", "mech"]
    model.clear_scalings_log()
    assert model.get_scalings_log() == []


def test_corrupt_weights_name_the_file(tmp_path: Path) -> None:
    folder = make_expert(tiny_llama, tmp_path / "bad", 1, ["q_proj"])
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt") as error:
        XLoraModel(tiny_llama(), XLoraConfig(adapters={"b": str(folder)}))
    assert str(weights) in str(error.value)


def test_missing_weights_and_folder(tmp_path: Path) -> None:
    folder = make_expert(tiny_llama, tmp_path / "gone", 1, ["q_proj"])
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        XLoraModel(tiny_llama(), XLoraConfig(adapters={"g": str(folder)}))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        XLoraModel(tiny_llama(), XLoraConfig(adapters={"g": str(tmp_path / "nowhere")}))


def test_gate_weights_that_do_not_fit(llama_experts: dict[str, str], tmp_path: Path) -> None:
    XLoraModel(tiny_llama(), XLoraConfig(adapters=llama_experts)).save_pretrained(tmp_path / "s")
    config_path = tmp_path / "s" / "xlora_config.json"
    config = json.loads(config_path.read_text())
    config["layerwise_scalings"] = True
    config_path.write_text(json.dumps(config))
    base = tiny_llama()
    with pytest.raises(ValueError, match=r"gate weight layers\.0\.\w+ has shape"):
        XLoraModel.from_pretrained(base, tmp_path / "s")
    assert type(base.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # restored
