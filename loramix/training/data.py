"""Training data: JSON Lines files -> tokenized examples with a loss mask, mixed and padded.

Every line of a `.jsonl` file is one JSON object in one of three shapes (other keys, such as
"domain" or "answer", are allowed and ignored):

    {"prompt": "...", "completion": "..."}   loss on the completion (and EOS) only
    {"messages": [{"role": ..., "content": ...}, ...]}
                                             rendered with the tokenizer's chat template;
                                             loss on the assistant turns only
    {"text": "..."}                          loss on every token

With `chat=True`, a prompt/completion pair is rendered as a user turn and an assistant turn.

Finding the assistant tokens: few chat templates (SmolLM2's among them) mark assistant turns
with `{% generation %}` tags, so `return_assistant_tokens_mask` is not available. Instead each
conversation is rendered prefix by prefix: the text before assistant turn i is the rendering of
messages[:i] with the generation prompt, and the turn itself is what rendering messages[:i+1]
adds after it. Each piece is tokenized on its own, which is also how the tokens look at
generation time (the model continues a tokenized prompt). Templates that rewrite earlier turns
(so that a longer conversation does not start with the rendering of a shorter one) are refused.

An example is a dict of equal-length int lists (T tokens):

    input_ids       (T,)  token ids
    attention_mask  (T,)  all ones (padding is added by `PadCollator`)
    labels          (T,)  = input_ids inside the loss span, -100 elsewhere

Several files can be mixed with sampling weights (`mix_datasets`; the files and weights are
`loramix.training.jsonl.DataSource`s), and a held-out split is drawn per file before mixing
(`load_training_data`), so that an upsampled example never lands on both sides. The gate
trainer reuses all of this unchanged.
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import ConcatDataset, Dataset, Subset
from transformers import PreTrainedTokenizerBase

from loramix.training.jsonl import SHAPES, BadLines, DataSource, read_records

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label of tokens outside the loss span (the value transformers' losses skip)."""

Example = dict[str, list[int]]
"""One tokenized example: "input_ids", "attention_mask" and "labels", each of length T."""


@dataclass(frozen=True)
class Segment:
    """A piece of rendered text, and whether the loss covers its tokens."""

    text: str
    loss: bool


@dataclass(frozen=True)
class Rendered:
    """A record turned into text segments.

    Attributes:
        segments: The text, in order, split where the loss mask changes.
        plain: True for text that is not chat-templated: the tokenizer's BOS (if it adds one)
            goes in front and EOS (with loss) at the end. A chat template brings its own.
    """

    segments: tuple[Segment, ...]
    plain: bool


class TokenizedDataset(Dataset[Example]):
    """Tokenized examples held in memory (see the module docstring for their fields).

    Attributes:
        examples: The examples.
        name: Where they came from (for log messages).
    """

    def __init__(self, examples: Sequence[Example], name: str = "") -> None:
        self.examples = list(examples)
        self.name = name

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]


@dataclass
class PadCollator:
    """Pad a list of examples into a batch of (B, T) long tensors, on the right.

    `input_ids` are padded with `pad_token_id`, `attention_mask` with 0, `labels` with -100.
    Extra keys in the examples are dropped.

    Attributes:
        pad_token_id: Token used for padding (see `pad_token_id`).
        pad_to_multiple_of: If set, T is rounded up to a multiple of it.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("PadCollator got an empty batch.")
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        pads = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        batch = {}
        for key, pad in pads.items():
            rows = [list(f[key]) for f in features]
            batch[key] = torch.tensor(
                [row + [pad] * (longest - len(row)) for row in rows], dtype=torch.long
            )  # (B, T)
        return batch


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's pad token, else its EOS token (padding is masked out either way).

    Raises:
        ValueError: If the tokenizer has neither.
    """
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    raise ValueError(
        "The tokenizer has neither a pad token nor an EOS token; set one, e.g. "
        "`tokenizer.pad_token = tokenizer.unk_token`."
    )


