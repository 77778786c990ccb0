"""Tests of loramix.evaluation.frozen: the frozen system scores what frozen generation does."""

from __future__ import annotations

import json

import pytest
import torch
from test_evaluation_runner import RECORDS, base_dir, experts, load_base, make_model, tokenizer

from loramix import XLoraConfig, XLoraModel
from loramix.evaluation.frozen import frozen_example_nlls
from loramix.evaluation.runner import EvalExample, example_nlls, greedy_answers, load_test_set

__all__ = ["base_dir", "experts", "tokenizer"]  # fixtures, used by name

PROMPTS = [
    "what is two plus two?",
    "a much longer question about the two experts, with many more words in it",
    "short",
]


def frozen_generation(model, tokenizer, prompt: str, new_tokens: int = 4):
    """Greedy tokens of `generate(scalings_mode="frozen")` for one prompt, and the NLL sum of
    those tokens under the logits it computed for them."""
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    output = model.generate(
        ids,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id or 0,
        scalings_mode="frozen",
        output_logits=True,
        return_dict_in_generate=True,
    )
    tokens = output.sequences[0, ids.shape[1] :].tolist()
    nll = sum(
        -torch.log_softmax(logits[0].float(), dim=-1)[token].item()
        for logits, token in zip(output.logits, tokens, strict=True)
    )
    return ids[0].tolist(), tokens, nll


@pytest.mark.parametrize("top_k", [None, 1])
def test_the_frozen_nll_is_what_frozen_generation_computes(base_dir, experts, tokenizer, top_k):
    model = make_model(base_dir, experts)  # random gate: per-token scalings differ
    if top_k is not None:  # top-k applies to the prompt's mean, as in generation
        config = XLoraConfig(adapters=experts, xlora_size=16, top_k_lora=top_k)
        gate = model.gate.state_dict()
        model = XLoraModel(load_base(base_dir), config)
        model.gate.load_state_dict(gate)
    examples, expected = [], []
    for prompt in PROMPTS:
        prompt_ids, tokens, nll = frozen_generation(model, tokenizer, prompt)
        record = {"prompt": prompt, "completion": tokenizer.decode(tokens)}
        labels = [-100] * len(prompt_ids) + tokens
        examples.append(EvalExample(record, prompt_ids + tokens, labels, len(prompt_ids)))
        expected.append(nll)
    sums, counts = frozen_example_nlls(model, tokenizer, examples, batch_size=3)  # padded
    assert counts == [4, 4, 4]
    assert sums == pytest.approx(expected, rel=1e-4)
    # Not the whole example under the prompt's mean: the prompt is read per token.
    mean = model(input_ids=torch.tensor([examples[1].input_ids[: examples[1].prompt_length]]))
    with model.fixed_scalings(mean["scalings"][0].mean(dim=0)):  # (L, E)
        (whole_frozen,), _, _ = example_nlls(model, tokenizer, [examples[1]], 1)
    assert whole_frozen != pytest.approx(sums[1], rel=1e-3)


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


def test_a_labelled_prompt_is_refused(base_dir, experts, tokenizer):
    model = make_model(base_dir, experts)
    example = EvalExample({"prompt": "a", "completion": "b"}, [5, 6, 7], [5, 6, 7], 2)
    with pytest.raises(ValueError, match="test example 0: labels on its prompt"):
        frozen_example_nlls(model, tokenizer, [example])
