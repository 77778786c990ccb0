"""Quantized bases: bitsandbytes 4-bit (nf4, fp4) and 8-bit on its CPU backend, torchao int8
weight-only. One expert equals peft's LoRA over the same quantized base; frozen generation
works; merged generation is refused with the way out.

Dimensions are multiples of 64 so that every weight fits bitsandbytes' quantization blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import make_expert
from peft import PeftModel
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from loramix import XLoraConfig, XLoraModel
from loramix.generation import quantized_modules

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
from transformers import BitsAndBytesConfig  # noqa: E402  (after the skip)

VOCAB = 97
SCHEMES = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}


def float_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The float base model saved once, and two all-linear experts trained on it."""
    root = tmp_path_factory.mktemp("quantized")
    float_llama().save_pretrained(root / "base")
    return {
        "base": root / "base",
        "a": make_expert(float_llama, root / "a", 1, "all-linear", rank=4),
        "b": make_expert(float_llama, root / "b", 2, "all-linear", rank=2, alpha=4),
    }


def quantized_factory(folders: dict[str, Path], scheme: str) -> Callable[[], torch.nn.Module]:
    def load() -> torch.nn.Module:
        config = BitsAndBytesConfig(**SCHEMES[scheme])
        model = AutoModelForCausalLM.from_pretrained(
            folders["base"], quantization_config=config, device_map="cpu"
        )
        return model.eval()

    return load


def ids(batch: int = 2, tokens: int = 7) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(3, VOCAB, (batch, tokens), generator=generator)


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_one_expert_equals_peft_over_bitsandbytes(folders, scheme: str) -> None:
    load = quantized_factory(folders, scheme)
    model = XLoraModel(load(), XLoraConfig(adapters={"a": str(folders["a"])}))
    assert len(quantized_modules(model)) == model.n_layers == 2 * 7
    for module in model.mixed_modules():  # never the storage dtype (uint8 / int8)
        assert module.base_layer.weight.dtype in (torch.uint8, torch.int8)
        assert module.lora_a.dtype == module.lora_b.dtype == torch.float32
    reference = PeftModel.from_pretrained(load(), folders["a"]).eval()
    inputs = ids()
    with torch.no_grad():
        base = load()(input_ids=inputs).logits
        theirs = reference(input_ids=inputs).logits
        with model.fixed_scalings(torch.tensor([1.0])):
            ours = model(input_ids=inputs).logits
    assert not torch.allclose(theirs, base, atol=1e-3)  # the expert matters
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_frozen_generation_over_bitsandbytes(folders, scheme: str) -> None:
    """A gate with constant scalings: frozen mode must give granular mode's tokens and logits."""
    adapters = {"a": str(folders["a"]), "b": str(folders["b"])}
    model = XLoraModel(quantized_factory(folders, scheme)(), XLoraConfig(adapters=adapters))
    with torch.no_grad():
        model.gate.layers[-1].weight.zero_()
        model.gate.layers[-1].bias.copy_(torch.tensor([0.3, -0.4]))
    model.generation_config.eos_token_id = None
    kwargs = dict(max_new_tokens=4, do_sample=False, output_logits=True)
    prompt = ids(1, 6)
    granular = model.generate(prompt, return_dict_in_generate=True, **kwargs)
    frozen = model.generate(prompt, scalings_mode="frozen", return_dict_in_generate=True, **kwargs)
    assert torch.equal(frozen.sequences, granular.sequences)
    torch.testing.assert_close(
        torch.stack(frozen.logits, 1), torch.stack(granular.logits, 1), atol=1e-4, rtol=0
    )
    with model.disable_adapters():
        plain = model.generate(prompt, return_dict_in_generate=True, **kwargs)
    assert not torch.allclose(torch.stack(plain.logits, 1), torch.stack(frozen.logits, 1))


def test_merged_generation_is_refused_over_bitsandbytes(folders) -> None:
    model = XLoraModel(
        quantized_factory(folders, "nf4")(), XLoraConfig(adapters={"a": str(folders["a"])})
    )
    before = [m.base_layer.weight.detach().clone() for m in model.mixed_modules()]
    with pytest.raises(ValueError, match="quantized base") as error:
        model.generate(ids(1, 5), max_new_tokens=2, scalings_mode="merged")
    assert "scalings_mode='frozen'" in str(error.value)
    assert "model.layers.0.self_attn.q_proj" in str(error.value)
    after = [m.base_layer.weight for m in model.mixed_modules()]
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))


def test_torchao_int8_weight_only(folders) -> None:
    torchao = pytest.importorskip("torchao", reason="torchao is not installed")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    def load() -> torch.nn.Module:
        model = float_llama()
        quantize_(model.model, Int8WeightOnlyConfig())  # the decoder layers, not the head
        return model

    try:
        load()(input_ids=ids())
    except (RuntimeError, NotImplementedError) as error:  # no kernel for this CPU / torch
        pytest.skip(f"torchao {torchao.__version__} int8 weight-only does not run here: {error}")
    model = XLoraModel(load(), XLoraConfig(adapters={"a": str(folders["a"])}))
    assert len(quantized_modules(model)) == model.n_layers
    assert all(m.lora_a.dtype == torch.float32 for m in model.mixed_modules())
    reference = PeftModel.from_pretrained(load(), folders["a"]).eval()
    inputs = ids()
    with torch.no_grad():
        base = load()(input_ids=inputs).logits
        theirs = reference(input_ids=inputs).logits
        with model.fixed_scalings(torch.tensor([1.0])):
            ours = model(input_ids=inputs).logits
    assert not torch.allclose(theirs, base, atol=1e-3)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="scalings_mode='frozen'"):
        model.generate(inputs[:1], max_new_tokens=2, scalings_mode="merged")
