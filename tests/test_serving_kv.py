"""Joining and trimming a batch's two KV caches: a joined row computes what it would alone."""

from __future__ import annotations

import pytest
import torch
from serving_server import tiny_xlora

from loramix.generation import FreezePlan
from loramix.serving import kv


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    return tiny_xlora(tmp_path_factory.mktemp("kv"))[0]


def prefill(model, ids: list[int], frozen: bool = False):
    """(cache, mask, first greedy token) for one prompt, alone."""
    prompt = torch.tensor([ids])  # (1, T)
    cache = model.new_cache()
    if frozen:
        cache.freeze_plan = FreezePlan(window_start=0, window_end=len(ids))
    out = model(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        position_ids=torch.arange(len(ids))[None],
        cache=cache,
        use_cache=True,
    )
    cache.freeze_plan = None
    return cache, torch.ones_like(prompt), int(out.logits[0, -1].argmax())


def step(model, cache, mask, tokens: list[int], positions: list[int], frozen: bool = False):
    """One decode step of every row; returns `(B, V)` logits, `(B, L, E)` scalings and the mask."""
    mask = torch.cat([mask, torch.ones(len(tokens), 1, dtype=mask.dtype)], dim=1)
    cache.freeze_plan = FreezePlan(0, 0) if frozen else None
    out = model(
        input_ids=torch.tensor(tokens)[:, None],
        attention_mask=mask,
        position_ids=torch.tensor(positions)[:, None],
        cache=cache,
        use_cache=True,
    )
    cache.freeze_plan = None
    return out.logits[:, -1], out.scalings[:, -1], mask


@pytest.mark.parametrize("frozen", [False, True])
@torch.no_grad()
def test_joined_rows_compute_what_they_compute_alone(model, frozen: bool) -> None:
    prompts = [[5, 9, 13, 40, 41, 42, 43], [7, 8], [60, 61, 62, 63]]
    alone = []
    for ids in prompts:
        cache, mask, token = prefill(model, ids, frozen)
        alone.append(step(model, cache, mask, [token], [len(ids)], frozen)[:2])
    cache, mask, first = prefill(model, prompts[0], frozen)
    tokens, positions = [first], [len(prompts[0])]
    for ids in prompts[1:]:
        new_cache, new_mask, token = prefill(model, ids, frozen)
        mask = kv.join(cache, mask, new_cache, new_mask)
        tokens.append(token)
        positions.append(len(ids))
    assert mask.shape == (3, 7) and mask.sum(dim=1).tolist() == [7, 2, 4]
    assert cache.get_seq_length() == 7
    if not frozen:
        assert cache.scaling_cache.get_seq_length() == 7
    else:
        assert cache.sequence_state["frozen_scalings"].shape[0] == 3
    logits, scalings, mask = step(model, cache, mask, tokens, positions, frozen)
    for row, (ref_logits, ref_scalings) in enumerate(alone):
        torch.testing.assert_close(logits[row], ref_logits[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(scalings[row], ref_scalings[0], atol=1e-5, rtol=1e-5)

    mask = kv.select(cache, mask, [1, 2])  # the longest prompt leaves: padding is trimmed
    assert mask.shape == (2, 5) and cache.get_seq_length() == 5
    if not frozen:
        assert cache.scaling_cache.get_seq_length() == 5


def test_join_refuses_mismatched_caches_and_changes_nothing(model) -> None:
    cache, mask, _ = prefill(model, [5, 6, 7])
    frozen, frozen_mask, _ = prefill(model, [5, 6], frozen=True)
    keys = cache.layers[0].keys.clone()
    with pytest.raises(ValueError, match="granular and frozen rows cannot share a batch"):
        kv.join(cache, mask, frozen, frozen_mask)
    frozen.scaling_cache.reset()
    frozen.sequence_state.clear()
    with pytest.raises(ValueError, match="a filled scaling cache layer and an empty one"):
        kv.join(cache, mask, frozen, frozen_mask)
    assert torch.equal(cache.layers[0].keys, keys)
