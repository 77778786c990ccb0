"""Tests of loramix.evaluation.frozen: the frozen system scores what frozen generation does."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
from helpers import MODEL_FACTORIES, make_expert, randomize_gate
from test_evaluation_runner import RECORDS, base_dir, experts, make_model, tokenizer

from loramix import XLoraConfig, XLoraModel
from loramix.evaluation.frozen import frozen_example_nlls
from loramix.evaluation.runner import EvalExample, example_nlls, greedy_answers, load_test_set

__all__ = ["base_dir", "experts", "tokenizer"]  # fixtures, used by name

PROMPTS = [
    "what is two plus two?",
    "a much longer question about the two experts, with many more words in it",
    "short",
]


def frozen_generation(model, prompt: list[int], new_tokens: int) -> tuple[list[int], float]:
    """Greedy tokens of `generate(scalings_mode="frozen")` for one prompt, and the NLL sum of
    those tokens under the logits it computed for them."""
    output = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
        scalings_mode="frozen",
        output_logits=True,
        return_dict_in_generate=True,
    )
    tokens = output.sequences[0, len(prompt) :].tolist()
    nll = sum(
        -torch.log_softmax(logits[0].float(), dim=-1)[token].item()
        for logits, token in zip(output.logits, tokens, strict=True)
    )
    return tokens, nll


@pytest.mark.parametrize("top_k", [None, 1])
@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: absolute positions
def test_the_frozen_nll_is_what_frozen_generation_computes(tmp_path, family, top_k):
    factory, targets = MODEL_FACTORIES[family]
    experts = {
        name: str(make_expert(factory, tmp_path / name, seed, targets))
        for name, seed in (("a", 1), ("b", 2))
    }
    model = XLoraModel(factory(), XLoraConfig(adapters=experts, xlora_size=16, top_k_lora=top_k))
    randomize_gate(model)  # per-token scalings differ; top-k applies to the prompt's mean
    generator = torch.Generator().manual_seed(5)
    examples, expected = [], []
    for prompt_length, new_tokens in [(3, 6), (11, 2), (7, 4), (1, 5)]:  # padded both ways
        prompt = torch.randint(3, 97, (prompt_length,), generator=generator).tolist()
        tokens, nll = frozen_generation(model, prompt, new_tokens)
        labels = [-100] * prompt_length + tokens
        examples.append(EvalExample({}, prompt + tokens, labels, prompt_length))
        expected.append(nll)
    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=None)  # raw ids, padding only
    sums, counts = frozen_example_nlls(model, tokenizer, examples, batch_size=4)
    assert counts == [6, 2, 4, 5]
    assert sums == pytest.approx(expected, rel=1e-4)


def test_the_prompt_is_read_per_token_not_under_the_mean(base_dir, experts, tokenizer, tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"prompt": PROMPTS[1], "completion": "the answer"}) + "\n")
    (example,) = load_test_set(path, tokenizer, chat=False)
    model = make_model(base_dir, experts)
    (frozen,), _ = frozen_example_nlls(model, tokenizer, [example])
    prompt = torch.tensor([example.input_ids[: example.prompt_length]])
    with model.fixed_scalings(model(input_ids=prompt)["scalings"][0].mean(dim=0)):  # (L, E)
        (whole_example_under_the_mean,), _, _ = example_nlls(model, tokenizer, [example], 1)
    assert whole_example_under_the_mean != pytest.approx(frozen, rel=1e-3)


def test_frozen_answers_in_a_batch_equal_one_at_a_time(base_dir, experts, tokenizer, tmp_path):
    path = tmp_path / "qa.jsonl"
    records = RECORDS + [{"prompt": PROMPTS[1], "completion": "x"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    examples = load_test_set(path, tokenizer, chat=False)
    model = make_model(base_dir, experts)
    batched = greedy_answers(model, tokenizer, examples, 4, 3, scalings_mode="frozen")
    alone = [
        greedy_answers(model, tokenizer, [ex], 4, 1, scalings_mode="frozen")[0] for ex in examples
    ]
    assert batched == alone
    granular = greedy_answers(model, tokenizer, examples, 4, 3)
    sums, _ = frozen_example_nlls(model, tokenizer, examples, batch_size=3)
    alone_sums = [frozen_example_nlls(model, tokenizer, [ex], 1)[0][0] for ex in examples]
    assert sums == pytest.approx(alone_sums, rel=1e-4)
    assert batched != granular or sums != pytest.approx(
        example_nlls(model, tokenizer, examples, 3)[0], rel=1e-4
    )  # the frozen system is not the granular one


def test_a_labelled_prompt_or_a_missing_part_is_refused(base_dir, experts, tokenizer):
    model = make_model(base_dir, experts)
    example = EvalExample({"prompt": "a", "completion": "b"}, [5, 6, 7], [5, 6, 7], 2)
    with pytest.raises(ValueError, match="test example 0: labels on its prompt"):
        frozen_example_nlls(model, tokenizer, [example])
    whole = EvalExample({"prompt": "a", "completion": ""}, [5, 6], [-100, -100], 2)
    with pytest.raises(ValueError, match="test example 1: 2 prompt token.* of 2; .* completion"):
        frozen_example_nlls(
            model, tokenizer, [dataclasses.replace(example, labels=[-100] * 3), whole]
        )