def render_record(
    record: dict[str, Any], tokenizer: PreTrainedTokenizerBase, chat: bool = False
) -> Rendered:
    """Turn one record into text segments marked with where the loss applies.

    Args:
        record: A JSON object in one of the shapes of the module docstring.
        tokenizer: Supplies the chat template for "messages" (and for prompt/completion with
            `chat=True`).
        chat: Render prompt/completion as a user and an assistant turn.

    Raises:
        ValueError: If the record has no known shape, an empty or non-string field, or needs a
            chat template the tokenizer lacks (the message says which).
    """
    present = {key for key in ("prompt", "completion", "messages", "text") if key in record}
    if present == {"prompt", "completion"}:
        prompt = _nonempty_string(record, "prompt")
        completion = _nonempty_string(record, "completion")
        if chat:
            messages = [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": completion},
            ]
            return Rendered(_render_chat(messages, tokenizer), plain=False)
        return Rendered((Segment(prompt, False), Segment(completion, True)), plain=True)
    if present == {"messages"}:
        return Rendered(_render_chat(_checked_messages(record["messages"]), tokenizer), False)
    if present == {"text"}:
        return Rendered((Segment(_nonempty_string(record, "text"), True),), plain=True)
    if present in ({"prompt"}, {"completion"}):
        (missing,) = {"prompt", "completion"} - present
        raise ValueError(f'has "{next(iter(present))}" but no "{missing}"; give both.')
    found = ", ".join(sorted(present)) or "none of them"
    raise ValueError(
        f"expected exactly one of the shapes {SHAPES}; found the keys {found} "
        f"(all keys: {', '.join(sorted(record)) or 'none'})."
    )


