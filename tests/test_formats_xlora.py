"""loramix.formats.xlora: the original xlora package's layout and classifier math."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from formats_helpers import GATE_OPTIONS, build, logits
from helpers import GPT2_TARGETS, random_ids, tiny_gpt2, tiny_llama
from safetensors.torch import load_file, save_file
from torch import nn

from loramix import XLoraConfig, XLoraModel
from loramix.formats import read_folder


class OriginalClassifier(nn.Module):
    """The original package's `xLoRAClassifier` layers (xlora_classifier.py), for reference."""

    def __init__(self, config: XLoraConfig, n_out: int) -> None:
        super().__init__()
        self.inner = nn.ModuleList()
        width = config.hidden_size
        for _ in range(config.xlora_depth - 1):
            self.inner.append(nn.Linear(width, config.xlora_size, bias=config.use_bias))
            if config.enable_relu_and_dropout:
                self.inner.append(nn.ReLU())
                self.inner.append(nn.Dropout(p=config.xlora_dropout_p))
            width = config.xlora_size
        self.last = nn.Linear(width, n_out, bias=config.use_bias)

    def scalings(self, hidden: torch.Tensor, config: XLoraConfig, n_layers: int) -> torch.Tensor:
        for layer in self.inner:
            hidden = layer(hidden)
        logits = self.last(hidden)
        if not config.layerwise_scalings:
            logits = logits.unsqueeze(2).expand(-1, -1, n_layers, -1)
        batch, tokens = hidden.shape[:2]
        scalings = logits.reshape(batch, tokens, n_layers, -1)
        if config.enable_softmax:
            scalings = torch.softmax(scalings / config.softmax_temperature, dim=-1)
        return scalings


@pytest.mark.parametrize("options", GATE_OPTIONS[:4], ids=lambda o: ",".join(o) or "defaults")
def test_original_classifier_file_gives_the_original_scalings(
    options: dict, llama_experts: dict[str, str], tmp_path: Path
) -> None:
    """A classifier built and saved as the original package does, read by loramix."""
    model = build(llama_experts, **options)
    model.save_pretrained(tmp_path / "x", format="xlora", base_model_id="tiny")
    config = XLoraConfig(adapters=llama_experts, hidden_size=32, **options)
    n_out = model.n_experts * (model.n_layers if config.layerwise_scalings else 1)
    reference = OriginalClassifier(config, n_out).eval()
    torch.manual_seed(5)
    with torch.no_grad():
        for param in reference.parameters():
            param.normal_()
    save_file(reference.state_dict(), tmp_path / "x" / "xlora_classifier.safetensors")
    loaded = XLoraModel.from_pretrained(tiny_llama(), tmp_path / "x")
    hidden = torch.randn(2, 5, 32)
    with torch.no_grad():
        theirs = reference.scalings(hidden, config, model.n_layers)
        ours = loaded.gate(hidden)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    n_linear = sum(isinstance(m, nn.Linear) for m in loaded.gate.layers)
    assert n_linear == config.xlora_depth
    has_bias = [m.bias is not None for m in loaded.gate.linear_layers()]
    assert has_bias == [config.use_bias] * config.xlora_depth
    has_relu = any(isinstance(m, nn.ReLU) for m in loaded.gate.layers)
    assert has_relu == (config.enable_relu_and_dropout and config.xlora_depth > 1)


def test_original_classifier_pt_file(llama_experts: dict[str, str], tmp_path: Path) -> None:
    model = build(llama_experts, xlora_depth=2, xlora_size=8)
    model.save_pretrained(tmp_path / "x", format="xlora", base_model_id="tiny")
    state = load_file(tmp_path / "x" / "xlora_classifier.safetensors")
    (tmp_path / "x" / "xlora_classifier.safetensors").unlink()
    torch.save(state, tmp_path / "x" / "xlora_classifier.pt")
    loaded = XLoraModel.from_pretrained(tiny_llama(), tmp_path / "x")
    ids = random_ids()
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), atol=0, rtol=0)


def test_original_layout_files(llama_experts: dict[str, str], tmp_path: Path) -> None:
    model = build(llama_experts, xlora_depth=3, xlora_size=8)
    model.save_pretrained(tmp_path / "x", format="xlora", base_model_id="org/base")
    folder = tmp_path / "x"
    config = json.loads((folder / "xlora_config.json").read_text())
    assert config["adapters"] == ["bio", "chem", "mech"]
    assert config["base_model_id"] == "org/base"
    assert config["enable_relu_and_dropout"] is True and config["use_bias"] is True
    # ReLU and Dropout count in the original numbering: Linear, ReLU, Dropout, Linear, ...
    keys = sorted(load_file(folder / "xlora_classifier.safetensors"))
    assert keys == [
        "inner.0.bias",
        "inner.0.weight",
        "inner.3.bias",
        "inner.3.weight",
        "last.bias",
        "last.weight",
    ]
    for name in config["adapters"]:
        assert (folder / name / "adapter_config.json").is_file()
        assert (folder / name / "adapter_model.safetensors").is_file()
    assert read_folder(folder).base_model_id == "org/base"


def test_original_softmax_topk_difference_is_logged(
    llama_experts: dict[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = build(llama_experts, top_k_lora=2, enable_softmax_topk=True)
    model.save_pretrained(tmp_path / "x", format="xlora", base_model_id="tiny")
    read_folder(tmp_path / "x")
    assert "whole batch" in caplog.text


def test_gpt2_round_trips_through_the_original_layout(
    gpt2_experts: dict[str, str], tmp_path: Path
) -> None:
    model = XLoraModel(tiny_gpt2(), XLoraConfig(adapters=gpt2_experts, xlora_depth=2, xlora_size=8))
    ids = random_ids()
    model.save_pretrained(tmp_path / "x", format="xlora", base_model_id="gpt2")
    loaded = XLoraModel.from_pretrained(tiny_gpt2(), tmp_path / "x")
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), atol=0, rtol=0)
    assert GPT2_TARGETS  # the experts adapt Conv1D modules


def test_adapters_as_a_dict_use_the_sub_folders(
    llama_experts: dict[str, str], tmp_path: Path
) -> None:
    """The paper's configs map adapter names to training-time paths that no longer exist."""
    model = build(llama_experts)
    folder = tmp_path / "x"
    model.save_pretrained(folder, format="xlora", base_model_id="tiny")
    config = json.loads((folder / "xlora_config.json").read_text())
    config["adapters"] = {name: f"./gone/checkpoint-{name}" for name in config["adapters"]}
    (folder / "xlora_config.json").write_text(json.dumps(config))
    loaded = XLoraModel.from_pretrained(tiny_llama(), folder)
    assert loaded.expert_names == ["bio", "chem", "mech"]
    ids = random_ids()
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), atol=0, rtol=0)
    shutil.rmtree(folder / "chem")
    with pytest.raises(FileNotFoundError, match="adapters\[.chem.\]: neither the sub-folder"):
        read_folder(folder)
