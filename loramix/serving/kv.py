"""Joining and trimming the KV caches of a running batch.

A running batch keeps one `XLoraCache` (the mixed pass's keys and values, plus the scaling
pass's own cache) and one attention mask `(B, W)` for all its sequences, left-padded to a
common width `W`. A request prefilled on its own joins the batch by padding the narrower of
the two on the left (zero keys and values under a zero mask, so the padding adds exactly 0 to
every attention sum) and concatenating along the batch axis, in both caches and in the cache's
`sequence_state`. Rows that leave are dropped with the cache's own `batch_select_indices`;
columns that are padding in every remaining row are then cut off the left.

Positions are not stored here: every token's rotary position is baked into its cached key, so
the caller passes `position_ids` (the count of real tokens before each new token).

Axis names: B batch, H key/value heads, W cache width (tokens, padding included), hs head size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from loramix.cache import XLoraCache


def check_joinable(cache: DynamicCache) -> None:
    """Raises if a cache has layers that cannot be padded on the left (sliding windows)."""
    for layer in cache.layers:
        if type(layer) is not DynamicLayer:
            raise ValueError(
                f"the server batches requests by left-padding plain dynamic KV caches, but this "
                f"model's cache has a {type(layer).__name__} layer (sliding-window attention?); "
                "serve it with --max-batch 1"
            )


def join(
    running: XLoraCache, running_mask: torch.Tensor, new: XLoraCache, new_mask: torch.Tensor
) -> torch.Tensor:
    """Appends the rows of `new` to `running` (in place); returns the joined mask.

    Args:
        running: The batch's cache `(B1, H, W1, hs)` per layer; receives the new rows.
        running_mask: `(B1, W1)`.
        new: A cache `(B2, H, W2, hs)` per layer, prefilled apart.
        new_mask: `(B2, W2)`.

    Returns:
        `(B1 + B2, max(W1, W2))` the joined attention mask.
    """
    _check_joinable_pair(running, new)  # before anything changes
    width = max(running_mask.shape[1], new_mask.shape[1])
    _join_layers(running, new, width)
    _join_layers(running.scaling_cache, new.scaling_cache, width)
    for name, tensor in new.sequence_state.items():
        running.sequence_state[name] = torch.cat([running.sequence_state[name], tensor], dim=0)
    return torch.cat([_pad_left(running_mask, width), _pad_left(new_mask, width)], dim=0)


def select(cache: XLoraCache, mask: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """Keeps rows `keep` (in that order; repeats copy a row) and trims all-padding columns.

    Args:
        cache: Cut in place.
        mask: `(B, W)`.
        keep: Row indices to keep (not empty).

    Returns:
        The new mask, `(len(keep), W')` with `W' <= W`.
    """
    if keep != list(range(mask.shape[0])):
        index = torch.tensor(keep, dtype=torch.long, device=mask.device)
        cache.batch_select_indices(index)
        mask = mask[index]
    real = mask.any(dim=0).nonzero()
    start = int(real[0]) if real.numel() else mask.shape[1]
    if start > 0:
        for layers in (cache.layers, cache.scaling_cache.layers):
            for layer in layers:
                if _filled(layer):
                    layer.keys = layer.keys[:, :, start:]  # (B, H, W', hs)
                    layer.values = layer.values[:, :, start:]
        mask = mask[:, start:]
    return mask


def _filled(layer: DynamicLayer) -> bool:
    return layer.is_initialized and layer.keys is not None and layer.keys.numel() > 0


def _check_joinable_pair(running: XLoraCache, new: XLoraCache) -> None:
    problems = []
    if set(running.sequence_state) != set(new.sequence_state):
        problems.append(
            f"different sequence state: {sorted(running.sequence_state)} vs "
            f"{sorted(new.sequence_state)} (granular and frozen rows cannot share a batch)"
        )
    for name, mine, theirs in (
        ("mixed", running, new),
        ("scaling", running.scaling_cache, new.scaling_cache),
    ):
        if len(mine.layers) != len(theirs.layers):
            problems.append(f"{name} caches of {len(mine.layers)} and {len(theirs.layers)} layers")
        elif any(_filled(a) != _filled(b) for a, b in zip(mine.layers, theirs.layers, strict=True)):
            problems.append(f"a filled {name} cache layer and an empty one")
    if problems:
        raise ValueError("cannot join these KV caches: " + "; ".join(problems))


def _join_layers(running: DynamicCache, new: DynamicCache, width: int) -> None:
    for mine, theirs in zip(running.layers, new.layers, strict=True):
        if not _filled(mine):
            continue  # e.g. the scaling cache of a frozen batch, dropped after the prefill
        mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)])
        mine.values = torch.cat([_pad_left(mine.values, width), _pad_left(theirs.values, width)])


def _pad_left(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pads the token axis on the left to `width`: `(B, W)` masks, `(B, H, W, hs)` keys."""
    axis = 1 if tensor.dim() == 2 else 2
    missing = width - tensor.shape[axis]
    if missing == 0:
        return tensor
    pad = (missing, 0) if axis == 1 else (0, 0, missing, 0)
    return F.pad(tensor, pad)
