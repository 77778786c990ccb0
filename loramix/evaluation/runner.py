"""Evaluation of an X-LoRA model against its parts: the base, each expert, their average.

For every test set (a JSON Lines file of `{"prompt", "completion", ...}` records) and every
system, two numbers:

    NLL       mean negative log-likelihood per completion token under teacher forcing: the
              sum over every completion token of the set divided by their count, with the
              tokens and loss mask that `loramix.training.data` makes for training (so the chat
              template's end-of-turn token after the answer is scored too)
    accuracy  the share of greedy answers (batched, left-padded `model.generate`) that the
              verifier accepts; the default verifier compares the first line of the answer
              with the completion (`loramix.science.targets.science_verifier` re-checks it
              with the domain library)

The systems all run on the same model object:

    base            `model.disable_adapters()`
    expert:<name>   `model.fixed_scalings(one_hot)`: that expert alone, every token and layer
    uniform         `model.fixed_scalings(1/E each)`: the plain average of the experts
    xlora           the gate's per-token, per-layer scalings ("granular")
    xlora-frozen    X-LoRA as `generate(scalings_mode="frozen")` runs it: the prompt with
                    per-token scalings, then each example's completion (for its NLL) and
                    answer with one fixed mix, its prompt's mean per adapted module
                    (`loramix.evaluation.frozen`)

Each score also carries 95% bootstrap intervals of both numbers over the set's examples
(`loramix.evaluation.bootstrap.ratio_interval`, whole examples resampled), and each example's
NLL sum and token count, from which two systems' paired interval is computed
(`loramix.evaluation.report.nll_difference_interval`).

For X-LoRA the report also holds each expert's usage per test set: its scalings (after the
gate's softmax, before top-k) averaged over the adapted layers and over the real prompt and
completion tokens of the NLL pass.

The numbers land in an `EvalReport` (`loramix.evaluation.report`: tables, `eval.json`,
`eval.md`); the science case study's targets and verifier are in `loramix.science.targets`.

Axis names: B batch, T tokens, V vocabulary, L adapted modules, E experts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)

from loramix.checks import is_int, raise_problems
from loramix.evaluation.batching import length_batches, padded_prompts
from loramix.evaluation.frozen import frozen_example_nlls
from loramix.evaluation.report import EvalReport, Score
from loramix.training.data import (
    IGNORE_INDEX,
    PadCollator,
    pad_token_id,
    render_record,
    tokenize_rendered,
)
from loramix.training.jsonl import BadLines, read_records
from loramix.training.loss import RowNlls

if TYPE_CHECKING:
    from loramix.model import XLoraModel

logger = logging.getLogger(__name__)

BASE, UNIFORM, XLORA, EXPERTS = "base", "uniform", "xlora", "experts"
XLORA_FROZEN = "xlora-frozen"
EXPERT_PREFIX = "expert:"
DEFAULT_SYSTEMS = (BASE, EXPERTS, UNIFORM, XLORA)
"""`experts` stands for `expert:<name>` of every expert, in the model's order."""

Verifier = Callable[[Mapping[str, Any], str], bool]
"""(test record, generated text) -> whether the text answers the record's question."""

# ------------------------------------------------------------------------ verifiers


def first_line(text: str) -> str:
    """The text up to its first newline, stripped (as `loramix.science` reads answers)."""
    return text.split("\n", 1)[0].strip()


def exact_match(example: Mapping[str, Any], generated: str) -> bool:
    """Whether the first line of `generated` equals the example's completion (both stripped)."""
    return first_line(generated) == str(example["completion"]).strip()


# ------------------------------------------------------------------------ test data


@dataclass(frozen=True)
class EvalExample:
    """One test record, tokenized as `loramix.training.data` tokenizes training examples.

    Attributes:
        record: The JSON object ("prompt", "completion" and any other keys).
        input_ids: `(T,)` prompt and completion tokens.
        labels: `(T,)` `input_ids` on the completion, `IGNORE_INDEX` elsewhere.
        prompt_length: Tokens before the first completion token: the generation prompt.
    """

    record: dict[str, Any]
    input_ids: list[int]
    labels: list[int]
    prompt_length: int


