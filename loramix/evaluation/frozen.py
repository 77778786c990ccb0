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

from loramix.evaluation.batching import length_batches, padded_completions, padded_prompts
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
        ValueError: If an example has no prompt or no completion, or labels on its prompt
            (frozen generation starts its fixed mix at the completion, so a labelled prompt
            token has no frozen score).
    """
    for index, example in enumerate(examples):
        if not 0 < example.prompt_length < len(example.input_ids):
            raise ValueError(
                f"test example {index}: {example.prompt_length} prompt token(s) of "
                f"{len(example.input_ids)}; the frozen system needs a prompt and a completion"
            )
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
        completion, completion_mask, labels = padded_completions(rows, pad)  # (B, C) each
        mask = torch.cat([prompt_mask, completion_mask], dim=1)  # (B, P + C)
        positions = (mask.cumsum(dim=1) - 1).masked_fill(mask == 0, 0)  # (B, P + C) as generate
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
