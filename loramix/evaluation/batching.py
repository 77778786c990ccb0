"""Padding and batching of evaluation examples: prompts padded on either side, and batches
of similar lengths (so that padding stays short)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from loramix.training.data import IGNORE_INDEX

if TYPE_CHECKING:
    from loramix.evaluation.runner import EvalExample


def padded_prompts(
    examples: Sequence[EvalExample], pad: int, *, left: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The examples' prompts padded to the longest: `(B, P)` ids and `(B, P)` attention mask,
    padded on the left (for generation) or on the right."""
    width = max(ex.prompt_length for ex in examples)
    ids = torch.full((len(examples), width), pad, dtype=torch.long)  # (B, P)
    mask = torch.zeros((len(examples), width), dtype=torch.long)  # (B, P)
    for row, ex in enumerate(examples):
        start = width - ex.prompt_length if left else 0
        ids[row, start : start + ex.prompt_length] = torch.tensor(ex.input_ids[: ex.prompt_length])
        mask[row, start : start + ex.prompt_length] = 1
    return ids, mask


def padded_completions(
    examples: Sequence[EvalExample], pad: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tokens after each prompt, right-padded: `(B, C)` ids, attention mask and labels
    (`IGNORE_INDEX` on the padding)."""
    width = max(len(ex.input_ids) - ex.prompt_length for ex in examples)
    ids = torch.full((len(examples), width), pad, dtype=torch.long)  # (B, C)
    mask = torch.zeros((len(examples), width), dtype=torch.long)  # (B, C)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)  # (B, C)
    for row, ex in enumerate(examples):
        tokens = ex.input_ids[ex.prompt_length :]
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[row, : len(tokens)] = 1
        labels[row, : len(tokens)] = torch.tensor(ex.labels[ex.prompt_length :], dtype=torch.long)
    return ids, mask, labels


def length_batches(
    items: Sequence[Any], size: int, key: Callable[[Any], int]
) -> Iterator[list[Any]]:
    """Consecutive batches of `items` sorted by `key`, so that padding stays short."""
    ordered = sorted(items, key=key)
    for start in range(0, len(ordered), size):
        yield ordered[start : start + size]
