"""XLoraCache: both KV caches and the per-sequence state stay aligned under every batch op."""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import random_ids, tiny_llama
from transformers import DynamicCache, StaticCache

from loramix import XLoraConfig, XLoraModel
from loramix.cache import XLoraCache, XLoraStaticCache

HEADS, HEAD_DIM = 2, 4


def filled_cache(batch: int = 3, tokens: int = 5, scaling_tokens: int | None = None) -> XLoraCache:
    """Two layers; row b of every tensor holds the value b (so batch ops are visible)."""
    cache = XLoraCache()
    rows = torch.arange(batch, dtype=torch.float32).view(batch, 1, 1, 1)
    for target, length in ((cache, tokens), (cache.scaling_cache, scaling_tokens or tokens)):
        kv = rows.expand(batch, HEADS, length, HEAD_DIM).clone()
        for layer in range(2):
            target.update(kv + 100 * layer, kv - 100 * layer, layer)
    cache.sequence_state["fixed"] = torch.arange(batch, dtype=torch.float32)[:, None] * 10
    return cache


def rows_of(cache: DynamicCache) -> list[float]:
    """The row labels of layer 0's keys (checks the batch order)."""
    return cache.layers[0].keys[:, 0, 0, 0].tolist()


def test_reorder_moves_both_caches_and_the_state() -> None:
    cache = filled_cache()
    cache.reorder_cache(torch.tensor([2, 2, 0]))
    assert rows_of(cache) == rows_of(cache.scaling_cache) == [2.0, 2.0, 0.0]
    assert cache.layers[1].values[:, 0, 0, 0].tolist() == [-98.0, -98.0, -100.0]
    assert cache.sequence_state["fixed"][:, 0].tolist() == [20.0, 20.0, 0.0]


def test_batch_repeat_and_select() -> None:
    cache = filled_cache(batch=2)
    cache.batch_repeat_interleave(3)
    assert rows_of(cache) == rows_of(cache.scaling_cache) == [0, 0, 0, 1, 1, 1]
    assert cache.sequence_state["fixed"].shape == (6, 1)
    cache.batch_select_indices(torch.tensor([0, 5]))
    assert rows_of(cache) == rows_of(cache.scaling_cache) == [0.0, 1.0]
    assert cache.sequence_state["fixed"][:, 0].tolist() == [0.0, 10.0]


def test_crop_cuts_both_caches_to_the_same_end() -> None:
    cache = filled_cache(tokens=7)
    cache.crop(-2)
    assert cache.get_seq_length() == cache.scaling_cache.get_seq_length() == 5
    cache.crop(0)
    assert cache.get_seq_length() == cache.scaling_cache.get_seq_length() == 5


def test_crop_with_a_shorter_scaling_cache() -> None:
    """Frozen generation stops the scaling cache; a crop must not cut it below the new end."""
    cache = filled_cache(tokens=9, scaling_tokens=6)
    cache.crop(-2)  # mixed: 9 -> 7; the scaling cache (6) already ends before 7
    assert (cache.get_seq_length(), cache.scaling_cache.get_seq_length()) == (7, 6)
    cache.crop(-3)  # mixed: 7 -> 4; scaling: 6 -> 4
    assert (cache.get_seq_length(), cache.scaling_cache.get_seq_length()) == (4, 4)


def test_reset_clears_everything() -> None:
    cache = filled_cache()
    cache.reset()
    assert cache.get_seq_length() == cache.scaling_cache.get_seq_length() == 0
    assert cache.sequence_state == {}


def test_repr_names_both_lengths() -> None:
    text = repr(filled_cache(tokens=4, scaling_tokens=3))
    assert "mixed_length=4" in text and "scaling_length=3" in text


def test_model_fills_both_caches(llama_experts: dict[str, str]) -> None:
    model = XLoraModel(tiny_llama(), XLoraConfig(adapters=llama_experts))
    cache = model.new_cache()
    assert isinstance(cache, XLoraCache)
    ids = random_ids(batch=2, tokens=6)
    with torch.no_grad():
        model(input_ids=ids, cache=cache, use_cache=True)
        model(input_ids=ids[:, :1], cache=cache, use_cache=True)
    assert cache.get_seq_length() == cache.scaling_cache.get_seq_length() == 7
    # the passes differ (experts on/off), so their keys must too
    assert not torch.allclose(cache.layers[0].keys, cache.scaling_cache.layers[0].keys)


