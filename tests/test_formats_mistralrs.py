"""loramix.formats.mistralrs: the files mistral.rs's X-LoRA loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from formats_helpers import build, logits
from helpers import LLAMA_TARGETS, TINY_DECODER, make_expert, random_ids, tiny_llama
from safetensors.torch import load_file

from loramix import XLoraConfig, XLoraModel


def test_mistralrs_layout_files(llama_experts: dict[str, str], tmp_path: Path) -> None:
    model = build(llama_experts, xlora_depth=3, xlora_size=8)
    model.save_pretrained(tmp_path / "m", format="mistralrs", base_model_id="org/base")
    folder = tmp_path / "m"
    assert not [p for p in folder.iterdir() if p.is_dir()]  # flat: no sub-folders
    ordering = json.loads((folder / "ordering.json").read_text())
    assert ordering["order"] == ["bio", "chem", "mech"]
    assert ordering["base_model_id"] == "org/base"
    names = [n for n, m in tiny_llama().named_modules() if n.rsplit(".", 1)[-1] in LLAMA_TARGETS]
    assert ordering["layers"] == {name: i for i, name in enumerate(names)}
    config = json.loads((folder / "xlora_config.json").read_text())
    assert config["xlora_dropout_p"] == 0.0  # mistral.rs applies it at inference
    assert config["xlora_size"] == 32  # hidden_size: its last layer is sized from it
    assert config["enable_relu_and_dropout"] is True  # its default is false
    classifier = load_file(folder / "xlora_classifier.safetensors")
    assert sorted(classifier) == [
        f"{p}.{w}" for p in ("inner.0", "inner.1", "last") for w in ("bias", "weight")
    ]
    assert classifier["inner.0.weight"].shape == (32, 32)
    assert classifier["last.weight"].shape == (3, 32)
    configs = [
        json.loads((folder / f"{n}_adapter_config.json").read_text()) for n in ordering["order"]
    ]
    assert {tuple(c["target_modules"]) for c in configs} == {tuple(sorted(LLAMA_TARGETS))}
    for name, config in zip(ordering["order"], configs, strict=True):
        state = load_file(folder / f"{name}_adapter_model.safetensors")
        assert len(state) == 2 * len(names)  # every expert on every module
        assert {t.shape[0] for k, t in state.items() if "lora_A" in k} == {config["r"]}


def test_mistralrs_names_that_match_other_files_are_replaced(tmp_path: Path) -> None:
    experts = {
        "a": str(make_expert(tiny_llama, tmp_path / "e1", 1, ["q_proj"])),
        "ab": str(make_expert(tiny_llama, tmp_path / "e2", 2, ["q_proj"])),
    }
    model = build(experts)
    model.save_pretrained(tmp_path / "m", format="mistralrs", base_model_id="org/base")
    ordering = json.loads((tmp_path / "m" / "ordering.json").read_text())
    assert ordering["order"] == ["expert_0", "expert_1"]
    for name in ordering["order"]:
        matching = [p.name for p in (tmp_path / "m").iterdir() if name in p.name]
        assert sorted(matching) == [
            f"{name}_adapter_config.json",
            f"{name}_adapter_model.safetensors",
        ]


def test_mistralrs_folds_per_module_scales(tmp_path: Path) -> None:
    experts = {
        "alpha": str(make_expert(tiny_llama, tmp_path / "rs", 1, LLAMA_TARGETS, use_rslora=True)),
        "beta": str(
            make_expert(
                tiny_llama,
                tmp_path / "pat",
                2,
                LLAMA_TARGETS,
                rank_pattern={"q_proj": 2},
                alpha_pattern={"v_proj": 3},
            )
        ),
    }
    model = build(experts)
    ids = random_ids()
    model.save_pretrained(tmp_path / "m", format="mistralrs", base_model_id="org/base")
    config = json.loads((tmp_path / "m" / "beta_adapter_config.json").read_text())
    assert config["lora_alpha"] == config["r"] == 4 and not config["use_rslora"]
    loaded = XLoraModel.from_pretrained(tiny_llama(), tmp_path / "m")
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), atol=1e-5, rtol=0)


def test_mistralrs_refusals(tmp_path: Path) -> None:
    experts = {
        "e": str(make_expert(tiny_llama, tmp_path / "e", 1, ["q_proj"], layers_to_transform=[0]))
    }
    model = build(experts)
    with pytest.raises(ValueError, match="layers_to_transform"):
        model.save_pretrained(tmp_path / "m", format="mistralrs", base_model_id="x")
    model = build(
        {"e": str(make_expert(tiny_llama, tmp_path / "f", 1, ["q_proj"]))},
        xlora_depth=2,
        xlora_size=64,
    )
    with pytest.raises(ValueError, match="xlora_size=64 is wider than 32"):
        model.save_pretrained(tmp_path / "m", format="mistralrs", base_model_id="x")
    with pytest.raises(ValueError, match="base_model_id="):
        model.save_pretrained(tmp_path / "m", format="xlora")
    with pytest.raises(ValueError, match="use one of"):
        model.save_pretrained(tmp_path / "m", format="onnx")
    assert not (tmp_path / "m").exists()


def test_mistralrs_refuses_an_adapted_output_layer(tmp_path: Path) -> None:
    experts = {"e": str(make_expert(tiny_llama, tmp_path / "e", 1, ["q_proj", "lm_head"]))}
    with pytest.raises(ValueError, match="output layer \\['lm_head'\\]"):
        build(experts).save_pretrained(tmp_path / "m", format="mistralrs", base_model_id="x")


def test_base_folder_for_mistralrs(llama_experts: dict[str, str], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from loramix.formats.mistralrs import write_base_folder

    torch.manual_seed(0)
    config = LlamaConfig(**TINY_DECODER, tie_word_embeddings=True)
    base = LlamaForCausalLM(config).eval()
    write_base_folder(base, tmp_path / "base")
    state = load_file(tmp_path / "base" / "model.safetensors")
    assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    written = json.loads((tmp_path / "base" / "config.json").read_text())
    assert written["rope_theta"] == config.rope_parameters["rope_theta"]
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    ids = random_ids()
    torch.testing.assert_close(logits(again, ids), logits(base, ids), atol=0, rtol=0)
    wrapped = XLoraModel(base, XLoraConfig(adapters=llama_experts))
    with pytest.raises(ValueError, match="unload"):
        write_base_folder(wrapped.lm, tmp_path / "other")
