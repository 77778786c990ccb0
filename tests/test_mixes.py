"""loramix.mixes: `merge_and_unload` equals the fixed mix (Linear, Conv1D, Embedding experts)
and refuses tied weights and bad mixes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import GPT2_TARGETS, make_expert, random_ids, tiny_gpt2, tiny_llama

from loramix import XLoraConfig, XLoraModel

MIXES = {
    "per expert": torch.tensor([0.5, 0.3, 0.2]),
    "per module": torch.rand(14, 3, generator=torch.Generator().manual_seed(0)),
    "by name": {"chem": 0.7, "mech": -0.4},  # bio left out: 0
}


@pytest.mark.parametrize("mix", MIXES, ids=list(MIXES))
def test_merge_and_unload_equals_the_fixed_mix(llama_experts: dict[str, str], mix: str) -> None:
    weights = MIXES[mix]
    ids = random_ids(2, 6)
    reference = XLoraModel(tiny_llama(), XLoraConfig(adapters=llama_experts))
    with torch.no_grad(), reference.fixed_scalings(reference.mix_weights(weights)):
        expected = reference(input_ids=ids).logits
    merged = XLoraModel(tiny_llama(), XLoraConfig(adapters=llama_experts)).merge_and_unload(weights)
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert {type(m).__module__.split(".")[0] for m in merged.modules()} <= {"torch", "transformers"}
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(tiny_llama()(input_ids=ids).logits, expected, atol=1e-3)


def test_merge_and_unload_gpt2_conv1d_and_embedding_experts(tmp_path: Path) -> None:
    targets = ["embed_tokens", "q_proj"]
    experts = {
        "x": str(make_expert(tiny_llama, tmp_path / "x", 1, targets)),
        "y": str(make_expert(tiny_llama, tmp_path / "y", 2, targets, rank=2)),
    }
    gpt2_experts = {
        "a": str(make_expert(tiny_gpt2, tmp_path / "a", 1, GPT2_TARGETS, rank=4)),
        "b": str(make_expert(tiny_gpt2, tmp_path / "b", 2, GPT2_TARGETS, rank=2)),
    }
    ids = random_ids(2, 6)
    for factory, adapters in ((tiny_llama, experts), (tiny_gpt2, gpt2_experts)):
        reference = XLoraModel(factory(), XLoraConfig(adapters=adapters))
        with torch.no_grad(), reference.fixed_scalings(torch.tensor([0.6, 0.4])):
            expected = reference(input_ids=ids).logits
        merged = XLoraModel(factory(), XLoraConfig(adapters=adapters)).merge_and_unload(
            torch.tensor([0.6, 0.4])
        )
        with torch.no_grad():
            torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=0)


def test_merge_and_unload_refuses_tied_weights_and_bad_mixes(tmp_path: Path) -> None:
    tied = {"e": str(make_expert(tiny_gpt2, tmp_path / "e", 1, ["wte", "c_attn"]))}
    model = XLoraModel(tiny_gpt2(), XLoraConfig(adapters=tied))
    with pytest.raises(ValueError, match=r"\['transformer.wte'\] are tied .* Untie them first"):
        model.merge_and_unload(torch.ones(1))
    assert any(type(m).__name__ == "MixedEmbedding" for m in model.modules())  # untouched
    with pytest.raises(ValueError, match=r"unknown expert\(s\) \['f'\]"):
        model.merge_and_unload({"f": 1.0})
    with pytest.raises(ValueError, match=r"give \(1,\)"):
        model.merge_and_unload(torch.ones(2))