def load_test_set(
    path: str | os.PathLike[str],
    tokenizer: PreTrainedTokenizerBase,
    *,
    chat: bool = True,
    limit: int | None = None,
    max_length: int = 1024,
) -> list[EvalExample]:
    """Read and tokenize a test set of prompt/completion records.

    Args:
        path: A `.jsonl` file; every line needs "prompt" and "completion".
        tokenizer: The base model's tokenizer.
        chat: Render each pair as a user and an assistant turn of the chat template.
        limit: Keep only the first `limit` records; None keeps all.
        max_length: Longer examples are truncated on the right (as in training).

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: On a malformed line (naming file and line), or if no example is left.
    """
    examples = []
    bad = BadLines(path)
    for number, record in read_records(path, bad):
        if limit is not None and len(examples) >= limit:
            break
        if "prompt" not in record or "completion" not in record:
            bad.add(
                number,
                'test records need "prompt" and "completion" (the reference answer); found '
                f"the keys {', '.join(sorted(record)) or 'none'}",
            )
            continue
        try:
            rendered = render_record(record, tokenizer, chat=chat)
        except ValueError as error:
            bad.add(number, str(error))
            continue
        if bad.problems:  # only checking the rest of the file
            continue
        tokens = tokenize_rendered(rendered, tokenizer, max_length)
        if tokens is None:
            logger.warning(
                "%s, line %d: the prompt fills max_length=%d tokens; skipped",
                path,
                number,
                max_length,
            )
            continue
        labels = tokens["labels"]
        start = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        examples.append(EvalExample(record, tokens["input_ids"], labels, start))
    bad.check()
    if not examples:
        raise ValueError(f"{path} holds no test example; check the file (and max_length)")
    return examples


# ------------------------------------------------------------------------ evaluation


def resolve_systems(systems: Sequence[str], expert_names: Sequence[str]) -> list[str]:
    """Expands "experts" to `expert:<name>` for every expert; checks every name.

    Raises:
        ValueError: Naming every unknown system and the valid choices.
    """
    resolved: list[str] = []
    unknown = []
    for system in systems:
        if system == EXPERTS:
            names = [EXPERT_PREFIX + e for e in expert_names]
        elif system in (BASE, UNIFORM, XLORA, XLORA_FROZEN) or (
            system.startswith(EXPERT_PREFIX) and system[len(EXPERT_PREFIX) :] in expert_names
        ):
            names = [system]
        else:
            unknown.append(system)
            continue
        resolved += [name for name in names if name not in resolved]
    if unknown or not resolved:
        choices = [BASE, EXPERTS, UNIFORM, XLORA, XLORA_FROZEN]
        choices += [EXPERT_PREFIX + e for e in expert_names]
        raise ValueError(
            f"systems: unknown {unknown or 'none given'}; choose from {', '.join(choices)}"
        )
    return resolved


def system_context(model: XLoraModel, system: str) -> contextlib.AbstractContextManager[None]:
    """The context in which `model` computes `system` (see the module docstring)."""
    if system == BASE:
        return model.disable_adapters()
    if system in (XLORA, XLORA_FROZEN):  # frozen: its own passes, in `_score`
        return contextlib.nullcontext()
    n = model.n_experts
    if system == UNIFORM:
        return model.fixed_scalings(torch.full((n,), 1.0 / n))
    if system.startswith(EXPERT_PREFIX):
        index = model.expert_names.index(system[len(EXPERT_PREFIX) :])
        return model.fixed_scalings(torch.eye(n)[index])
    raise ValueError(f"unknown system {system!r}; see `resolve_systems`")


