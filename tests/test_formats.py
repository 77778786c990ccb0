"""loramix.formats: format detection, round trips through every format, from_pretrained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from formats_helpers import GATE_OPTIONS, build, logits
from helpers import random_ids, tiny_llama

from loramix import XLoraModel
from loramix.formats import FORMATS, detect_format, read_folder


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("options", GATE_OPTIONS, ids=lambda o: ",".join(o) or "defaults")
def test_round_trip_gives_identical_logits(
    fmt: str, options: dict, llama_experts: dict[str, str], tmp_path: Path
) -> None:
    if fmt == "peft" and not options.get("use_bias", True):
        pytest.skip("peft's gate always has biases (refusal tested below)")
    model = build(llama_experts, **options)
    ids = random_ids(2, 9)
    before = logits(model, ids)
    model.save_pretrained(tmp_path / "out", format=fmt, base_model_id="tiny-llama")
    assert detect_format(tmp_path / "out") == fmt
    loaded = XLoraModel.from_pretrained(tiny_llama(), tmp_path / "out")
    after = logits(loaded, ids)
    if fmt == "mistralrs":  # zero-padded ranks and gate width: equal up to summation order
        torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    else:
        torch.testing.assert_close(after, before, atol=0, rtol=0)
    if fmt != "mistralrs":
        assert loaded.expert_names == model.expert_names
    assert loaded.adapted_modules == model.adapted_modules


def test_unknown_folder_names_what_each_format_needs(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as error:
        read_folder(tmp_path)
    for name in ("gate.safetensors", "adapter_config.json", "xlora_classifier.safetensors"):
        assert name in str(error.value)


def test_from_pretrained_refuses_unknown_keywords(llama_experts: dict, tmp_path: Path) -> None:
    build(llama_experts).save_pretrained(tmp_path / "s")
    with pytest.raises(TypeError, match="\\['revison'\\]"):
        XLoraModel.from_pretrained(tiny_llama(), tmp_path / "s", revison="main")
    with pytest.raises(ValueError, match="dtype apply when loramix loads the base model"):
        XLoraModel.from_pretrained(tiny_llama(), tmp_path / "s", dtype=torch.float16)
    with pytest.raises(ValueError, match="revision='v1' applies to a Hub id"):
        XLoraModel.from_pretrained(tiny_llama(), tmp_path / "s", revision="v1")


def test_base_model_by_folder_and_by_the_files_name(
    llama_experts: dict[str, str], tmp_path: Path
) -> None:
    tiny_llama().save_pretrained(tmp_path / "base")
    model = build(llama_experts)
    ids = random_ids()
    model.save_pretrained(tmp_path / "x", format="xlora", base_model_id=str(tmp_path / "base"))
    by_name = XLoraModel.from_pretrained(None, tmp_path / "x")
    torch.testing.assert_close(logits(by_name, ids), logits(model, ids), atol=0, rtol=0)
    half = XLoraModel.from_pretrained(tmp_path / "base", tmp_path / "x", torch_dtype=torch.float16)
    assert half.lm.dtype == torch.float16
    with pytest.raises(ValueError, match="name no base model"):
        model.save_pretrained(tmp_path / "l")
        XLoraModel.from_pretrained(None, tmp_path / "l")


def test_files_only_conversion_checks_the_gate_keys(
    llama_experts: dict[str, str], tmp_path: Path
) -> None:
    from loramix.formats import convert

    build(llama_experts, xlora_depth=2).save_pretrained(tmp_path / "s")
    config = json.loads((tmp_path / "s" / "xlora_config.json").read_text())
    config["xlora_depth"] = 1
    (tmp_path / "s" / "xlora_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unexpected keys \\['layers.3.bias'"):
        convert(tmp_path / "s", tmp_path / "t", "xlora", base_model_id="tiny")
    assert not (tmp_path / "t").exists()