def test_misaligned_cache_refused_in_granular_forward(llama_experts: dict[str, str]) -> None:
    model = XLoraModel(tiny_llama(), XLoraConfig(adapters=llama_experts))
    cache = model.new_cache()
    with torch.no_grad():
        model(input_ids=random_ids(1, 5), cache=cache, use_cache=True)
        cache.scaling_cache.crop(-1)
        with pytest.raises(ValueError, match="new_cache"):
            model(input_ids=random_ids(1, 1), cache=cache, use_cache=True)


# ------------------------------------------------------------------ static caches


def gated_model(llama_experts: dict[str, str]) -> XLoraModel:
    """Layer-wise gate with large random weights, so scalings differ per token and module."""
    model = XLoraModel(tiny_llama(), XLoraConfig(adapters=llama_experts, layerwise_scalings=True))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in model.gate.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 2.0)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def test_static_cache_holds_both_passes_in_place(llama_experts: dict[str, str]) -> None:
    model = gated_model(llama_experts)
    cache = model.new_cache(max_cache_len=12)
    assert isinstance(cache, XLoraStaticCache) and isinstance(cache.scaling_cache, StaticCache)
    ids = random_ids(batch=2, tokens=6)
    with torch.no_grad():
        model(input_ids=ids, cache=cache, use_cache=True)
        keys = cache.layers[0].keys
        model(input_ids=ids[:, :1], cache=cache, use_cache=True)
    assert keys.shape[2] == 12 and cache.layers[0].keys is keys  # allocated once
    assert int(cache.get_seq_length()) == int(cache.scaling_cache.get_seq_length()) == 7
    assert repr(cache).startswith("XLoraStaticCache(mixed_length=7, scaling_length=7")
    cache.crop(-2)
    assert int(cache.get_seq_length()) == int(cache.scaling_cache.get_seq_length()) == 5
    with pytest.raises(ValueError, match="max_cache_len=0"):
        model.new_cache(max_cache_len=0)


@pytest.mark.parametrize("mode", ["granular", "frozen", "merged"])
def test_static_cache_generates_what_the_dynamic_one_does(mode, llama_experts) -> None:
    model = gated_model(llama_experts)
    ids = random_ids(batch=3, tokens=7)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0  # left padding
    options = dict(
        attention_mask=mask,
        max_new_tokens=5,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        scalings_mode=mode,
    )
    dynamic = model.generate(ids, **options)
    static = model.generate(ids, cache_implementation="static", **options)
    assert isinstance(static.past_key_values, XLoraStaticCache)
    assert torch.equal(static.sequences, dynamic.sequences)
    torch.testing.assert_close(
        torch.stack(static.logits), torch.stack(dynamic.logits), atol=1e-5, rtol=0
    )


def test_static_cache_options_name_the_fix(llama_experts: dict[str, str]) -> None:
    model = gated_model(llama_experts)
    ids = random_ids(batch=1, tokens=4)
    with pytest.raises(ValueError, match="cache_implementation='static'"):
        model.generate(ids, max_new_tokens=2, cache_implementation="offloaded")
    with pytest.raises(ValueError, match="give one of them"):
        model.generate(
            ids, max_new_tokens=2, cache_implementation="static", cache=model.new_cache()
        )


@pytest.mark.parametrize("fixed", [False, True], ids=["gated", "per-sequence mixes"])
def test_decode_step_over_a_static_cache_is_one_graph(fixed, llama_experts) -> None:
    """`torch.compile(fullgraph=True)` captures a decode step: no graph break anywhere.

    The "eager" backend checks the capture without paying for code generation.
    """
    model = gated_model(llama_experts)
    ids, step = random_ids(batch=2, tokens=6), random_ids(batch=2, tokens=1, seed=9)
    mixes = model.fixed_scalings(torch.rand(2, model.n_experts), per_sequence=True)
    torch._dynamo.reset()
    compiled = torch.compile(model.forward, backend="eager", fullgraph=True)
    with torch.no_grad(), mixes if fixed else contextlib.nullcontext():
        cache = model.new_cache(max_cache_len=10)
        model(input_ids=ids, cache=cache, use_cache=True)
        eager = model(input_ids=step, cache=cache, use_cache=True).logits
        cache.crop(-1)
        captured = compiled(input_ids=step, cache=cache, use_cache=True).logits
    torch.testing.assert_close(captured, eager, atol=1e-6, rtol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_static_generation_on_cuda(llama_experts: dict[str, str]) -> None:
    """On a GPU, transformers compiles the decode step over the static cache (CUDA graphs)."""
    model = gated_model(llama_experts).to("cuda")
    ids = random_ids(batch=2, tokens=6).to("cuda")
    options = dict(max_new_tokens=6, do_sample=False, scalings_mode="frozen")
    dynamic = model.generate(ids, **options)
    static = model.generate(ids, cache_implementation="static", **options)
    assert torch.equal(static, dynamic)
