"""Tests of loramix.training.data: shapes, loss masks (checked by decoding), errors, mixing."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest
import torch
from tiny_tokenizer import tiny_tokenizer

from loramix.training.data import (
    IGNORE_INDEX,
    PadCollator,
    TokenizedDataset,
    load_jsonl,
    load_training_data,
    mix_datasets,
    train_test_split,
)
from loramix.training.jsonl import MAX_REPORTED_LINES, SHAPES, DataSource

EOS = "<|im_end|>"


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def labelled_text(tokenizer, example) -> str:
    """Decode exactly the tokens that carry a loss."""
    ids = [
        i
        for i, label in zip(example["input_ids"], example["labels"], strict=True)
        if label != IGNORE_INDEX
    ]
    return tokenizer.decode(ids)


def load_one(tokenizer, tmp_path: Path, record: dict, **kwargs):
    dataset = load_jsonl(
        write_jsonl(tmp_path / "d.jsonl", [record]),
        tokenizer,
        max_length=kwargs.pop("max_length", 256),
        **kwargs,
    )
    assert len(dataset) == 1
    example = dataset[0]
    assert len(example["input_ids"]) == len(example["labels"]) == len(example["attention_mask"])
    return example


def test_prompt_completion_loss_on_completion_and_eos(tokenizer, tmp_path):
    record = {"prompt": "what is two plus two? ", "completion": "four.", "domain": "math"}
    example = load_one(tokenizer, tmp_path, record)
    assert tokenizer.decode(example["input_ids"]) == "what is two plus two? four." + EOS
    assert labelled_text(tokenizer, example) == "four." + EOS


def test_prompt_completion_as_chat_turns(tokenizer, tmp_path):
    record = {"prompt": "what is two plus two?", "completion": "four.", "answer": "4"}
    example = load_one(tokenizer, tmp_path, record, chat=True)
    messages = [
        {"role": "user", "content": record["prompt"]},
        {"role": "assistant", "content": "four."},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(example["input_ids"]) == rendered
    assert labelled_text(tokenizer, example) == f"four.{EOS}\n"


def test_messages_loss_only_on_assistant_turns(tokenizer, tmp_path):
    messages = [
        {"role": "system", "content": "answer in one word"},
        {"role": "user", "content": "capital of france?"},
        {"role": "assistant", "content": "paris."},
        {"role": "user", "content": "two plus two?"},
        {"role": "assistant", "content": "four."},
        {"role": "user", "content": "thanks"},
    ]
    example = load_one(tokenizer, tmp_path, {"messages": messages})
    assert tokenizer.decode(example["input_ids"]) == tokenizer.apply_chat_template(
        messages, tokenize=False
    )
    assert labelled_text(tokenizer, example) == f"paris.{EOS}\nfour.{EOS}\n"
    # The two assistant spans are separate runs of labels, with the user turn between them.
    labelled = [label != IGNORE_INDEX for label in example["labels"]]
    runs = sum(1 for i, flag in enumerate(labelled) if flag and (i == 0 or not labelled[i - 1]))
    assert runs == 2
    assert not labelled[-1]  # the trailing user turn carries no loss


def test_messages_with_default_system_prompt(tokenizer, tmp_path):
    """SmolLM2's template inserts a system prompt when there is none; it carries no loss."""
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    example = load_one(tokenizer, tmp_path, {"messages": messages})
    assert "You are a helpful AI assistant" in tokenizer.decode(example["input_ids"])
    assert labelled_text(tokenizer, example) == f"world{EOS}\n"


def test_text_loss_on_every_token(tokenizer, tmp_path):
    example = load_one(tokenizer, tmp_path, {"text": "the quick brown fox"})
    assert example["labels"] == example["input_ids"]
    assert tokenizer.decode(example["input_ids"]) == "the quick brown fox" + EOS


def test_truncation_and_dropping_examples_without_targets(tokenizer, tmp_path, caplog):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"text": "the quick brown fox jumps over the lazy dog"},
            {"prompt": "the quick brown fox jumps over the lazy dog", "completion": "yes"},
        ],
    )
    with caplog.at_level(logging.WARNING, logger="loramix.training.data"):
        dataset = load_jsonl(path, tokenizer, max_length=4)
    assert len(dataset) == 1 and len(dataset[0]["input_ids"]) == 4
    assert "lines 2" in caplog.text and "max_length=4" in caplog.text
    only_long = write_jsonl(
        tmp_path / "long.jsonl", [{"prompt": "the quick brown fox jumps", "completion": "yes"}]
    )
    with pytest.raises(ValueError, match="longer than max_length=4"):
        load_jsonl(only_long, tokenizer, max_length=4)


