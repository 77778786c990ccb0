"""The `xlora-frozen` system: X-LoRA scored as frozen generation computes it.

`generate(scalings_mode="frozen")` (`loramix.generation`) reads the prompt exactly as in
granular mode, each token with its own scalings, then fixes each sequence's scalings to
their mean over the prompt's real tokens (top-k applied to that mean) and runs every later
token with them and no scaling pass. Scoring a completion the same way takes two forward
calls on one `XLoraCache` that carries the same `FreezePlan`:

    prompt      (B, P)  left-padded, granular: its last position predicts the first
                        completion token; the plan averages the prompt's scalings
    completion  (B, C)  right-padded, the fixed mix: position j predicts token j + 1

with the positions counted from each row's first real token, as `generate` counts them. The
greedy answers come from `generate(scalings_mode="frozen")` itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from loramix.generation import FreezePlan
from loramix.training.data import IGNORE_INDEX, pad_token_id

if TYPE_CHECKING:
    from loramix.evaluation.runner import EvalExample
    from loramix.model import XLoraModel


@torch.no_grad()
def frozen_example_nlls(
    model: XLoraModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[EvalExample],
    batch_size: int = 8,
) -> tuple[list[float], list[int]]:
    """Each example's summed completion-token NLL and token count under frozen scalings, as
    frozen generation would score that completion (see the module docstring), in the order
    given.

    Raises:
        ValueError: If an example has labels on its prompt (frozen generation starts its
            fixed mix at the completion, so a labelled prompt token has no frozen score).
    """
    from loramix.evaluation.runner import length_batches, padded_prompts

    for index, example in enumerate(examples):
        if any(label != IGNORE_INDEX for label in example.labels[: example.prompt_length]):
            raise ValueError(
                f"test example {index}: labels on its prompt; the frozen system scores "
                "completions only (records of prompt and completion)"
            )
    pad = pad_token_id(tokenizer)
    device = model.get_input_embeddings().weight.device
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    indexed = list(enumerate(examples))
    for batch in length_batches(indexed, batch_size, key=lambda item: item[1].prompt_length):
        rows = [ex for _, ex in batch]
        prompt, prompt_mask = padded_prompts(rows, pad, left=True)  # (B, P) each
        completion, completion_mask, labels = _padded_completions(rows, pad)  # (B, C) each
        mask = torch.cat([prompt_mask, completion_mask], dim=1)  # (B, P + C)
        positions = (mask.cumsum(dim=1) - 1).masked_fill(mask == 0, 0)  # as generate counts
        width = prompt.shape[1]
        cache = model.new_cache()
        plan = FreezePlan(window_start=0, window_end=width)
        cache.freeze_plan = plan
        try:
            first = model(
                input_ids=prompt.to(device),
                attention_mask=prompt_mask.to(device),
                position_ids=positions[:, :width].to(device),
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits  # (B, 1, V): the first completion token's
            rest = model(
                input_ids=completion.to(device),
                attention_mask=mask.to(device),
                position_ids=positions[:, width:].to(device),
                cache=cache,
                use_cache=True,
            ).logits  # (B, C, V): position j predicts token j + 1
        finally:
            plan.close(cache)
        logits = torch.cat([first, rest[:, :-1]], dim=1).float()  # (B, C, V)
        labels = labels.to(logits.device)
        nll = F.cross_entropy(
            logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
        )  # (B, C)
        row_sums = nll.sum(dim=1).tolist()
        row_counts = (labels != IGNORE_INDEX).sum(dim=1).tolist()
        for (index, _), total, count in zip(batch, row_sums, row_counts, strict=True):
            sums[index], counts[index] = total, int(count)
    order = range(len(examples))
    return [sums[i] for i in order], [counts[i] for i in order]


def _padded_completions(
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
