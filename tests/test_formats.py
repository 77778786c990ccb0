"""loramix.formats: peft's, the original xlora package's and mistral.rs's X-LoRA folders."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import GPT2_TARGETS, LLAMA_TARGETS, make_expert, random_ids, tiny_gpt2, tiny_llama
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn

from loramix import XLoraConfig, XLoraModel
from loramix.formats import FORMATS, detect_format, read_folder
from loramix.formats.classifier import loramix_positions

GATE_OPTIONS = [
    {},
    {"xlora_depth": 2, "xlora_size": 16, "layerwise_scalings": True},
    {"xlora_depth": 3, "xlora_size": 32, "xlora_dropout_p": 0.0},
    {"xlora_depth": 3, "xlora_size": 8, "enable_relu_and_dropout": False, "use_bias": False},
    {"top_k_lora": 2, "scaling_pass_value": 0.25, "global_scaling_weight": 0.6},
]


def build(experts: dict[str, str], seed: int = 0, **options) -> XLoraModel:
    model = XLoraModel(tiny_llama(), XLoraConfig(adapters=experts, **options))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.gate.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
    return model


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---------------------------------------------------------------- the gate's options


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


def test_gate_positions_match_the_gate() -> None:
    for options in GATE_OPTIONS:
        config = XLoraConfig(adapters={"a": "a", "b": "b"}, hidden_size=32, **options)
        model_gate = __import__("loramix").XLoraGate(config, 32, 4, 2)
        linear = [i for i, m in enumerate(model_gate.layers) if isinstance(m, nn.Linear)]
        assert linear == loramix_positions(config)


# ----------------------------------------------------------------- round trips


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


# ---------------------------------------------------------------------- refusals


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


def test_gpt2_round_trips_through_the_original_layout(
    gpt2_experts: dict[str, str], tmp_path: Path
) -> None:
    model = XLoraModel(tiny_gpt2(), XLoraConfig(adapters=gpt2_experts, xlora_depth=2, xlora_size=8))
    ids = random_ids()
    model.save_pretrained(tmp_path / "x", format="xlora", base_model_id="gpt2")
    loaded = XLoraModel.from_pretrained(tiny_gpt2(), tmp_path / "x")
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), atol=0, rtol=0)
    assert GPT2_TARGETS  # the experts adapt Conv1D modules


def test_base_folder_for_mistralrs(llama_experts: dict[str, str], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from loramix.formats.mistralrs import write_base_folder

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
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


def test_original_softmax_topk_difference_is_logged(
    llama_experts: dict[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = build(llama_experts, top_k_lora=2, enable_softmax_topk=True)
    model.save_pretrained(tmp_path / "x", format="xlora", base_model_id="tiny")
    read_folder(tmp_path / "x")
    assert "whole batch" in caplog.text


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


def test_mistralrs_refuses_an_adapted_output_layer(tmp_path: Path) -> None:
    experts = {"e": str(make_expert(tiny_llama, tmp_path / "e", 1, ["q_proj", "lm_head"]))}
    with pytest.raises(ValueError, match="output layer \\['lm_head'\\]"):
        build(experts).save_pretrained(tmp_path / "m", format="mistralrs", base_model_id="x")