def evaluate(
    model: XLoraModel,
    tokenizer: PreTrainedTokenizerBase,
    test_sets: Mapping[str, str | os.PathLike[str]],
    systems: Sequence[str] = DEFAULT_SYSTEMS,
    *,
    max_new_tokens: int = 32,
    chat: bool = True,
    verifier: Verifier | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    max_length: int = 1024,
) -> EvalReport:
    """Scores every system on every test set (see the module docstring).

    Every file is read and every option checked before any model call.

    Args:
        model: The X-LoRA model; left as it was found.
        tokenizer: The base model's tokenizer.
        test_sets: Name -> `.jsonl` file of prompt/completion records.
        systems: "base", "experts" (every expert alone), "expert:<name>", "uniform", "xlora",
            "xlora-frozen".
        max_new_tokens: Greedy tokens per answer; 0 skips generation (accuracy None).
        chat: Render prompts with the chat template (as the experts were trained).
        verifier: Judges an answer; `exact_match` if None.
        limit: Use only the first `limit` examples of each test set.
        batch_size: Sequences per forward or generate call.
        max_length: Examples are truncated to this many tokens.

    Raises:
        ValueError: Listing every bad option; or on a malformed test file.
        FileNotFoundError: If a test file does not exist.
    """
    problems = []
    if not test_sets:
        problems.append("test_sets: give at least one NAME -> FILE")
    for key, value, low in (
        ("max_new_tokens", max_new_tokens, 0),
        ("batch_size", batch_size, 1),
        ("max_length", max_length, 2),
        ("limit", 1 if limit is None else limit, 1),
    ):
        if not is_int(value) or value < low:
            problems.append(f"{key}={value!r}: use an int >= {low}")
    try:
        resolved = resolve_systems(systems, model.expert_names)
    except ValueError as error:
        problems.append(str(error))
    raise_problems("cannot evaluate", problems)
    verifier = verifier or exact_match
    data = {
        name: load_test_set(path, tokenizer, chat=chat, limit=limit, max_length=max_length)
        for name, path in test_sets.items()
    }

    scores: dict[str, dict[str, Score]] = {system: {} for system in resolved}
    usage: dict[str, dict[str, float]] = {}
    was_training = model.training
    model.eval()  # no gate dropout
    try:
        for system in resolved:
            with system_context(model, system):
                for name, examples in data.items():
                    score, expert_usage = _score(
                        model, tokenizer, examples, system, verifier, max_new_tokens, batch_size
                    )
                    scores[system][name] = score
                    if expert_usage is not None:
                        usage[name] = dict(zip(model.expert_names, expert_usage, strict=True))
                    logger.info("%s on %s: %s (%.1f s)", system, name, score.cell(), score.seconds)
    finally:
        model.train(was_training)
    return EvalReport(
        expert_names=list(model.expert_names),
        test_sets={name: os.fspath(path) for name, path in test_sets.items()},
        systems=resolved,
        scores=scores,
        usage=usage,
        settings={
            "verifier": getattr(verifier, "__name__", type(verifier).__name__),
            "max_new_tokens": max_new_tokens,
            "chat": chat,
            "limit": limit,
            "max_length": max_length,
            "scalings_mode": "granular",
        },
    )


def _score(
    model: XLoraModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[EvalExample],
    system: str,
    verifier: Verifier,
    max_new_tokens: int,
    batch_size: int,
) -> tuple[Score, list[float] | None]:
    """One system (already set up) on one test set; X-LoRA's expert usage or None."""
    from loramix.evaluation.bootstrap import ratio_interval

    start = time.perf_counter()
    if system == XLORA_FROZEN:  # as frozen generation computes it
        sums, counts = frozen_example_nlls(model, tokenizer, examples, batch_size)
        answers = (
            greedy_answers(
                model, tokenizer, examples, max_new_tokens, batch_size, scalings_mode="frozen"
            )
            if max_new_tokens > 0
            else None
        )
        expert_usage = None
    else:
        sums, counts, expert_usage = example_nlls(
            model, tokenizer, examples, batch_size, usage=system == XLORA
        )
        answers = (
            greedy_answers(model, tokenizer, examples, max_new_tokens, batch_size)
            if max_new_tokens > 0
            else None
        )
    accuracy, n_correct, accuracy_ci = None, 0, None
    if answers is not None:
        correct = [
            float(bool(verifier(ex.record, answer)))
            for ex, answer in zip(examples, answers, strict=True)
        ]
        n_correct = int(sum(correct))
        accuracy = n_correct / len(examples)
        accuracy_ci = ratio_interval(correct)
    score = Score(
        nll=sum(sums) / sum(counts),
        accuracy=accuracy,
        n_examples=len(examples),
        n_tokens=sum(counts),
        n_correct=n_correct,
        seconds=round(time.perf_counter() - start, 3),
        nll_ci=ratio_interval(sums, counts),
        accuracy_ci=accuracy_ci,
        example_nlls=tuple(float(value) for value in sums),
        example_tokens=tuple(int(count) for count in counts),
    )
    return score, expert_usage


def completion_nll(
    model: XLoraModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[EvalExample],
    batch_size: int = 8,
    *,
    usage: bool = False,
) -> tuple[float, int, list[float] | None]:
    """Mean NLL per completion token over `examples`, in the model's current system.

    Args:
        usage: Also average the forward's `scalings` over the adapted layers and the real
            tokens (X-LoRA only: the output must carry `scalings`).

    Returns:
        (mean NLL, completion tokens, per-expert mean scalings `(E,)` or None).
    """
    sums, counts, mean_usage = example_nlls(model, tokenizer, examples, batch_size, usage=usage)
    return sum(sums) / sum(counts), sum(counts), mean_usage