def tokenize_rendered(
    rendered: Rendered, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> Example | None:
    """Tokenize segments into an example, truncated on the right to `max_length` tokens.

    Returns:
        The example, or None if truncation left no token to learn (a prompt that fills
        `max_length` on its own).
    """
    input_ids: list[int] = []
    labels: list[int] = []
    if rendered.plain:
        input_ids += _bos(tokenizer)
        labels += [IGNORE_INDEX] * len(input_ids)
    for segment in rendered.segments:
        ids = tokenizer(segment.text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if segment.loss else [IGNORE_INDEX] * len(ids)
    eos = tokenizer.eos_token_id
    if rendered.plain and eos is not None and (not input_ids or input_ids[-1] != eos):
        input_ids.append(eos)
        labels.append(eos)
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    # The label at position 0 is never a target: causal LMs predict token t from tokens < t.
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return None
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def load_jsonl(
    path: str | os.PathLike[str],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    chat: bool = False,
) -> TokenizedDataset:
    """Read, validate and tokenize one JSON Lines file.

    Every line is checked before this returns, so a bad line fails fast, before training.

    Args:
        path: The `.jsonl` file.
        tokenizer: The base model's tokenizer.
        max_length: Examples are truncated to this many tokens.
        chat: Render prompt/completion pairs with the chat template.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: On malformed lines (naming the file and every bad line, up to
            `MAX_REPORTED_LINES`), or if the file yields no example.
    """
    if max_length < 2:
        raise ValueError(f"max_length={max_length}: use at least 2 tokens (typically 512+).")
    examples: list[Example] = []
    dropped: list[int] = []
    bad = BadLines(path)
    for number, record in read_records(path, bad):
        try:
            rendered = render_record(record, tokenizer, chat=chat)
        except ValueError as error:
            bad.add(number, str(error))
            continue
        example = tokenize_rendered(rendered, tokenizer, max_length)
        if example is None:
            dropped.append(number)
        else:
            examples.append(example)
    bad.check()
    if dropped:
        logger.warning(
            "%s: skipped %d example(s) with nothing to learn within max_length=%d tokens "
            "(lines %s); raise max_length to keep them",
            path,
            len(dropped),
            max_length,
            ", ".join(map(str, dropped[:10])) + (", ..." if len(dropped) > 10 else ""),
        )
    if not examples:
        raise ValueError(
            f"{path} yields no training example"
            + (f" (all {len(dropped)} were longer than max_length={max_length})" if dropped else "")
            + "; check the file and max_length."
        )
    return TokenizedDataset(examples, name=str(path))


def train_test_split(
    dataset: Dataset[Example], eval_fraction: float, seed: int = 0
) -> tuple[Subset[Example], Subset[Example]]:
    """Split a dataset at random into a training part and a held-out part.

    The held-out part has round(len * eval_fraction) examples, at least 1 when the fraction is
    positive, and the training part keeps at least 1. Deterministic for a given seed.

    Raises:
        ValueError: If `eval_fraction` is outside [0, 1), or there are too few examples to
            hold any out.
    """
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction={eval_fraction}: use a fraction in [0, 1), e.g. 0.05.")
    size = len(dataset)  # type: ignore[arg-type]
    n_eval = max(1, round(size * eval_fraction)) if eval_fraction > 0 else 0
    if n_eval and size - n_eval < 1:
        raise ValueError(
            f"Cannot hold out {n_eval} of {size} example(s) and keep any for training; "
            "add data or set eval_fraction=0."
        )
    order = list(range(size))
    random.Random(seed).shuffle(order)
    return Subset(dataset, sorted(order[n_eval:])), Subset(dataset, sorted(order[:n_eval]))


MAX_MIX_GROWTH = 100
"""The mixture of `mix_datasets` may hold at most this many times the examples given."""


def mix_datasets(
    datasets: Sequence[Dataset[Example]], weights: Sequence[float], seed: int = 0
) -> Subset[Example]:
    """Mix datasets so that each makes up a share of the result proportional to its weight.

    No example is dropped: the mixture is the smallest that holds every example of the
    dataset(s) with the largest size-to-weight ratio once; the others are upsampled (whole
    shuffled passes, then a random part of one more pass). The result is shuffled. Equal
    weights on equal sizes simply concatenate and shuffle. Deterministic for a given seed.

    Args:
        datasets: The parts, each non-empty.
        weights: One positive weight per part.
        seed: Seed of the draws and the final shuffle.

    Raises:
        ValueError: On mismatched lengths, an empty part or a non-positive weight, or weights
            so uneven that the mixture would exceed `MAX_MIX_GROWTH` times the examples given
            (a part of tiny weight is seen once only in a huge mixture).
    """
    if len(datasets) != len(weights) or not datasets:
        raise ValueError(
            f"Got {len(datasets)} dataset(s) and {len(weights)} weight(s); give one weight per "
            "dataset (at least one)."
        )
    sizes = [len(d) for d in datasets]  # type: ignore[arg-type]
    if min(sizes) == 0:
        raise ValueError(f"Cannot mix an empty dataset (sizes {sizes}); leave it out.")
    if min(weights) <= 0:
        raise ValueError(f"Weights must be > 0, got {list(weights)}.")
    total_weight = sum(weights)
    total = max(math.ceil(n * total_weight / w - 1e-9) for n, w in zip(sizes, weights, strict=True))
    if total > MAX_MIX_GROWTH * sum(sizes):
        part = max(range(len(sizes)), key=lambda i: sizes[i] / weights[i])
        raise ValueError(
            f"Weights {list(weights)} on {sizes} examples would mix {total} examples "
            f"({total / sum(sizes):.0f}x the data) so that part {part + 1} (weight "
            f"{weights[part]}) is seen once; raise its weight (a mixture may hold at most "
            f"{MAX_MIX_GROWTH}x the data), or leave it out."
        )
    quotas = _apportion(total, weights)
    rng = random.Random(seed)
    indices: list[int] = []
    offset = 0
    for size, quota in zip(sizes, quotas, strict=True):
        drawn: list[int] = []
        while len(drawn) < quota:
            one_pass = list(range(size))
            rng.shuffle(one_pass)
            drawn += one_pass[: quota - len(drawn)]
        indices += [offset + i for i in drawn]
        offset += size
    rng.shuffle(indices)
    return Subset(ConcatDataset(datasets), indices)


def load_training_data(
    sources: Sequence[DataSource | str | os.PathLike[str]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    chat: bool = False,
    eval_fraction: float = 0.0,
    seed: int = 0,
) -> tuple[Dataset[Example], Dataset[Example] | None]:
    """Load, split and mix several JSON Lines files into a training and a held-out dataset.

    Each file is split on its own (`train_test_split`); the training parts are mixed by weight
    (`mix_datasets`); the held-out parts are concatenated unweighted (no duplicates).

    Args:
        sources: `DataSource`s, or "FILE[:WEIGHT]" strings.
        tokenizer: The base model's tokenizer.
        max_length: Examples are truncated to this many tokens.
        chat: Render prompt/completion pairs with the chat template.
        eval_fraction: Share of each file held out; 0 for none.
        seed: Seed of the split and of the mixture.

    Returns:
        The training dataset, and the held-out one (None if `eval_fraction` is 0).

    Raises:
        ValueError: On a malformed file or bad arguments (see `load_jsonl`).
    """
    if not sources:
        raise ValueError("No data file given; pass at least one .jsonl file.")
    parsed = [s if isinstance(s, DataSource) else DataSource.parse(s) for s in sources]
    train_parts: list[Dataset[Example]] = []
    eval_parts: list[Dataset[Example]] = []
    for source in parsed:
        dataset = load_jsonl(source.path, tokenizer, max_length=max_length, chat=chat)
        try:
            train, held_out = train_test_split(dataset, eval_fraction, seed)
        except ValueError as error:
            raise ValueError(f"{source.path}: {error}") from None
        train_parts.append(train)
        eval_parts.append(held_out)
        logger.info(
            "%s: %d training and %d held-out example(s), weight %g",
            source.path,
            len(train),
            len(held_out),
            source.weight,
        )
    try:
        train = mix_datasets(train_parts, [s.weight for s in parsed], seed)
    except ValueError as error:
        parts = ", ".join(f"{i} = {s.path}" for i, s in enumerate(parsed, start=1))
        raise ValueError(f"{error} (parts: {parts})") from None
    held_out = ConcatDataset(eval_parts) if eval_fraction > 0 else None
    return train, held_out


def load_held_out(
    sources: Sequence[DataSource | str | os.PathLike[str]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    chat: bool = False,
) -> Dataset[Example]:
    """Whole JSON Lines files (e.g. a dev split) as one held-out dataset, in file order.

    Weights of "FILE:WEIGHT" sources are not used: every held-out example counts once.

    Raises:
        ValueError: If no file is given, or on a malformed file (see `load_jsonl`).
    """
    if not sources:
        raise ValueError("No held-out file given; pass at least one .jsonl file.")
    parsed = [s if isinstance(s, DataSource) else DataSource.parse(s) for s in sources]
    parts = [load_jsonl(s.path, tokenizer, max_length=max_length, chat=chat) for s in parsed]
    logger.info("held-out data: %d example(s) from %d file(s)", sum(map(len, parts)), len(parts))
    return ConcatDataset(parts)


def _nonempty_string(record: dict[str, Any], key: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise ValueError(f'"{key}" must be a string, got {type(value).__name__}.')
    if not value.strip():
        raise ValueError(f'"{key}" is empty; give it some text or drop the line.')
    return value


def _checked_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ValueError('"messages" must be a non-empty list of {"role", "content"} objects.')
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not {"role", "content"} <= message.keys():
            raise ValueError(f'"messages"[{i}] must be an object with "role" and "content".')
        if not isinstance(message["role"], str) or not message["role"]:
            raise ValueError(f'"messages"[{i}]["role"] must be a non-empty string.')
        if not isinstance(message["content"], str):
            raise ValueError(
                f'"messages"[{i}]["content"] must be a string, got '
                f"{type(message['content']).__name__} (multimodal content is not supported)."
            )
        if not message["content"].strip():
            raise ValueError(f'"messages"[{i}]["content"] is empty; remove the message.')
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError('"messages" has no "assistant" turn, so there is nothing to learn.')
    return messages


def _render_chat(
    messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase
) -> tuple[Segment, ...]:
    """Render a conversation prefix by prefix; loss on the text each assistant turn adds."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "needs a chat template, but the tokenizer has none; use a chat model's tokenizer, "
            'set `tokenizer.chat_template`, or use {"prompt", "completion"} lines without chat.'
        )

    def render(part: list[dict[str, str]], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            part, tokenize=False, add_generation_prompt=generation_prompt
        )

    segments: list[Segment] = []
    done = ""  # rendering of the messages handled so far
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:i], True)
        after = render(messages[: i + 1], False)
        _check_prefix(done, before, i)
        _check_prefix(before, after, i)
        segments += [Segment(before[len(done) :], False), Segment(after[len(before) :], True)]
        done = after
    whole = render(messages, False)
    _check_prefix(done, whole, len(messages) - 1)
    segments.append(Segment(whole[len(done) :], False))
    return tuple(s for s in segments if s.text)


def _check_prefix(prefix: str, text: str, index: int) -> None:
    if not text.startswith(prefix):
        raise ValueError(
            f"the chat template renders message {index} so that the conversation no longer "
            "starts with its rendering so far (it rewrites earlier turns, or needs a message "
            "before the first assistant turn), so the assistant tokens cannot be located. "
            "Start conversations with a system or user message, or use a template that only "
            "appends."
        )


def _bos(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """[BOS] if the tokenizer puts BOS in front of plain text, else []."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    with_specials = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if with_specials and with_specials[0] == bos else []


def _apportion(total: int, weights: Sequence[float]) -> list[int]:
    """Split `total` into integer parts proportional to `weights` (largest remainders)."""
    exact = [total * w / sum(weights) for w in weights]
    parts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: parts[i] - exact[i])
    for i in by_remainder[: total - sum(parts)]:
        parts[i] += 1
    return parts