BAD_LINES = {
    "bad json": ('{"text": "a"', "not valid JSON"),
    "not an object": ("[1, 2]", "expected a JSON object"),
    "unknown shape": ('{"input": "a", "output": "b"}', "found the keys none of them"),
    "two shapes": ('{"text": "a", "prompt": "b", "completion": "c"}', "exactly one of"),
    "missing completion": ('{"prompt": "a"}', 'no "completion"'),
    "empty completion": ('{"prompt": "a", "completion": "  "}', '"completion" is empty'),
    "non-string text": ('{"text": 3}', '"text" must be a string'),
    "no assistant": ('{"messages": [{"role": "user", "content": "hi"}]}', 'no "assistant"'),
    "empty content": (
        '{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}]}',
        "is empty",
    ),
    "bad message": ('{"messages": [{"role": "user"}]}', 'must be an object with "role"'),
}


@pytest.mark.parametrize("case", BAD_LINES, ids=list(BAD_LINES))
def test_malformed_line_names_file_and_line(tokenizer, tmp_path, case):
    line, reason = BAD_LINES[case]
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"text": "hello"})
    path.write_text(f"{good}\n\n{line}\n{good}\n")  # the blank line 2 is skipped
    with pytest.raises(ValueError) as info:
        load_jsonl(path, tokenizer, max_length=64)
    assert f"{path}, line 3" in str(info.value)
    assert reason in str(info.value)