@torch.no_grad()
def example_nlls(
    model: XLoraModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[EvalExample],
    batch_size: int = 8,
    *,
    usage: bool = False,
) -> tuple[list[float], list[int], list[float] | None]:
    """Each example's summed completion-token NLL and token count, in the order given.

    Args:
        usage: Also average the forward's `scalings` over the adapted layers and the real
            tokens (X-LoRA only: the output must carry `scalings`).

    Returns:
        (NLL sums `(N,)`, completion tokens `(N,)`, per-expert mean scalings `(E,)` or None).
    """
    collate = PadCollator(pad_token_id(tokenizer))
    nlls = RowNlls(model)  # logits at the labelled positions only, where the model allows
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    usage_sum, usage_count = None, 0
    indexed = list(enumerate(examples))
    for batch_items in length_batches(indexed, batch_size, key=lambda item: len(item[1].input_ids)):
        batch = collate(
            [
                {
                    "input_ids": ex.input_ids,
                    "attention_mask": [1] * len(ex.input_ids),
                    "labels": ex.labels,
                }
                for _, ex in batch_items
            ]
        )
        device = model.get_input_embeddings().weight.device
        inputs = {key: value.to(device) for key, value in batch.items()}
        row_sums, row_counts, output = nlls({**inputs, "use_cache": False})
        row_sums, row_counts = row_sums.tolist(), row_counts.tolist()  # (B,) each
        for (index, _), total, count in zip(batch_items, row_sums, row_counts, strict=True):
            sums[index], counts[index] = total, int(count)
        if usage:
            scalings = output["scalings"].float()  # (B, T, L, E)
            mask = batch["attention_mask"].to(scalings.device, scalings.dtype)  # (B, T)
            summed = torch.einsum("btle,bt->e", scalings, mask)  # (E,)
            usage_sum = summed if usage_sum is None else usage_sum + summed
            usage_count += int(mask.sum()) * scalings.shape[2]
    mean_usage = None if usage_sum is None else (usage_sum / usage_count).tolist()
    order = range(len(examples))
    return [sums[i] for i in order], [counts[i] for i in order], mean_usage


@torch.no_grad()
def greedy_answers(
    model: XLoraModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[EvalExample],
    max_new_tokens: int,
    batch_size: int = 8,
    scalings_mode: str = "granular",
) -> list[str]:
    """Greedy continuations of each example's prompt, decoded without special tokens.

    Prompts are left-padded into batches (of similar lengths) for `model.generate`, with
    `scalings_mode` (X-LoRA's: "granular" or "frozen"; inside `fixed_scalings` the mix is
    given either way); a sequence stops at EOS, at `max_new_tokens`, or once it has written a
    newline (only the first line is an answer). The answers come back in the order of
    `examples`.
    """
    pad = pad_token_id(tokenizer)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id,
    )
    answers: dict[int, str] = {}
    indexed = list(enumerate(examples))
    for batch in length_batches(indexed, batch_size, key=lambda item: item[1].prompt_length):
        ids, mask = padded_prompts([ex for _, ex in batch], pad, left=True)  # (B, P) each
        width = ids.shape[1]
        device = model.get_input_embeddings().weight.device
        output = model.generate(
            ids.to(device),
            generation_config=config,
            attention_mask=mask.to(device),
            stopping_criteria=StoppingCriteriaList([FirstLineDone(tokenizer, width)]),
            scalings_mode=scalings_mode,
        )  # (B, P + new)
        texts = tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
        for (index, _), text in zip(batch, texts, strict=True):
            answers[index] = text
    return [answers[i] for i in range(len(examples))]


class FirstLineDone(StoppingCriteria):
    """Stops each sequence once its generated text holds a newline.

    Args:
        tokenizer: Decodes the generated tokens.
        prompt_width: Columns of the (left-padded) prompt; what follows was generated.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_width: int) -> None:
        self.tokenizer = tokenizer
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        """`(B, P + new)` ids -> `(B,)` bools: True where a newline has been written."""
        texts = self.tokenizer.batch_decode(
            input_ids[:, self.prompt_width :], skip_special_tokens=True
        )
        return torch.tensor(["\n" in text for text in texts], device=input_ids.device)


@torch.no_grad()
def example_scalings(model: XLoraModel, input_ids: Sequence[int]) -> torch.Tensor:
    """X-LoRA's scalings for one sequence: `(T, L, E)`, after the softmax, before top-k."""
    device = model.get_input_embeddings().weight.device
    ids = torch.tensor([list(input_ids)], device=device)  # (1, T)
    output = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    return output["scalings"][0].float().cpu()  # (T, L, E)
