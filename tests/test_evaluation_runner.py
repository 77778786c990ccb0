"""loramix.evaluation.runner: NLL by hand, verifier counts, one expert alone equals peft."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import LLAMA_TARGETS, make_expert
from peft import PeftModel
from tiny_tokenizer import save_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from loramix import XLoraConfig, XLoraModel
from loramix.evaluation.report import EvalReport, nll_difference_interval
from loramix.evaluation.runner import (
    FirstLineDone,
    completion_nll,
    evaluate,
    exact_match,
    greedy_answers,
    load_test_set,
    resolve_systems,
    system_context,
)

RECORDS = [
    {"prompt": "what is two plus two?", "completion": "four.", "ok": True},
    {"prompt": "the capital of france?", "completion": "paris is the capital", "ok": False},
    {"prompt": "hello world, answer in one word", "completion": "hello", "ok": True},
]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("base") / "tiny")


def load_base(base_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(base_dir).eval()


@pytest.fixture(scope="module")
def experts(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("experts")
    return {
        name: str(make_expert(lambda: load_base(base_dir), root / name, seed, LLAMA_TARGETS))
        for name, seed in (("bio", 1), ("chem", 2))
    }


@pytest.fixture(scope="module")
def tokenizer(base_dir: Path):
    return AutoTokenizer.from_pretrained(base_dir)


def make_model(base_dir: Path, experts: dict[str, str], gate_bias=None) -> XLoraModel:
    model = XLoraModel(load_base(base_dir), XLoraConfig(adapters=experts, xlora_size=16))
    with torch.no_grad():
        last = model.gate.layers[-1]
        if gate_bias is None:
            torch.manual_seed(0)
            for param in model.gate.parameters():
                param.normal_(0, 0.5)
        else:  # constant scalings softmax(gate_bias) for every token
            last.weight.zero_()
            last.bias.copy_(torch.tensor(gate_bias))
    return model


@pytest.fixture
def test_file(tmp_path: Path) -> Path:
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


def hand_nll(lm: torch.nn.Module, tokenizer, records: list[dict]) -> float:
    """Mean NLL per completion token, from the chat text and a plain causal LM."""
    total, count = 0.0, 0
    for record in records:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": record["prompt"]}],
            tokenize=False,
            add_generation_prompt=True,
        )
        answer = record["completion"] + "<|im_end|>\n"  # what the template adds after it
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + answer_ids])
        with torch.no_grad():
            log_probs = torch.log_softmax(lm(input_ids=ids).logits[0].double(), dim=-1)
        for k, token in enumerate(answer_ids):
            position = len(prompt_ids) + k  # the token's index; predicted at position - 1
            total -= log_probs[position - 1, token].item()
            count += 1
    return total / count


def test_nll_of_base_system_equals_hand_computation(base_dir, experts, tokenizer, test_file):
    model = make_model(base_dir, experts)
    report = evaluate(model, tokenizer, {"qa": test_file}, ["base"], max_new_tokens=0, batch_size=2)
    expected = hand_nll(load_base(base_dir), tokenizer, RECORDS)
    score = report.score("base", "qa")
    assert score.nll == pytest.approx(expected, rel=1e-5)
    assert score.accuracy is None and score.n_examples == 3
    n_answer = sum(
        len(tokenizer(r["completion"] + "<|im_end|>\n", add_special_tokens=False)["input_ids"])
        for r in RECORDS
    )
    assert score.n_tokens == n_answer


def test_accuracy_counts_what_the_verifier_accepts(base_dir, experts, tokenizer, test_file):
    model = make_model(base_dir, experts)
    seen = []

    def stub(record, generated):
        seen.append(generated)
        return record["ok"]

    report = evaluate(
        model, tokenizer, {"qa": test_file}, ["base", "xlora"], max_new_tokens=3, verifier=stub
    )
    for system in ("base", "xlora"):
        score = report.score(system, "qa")
        assert (score.n_correct, score.accuracy) == (2, pytest.approx(2 / 3))
    assert len(seen) == 6 and all(isinstance(text, str) for text in seen)
    assert report.settings["verifier"] == "stub"


def test_exact_match_reads_the_first_line() -> None:
    record = {"completion": " M-A-F "}
    assert exact_match(record, "M-A-F\nmore text")
    assert exact_match(record, "  M-A-F  ")
    assert not exact_match(record, "\nM-A-F")  # the first line is empty, as science reads it
    assert not exact_match(record, "M-A-F-K")
    assert not exact_match(record, "")


def test_generation_stops_after_the_first_line(tokenizer) -> None:
    prompt = tokenizer("hello", add_special_tokens=False)["input_ids"]
    rows = [prompt + tokenizer(text)["input_ids"] for text in ("four.\n", "four. the")]
    width = max(len(row) for row in rows)
    ids = torch.tensor([row + [0] * (width - len(row)) for row in rows])
    done = FirstLineDone(tokenizer, len(prompt))(ids, None)
    assert done.tolist() == [True, False]


def test_one_hot_system_equals_the_expert_alone_in_peft(base_dir, experts, tokenizer, test_file):
    model = make_model(base_dir, experts)
    examples = load_test_set(test_file, tokenizer)
    peft_model = PeftModel.from_pretrained(load_base(base_dir), experts["chem"]).eval()
    with system_context(model, "expert:chem"):
        ours = completion_nll(model, tokenizer, examples, batch_size=3)[0]
        answers = greedy_answers(model, tokenizer, examples, max_new_tokens=4, batch_size=3)
    theirs = hand_nll(peft_model, tokenizer, RECORDS)
    assert ours == pytest.approx(theirs, rel=1e-5)
    assert ours != pytest.approx(hand_nll(load_base(base_dir), tokenizer, RECORDS), rel=1e-3)
    for example, answer in zip(examples, answers, strict=True):  # unpadded, one by one
        ids = torch.tensor([example.input_ids[: example.prompt_length]])
        with torch.no_grad():
            out = peft_model.generate(
                input_ids=ids,
                max_new_tokens=4,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=tokenizer.eos_token_id,
                stopping_criteria=[FirstLineDone(tokenizer, ids.shape[1])],
            )
        assert answer == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_uniform_system_mixes_half_and_half(base_dir, experts, tokenizer, test_file):
    examples = load_test_set(test_file, tokenizer)
    model = make_model(base_dir, experts, gate_bias=[0.0, 0.0])  # the gate itself is uniform
    with system_context(model, "uniform"):
        uniform = completion_nll(model, tokenizer, examples)[0]
    gate = completion_nll(model, tokenizer, examples)[0]
    assert uniform == pytest.approx(gate, rel=1e-5)


def test_xlora_usage_is_the_mean_scalings(base_dir, experts, tokenizer, test_file):
    model = make_model(base_dir, experts, gate_bias=[1.0, -1.0])
    report = evaluate(model, tokenizer, {"qa": test_file}, ["xlora"], max_new_tokens=0)
    expected = torch.softmax(torch.tensor([1.0, -1.0]), dim=0).tolist()
    assert list(report.usage["qa"]) == ["bio", "chem"]
    assert list(report.usage["qa"].values()) == pytest.approx(expected, rel=1e-5)


def test_model_is_left_as_found(base_dir, experts, tokenizer, test_file):
    model = make_model(base_dir, experts)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    model.train()  # evaluation runs in eval mode (no gate dropout), then puts this back
    evaluate(model, tokenizer, {"qa": test_file}, max_new_tokens=2, limit=1)
    assert model.training and model.gate.training
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)


def test_resolve_systems_expands_experts_and_names_the_choices() -> None:
    names = ["bio", "chem"]
    assert resolve_systems(["base", "experts", "uniform", "xlora"], names) == [
        "base",
        "expert:bio",
        "expert:chem",
        "uniform",
        "xlora",
    ]
    assert resolve_systems(["expert:chem", "experts"], names) == ["expert:chem", "expert:bio"]
    with pytest.raises(ValueError, match="expert:bio, expert:chem"):
        resolve_systems(["expert:phys", "best"], names)


def test_bad_options_are_listed_before_any_work(base_dir, experts, tokenizer, test_file):
    model = make_model(base_dir, experts)
    with pytest.raises(ValueError) as info:
        evaluate(model, tokenizer, {"qa": test_file}, ["gpt"], limit=0, batch_size=0)
    message = str(info.value)
    assert "limit=0" in message and "batch_size=0" in message and "'gpt'" in message


def test_test_records_need_a_completion(tmp_path: Path, tokenizer) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"text": "no answer"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: .*\"completion\""):
        load_test_set(path, tokenizer)
    path.write_text('{"text": "no answer"}\n{"prompt": "a", "completion": "b"}\nnot json\n')
    with pytest.raises(ValueError) as info:
        load_test_set(path, tokenizer)
    lines = str(info.value).splitlines()
    assert lines[0] == f"{path}: 2 bad lines:"
    assert lines[1].startswith("  line 1: test records need") and "column 1" in lines[2]


# ------------------------------------------------------------------ report and targets


def test_frozen_equals_granular_when_the_gate_is_constant(base_dir, experts, tokenizer, test_file):
    model = make_model(base_dir, experts, gate_bias=[1.0, -1.0])  # same scalings every token
    report = evaluate(
        model, tokenizer, {"qa": test_file}, ["xlora", "xlora-frozen"], max_new_tokens=2
    )
    granular, frozen = report.score("xlora", "qa"), report.score("xlora-frozen", "qa")
    assert frozen.nll == pytest.approx(granular.nll, rel=1e-5)
    assert frozen.accuracy == granular.accuracy
    varying = make_model(base_dir, experts)  # random gate: per-token scalings differ
    report = evaluate(
        varying, tokenizer, {"qa": test_file}, ["xlora", "xlora-frozen"], max_new_tokens=0
    )
    assert report.score("xlora-frozen", "qa").nll != pytest.approx(report.score("xlora", "qa").nll)


def test_scores_carry_bootstrap_intervals(base_dir, experts, tokenizer, test_file):
    model = make_model(base_dir, experts)
    report = evaluate(model, tokenizer, {"qa": test_file}, ["base", "xlora"], max_new_tokens=2)
    for system in ("base", "xlora"):
        score = report.score(system, "qa")
        low, high = score.nll_ci
        assert low <= score.nll <= high and low < high
        assert score.accuracy_ci[0] <= score.accuracy <= score.accuracy_ci[1]
    assert "## 95% confidence intervals" in report.to_markdown()
    again = EvalReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert again.score("xlora", "qa") == report.score("xlora", "qa")  # intervals survive JSON
    ours, theirs = report.score("xlora", "qa"), report.score("base", "qa")
    assert len(ours.example_nlls) == ours.n_examples == len(ours.example_tokens)
    assert sum(ours.example_nlls) / sum(ours.example_tokens) == pytest.approx(ours.nll)
    assert ours.example_tokens == theirs.example_tokens  # the same examples, in the same order
    low, high = nll_difference_interval(ours, theirs)
    assert low <= ours.nll - theirs.nll <= high