def test_every_bad_line_is_reported_in_one_error(tokenizer, tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": "a", "completion": "b"})
    lines = [good, '{"text": "a" "b"}', good, '{"prompt": "a"}', "[1]", good, '{"text": "a"']
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as info:
        load_jsonl(path, tokenizer, max_length=64)
    assert str(info.value).splitlines() == [
        f"{path}: 4 bad lines:",
        "  line 2: not valid JSON (Expecting ',' delimiter at column 14). Each line must be one "
        "JSON object.",
        '  line 4: has "prompt" but no "completion"; give both.',
        f"  line 5: expected a JSON object of shape {SHAPES}, got a JSON list.",
        "  line 7: not valid JSON (Expecting ',' delimiter at column 13). Each line must be one "
        "JSON object.",
    ]


def test_bad_lines_beyond_the_limit_are_counted(tokenizer, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": 3}\n' * (MAX_REPORTED_LINES + 5))
    with pytest.raises(ValueError) as info:
        load_jsonl(path, tokenizer, max_length=64)
    lines = str(info.value).splitlines()
    assert lines[0] == f"{path}: {MAX_REPORTED_LINES + 5} bad lines:"
    assert len(lines) == MAX_REPORTED_LINES + 2
    assert lines[-2].startswith(f"  line {MAX_REPORTED_LINES}: ")
    assert lines[-1] == "  ... and 5 more bad lines"


def test_pretty_printed_json_and_a_byte_order_mark(tokenizer, tmp_path):
    path = tmp_path / "pretty.jsonl"
    path.write_text('{\n  "text": "hello"\n}\n')
    with pytest.raises(ValueError, match=r"line 1: .* at column 2\). This looks like one JSON"):
        load_jsonl(path, tokenizer, max_length=64)
    path.write_text('\ufeff{"text": "hello"}\n', encoding="utf-8")
    assert len(load_jsonl(path, tokenizer, max_length=64)) == 1


def test_a_line_that_is_not_utf8_is_named(tokenizer, tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "tea"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin1.jsonl, line 2: not UTF-8 \(byte 0xe9 at byte 14"):
        load_jsonl(path, tokenizer, max_length=64)


def test_messages_need_a_chat_template(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
    )
    with pytest.raises(ValueError, match=r"line 1: needs a chat template.*without chat"):
        load_jsonl(path, tiny_tokenizer(chat_template=None), max_length=64)


def test_template_that_rewrites_history_is_refused(tmp_path):
    # Shows only the last message: rendering a longer conversation does not extend a shorter.
    template = "{{ messages[-1]['content'] }}{% if add_generation_prompt %}>{% endif %}"
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
    )
    with pytest.raises(ValueError, match="cannot be located"):
        load_jsonl(path, tiny_tokenizer(chat_template=template), max_length=64)


def test_missing_file(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_jsonl(tmp_path / "nope.jsonl", tokenizer, max_length=64)


@pytest.mark.parametrize(
    ("spec", "path", "weight"),
    [
        ("a.jsonl", "a.jsonl", 1.0),
        ("a.jsonl:2", "a.jsonl", 2.0),
        ("dir/a.jsonl:0.5", "dir/a.jsonl", 0.5),
        ("data:v2/a.jsonl", "data:v2/a.jsonl", 1.0),
    ],
)
def test_data_source_parse(spec, path, weight):
    assert DataSource.parse(spec) == DataSource(Path(path), weight)


@pytest.mark.parametrize("spec", ["a.jsonl:0", "a.jsonl:-1", "a.jsonl:nan"])
def test_data_source_rejects_bad_weights(spec):
    with pytest.raises(ValueError, match="a.jsonl"):
        DataSource.parse(spec)


def tagged(name: str, size: int) -> TokenizedDataset:
    """A dataset whose examples say where they come from: input_ids == [source, index]."""
    return TokenizedDataset(
        [
            {"input_ids": [ord(name), i], "attention_mask": [1, 1], "labels": [ord(name), i]}
            for i in range(size)
        ]
    )


def test_mix_weights_set_shares_and_drop_nothing():
    mixed = mix_datasets([tagged("a", 4), tagged("b", 6)], [2, 1], seed=0)
    counts = Counter(tuple(mixed[i]["input_ids"]) for i in range(len(mixed)))
    # b (largest size per weight) appears once each; a gets twice b's share: 12 of 18.
    assert len(mixed) == 18
    assert all(counts[(ord("b"), i)] == 1 for i in range(6))
    assert all(counts[(ord("a"), i)] == 3 for i in range(4))


def test_mix_is_deterministic_per_seed():
    def order(seed: int) -> list[tuple[int, ...]]:
        mixed = mix_datasets([tagged("a", 5), tagged("b", 3)], [1, 3], seed=seed)
        return [tuple(mixed[i]["input_ids"]) for i in range(len(mixed))]

    assert order(7) == order(7)
    assert order(7) != order(8)


def test_mix_rejects_mismatched_weights():
    with pytest.raises(ValueError, match="one weight per dataset"):
        mix_datasets([tagged("a", 2)], [1, 2])


def test_a_tiny_weight_that_would_blow_the_mix_up_is_refused(tokenizer, tmp_path):
    assert len(mix_datasets([tagged("a", 10), tagged("b", 10)], [1, 0.02])) == 510  # 25x
    with pytest.raises(ValueError, match=r"would mix 10000010 examples .* part 2 \(weight 1e-06"):
        mix_datasets([tagged("a", 10), tagged("b", 10)], [1, 1e-6])
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a {i}"} for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b {i}"} for i in range(10)])
    with pytest.raises(ValueError, match=r"\(parts: 1 = .*a.jsonl, 2 = .*b.jsonl\)"):
        load_training_data([str(a), f"{b}:1e-7"], tokenizer, max_length=64)


def test_train_test_split_is_disjoint_and_deterministic():
    data = tagged("a", 20)
    train, held_out = train_test_split(data, 0.25, seed=3)
    assert (len(train), len(held_out)) == (15, 5)
    assert set(train.indices).isdisjoint(held_out.indices)
    assert train_test_split(data, 0.25, seed=3)[1].indices == held_out.indices
    assert train_test_split(data, 0.25, seed=4)[1].indices != held_out.indices
    assert len(train_test_split(data, 0.0)[1]) == 0
    with pytest.raises(ValueError, match="eval_fraction=0"):
        train_test_split(tagged("a", 1), 0.5)


def test_load_training_data_splits_each_file_before_mixing(tokenizer, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a {i}"} for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b {i}"} for i in range(10)])
    train, held_out = load_training_data(
        [f"{a}:3", str(b)], tokenizer, max_length=32, eval_fraction=0.2, seed=0
    )
    decode = lambda ex: tokenizer.decode(ex["input_ids"])  # noqa: E731
    train_texts = {decode(train[i]) for i in range(len(train))}
    eval_texts = [decode(held_out[i]) for i in range(len(held_out))]
    assert len(eval_texts) == 4 and not train_texts & set(eval_texts)
    assert sum(t.startswith("a") for t in eval_texts) == 2
    assert len(train) == 32  # 8 from b once, 8 from a three times
    _, none = load_training_data([a], tokenizer, max_length=32, eval_fraction=0.0)
    assert none is None


def test_pad_collator_pads_on_the_right():
    batch = PadCollator(pad_token_id=0)(
        [
            {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
            {"input_ids": [8], "attention_mask": [1], "labels": [8], "extra": "dropped"},
        ]
    )
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["input_ids"].dtype == torch.long
    assert PadCollator(0, pad_to_multiple_of=4)(
        [{"input_ids": [1], "attention_mask": [1], "labels": [1]}]
    )["labels"].shape == (1, 4)
