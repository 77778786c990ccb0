"""loramix.formats.classifier: the gate's keys in each format's numbering."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from formats_helpers import GATE_OPTIONS, build
from safetensors.torch import load_file, save_file
from torch import nn

from loramix import XLoraConfig, XLoraGate
from loramix.formats import read_folder
from loramix.formats.classifier import loramix_positions


def test_gate_positions_match_the_gate() -> None:
    for options in GATE_OPTIONS:
        config = XLoraConfig(adapters={"a": "a", "b": "b"}, hidden_size=32, **options)
        model_gate = XLoraGate(config, 32, 4, 2)
        linear = [i for i, m in enumerate(model_gate.layers) if isinstance(m, nn.Linear)]
        assert linear == loramix_positions(config)


def test_classifier_keys_that_fit_no_numbering_name_the_file(
    llama_experts: dict[str, str], tmp_path: Path
) -> None:
    model = build(llama_experts, xlora_depth=3, xlora_size=8)
    model.save_pretrained(tmp_path / "x", format="xlora", base_model_id="tiny")
    path = tmp_path / "x" / "xlora_classifier.safetensors"
    state = load_file(path)
    state["inner.5.weight"] = state.pop("inner.3.weight")
    save_file(state, path)
    with pytest.raises(ValueError, match="inner.\\[0, 3, 5\\]") as error:
        read_folder(tmp_path / "x")
    assert str(path) in str(error.value)
    save_file({"classifier.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="'classifier.weight'"):
        read_folder(tmp_path / "x")
