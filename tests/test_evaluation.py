"""loramix.evaluation: NLL by hand, verifier counts, expert-alone = peft, report files, targets."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import LLAMA_TARGETS, make_expert
from peft import PeftModel
from tiny_tokenizer import save_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from loramix import XLoraConfig, XLoraModel
from loramix.evaluation import (
    EvalReport,
    FirstLineDone,
    Score,
    completion_nll,
    evaluate,
    exact_match,
    greedy_answers,
    load_test_set,
    resolve_systems,
    science_verifier,
    system_context,
)

RECORDS = [
    {"prompt": "what is two plus two?", "completion": "four.", "ok": True},
    {"prompt": "the capital of france?", "completion": "paris is the capital", "ok": False},
    {"prompt": "hello world, answer in one word", "completion": "hello", "ok": True},
]


@contextlib.contextmanager
def standin_fixed_scalings(self: XLoraModel, weights: torch.Tensor) -> Iterator[None]:
    """Stand-in for `XLoraModel.fixed_scalings` until the model has it: the gate returns
    `weights` ((E,) or (L, E)) for every token. The scaling pass still runs, so both KV
    caches stay aligned during generation."""
    weights = torch.as_tensor(weights, dtype=torch.float32)
    if weights.dim() == 1:
        weights = weights.expand(self.n_layers, -1)  # (L, E)

    def fixed(hidden: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, L, E)
        return weights.to(hidden.dtype).expand(*hidden.shape[:2], *weights.shape)

    self.gate.forward = fixed
    try:
        yield
    finally:
        del self.gate.forward


@pytest.fixture(autouse=True)
def fixed_scalings_api(monkeypatch: pytest.MonkeyPatch) -> None:
    if not hasattr(XLoraModel, "fixed_scalings"):
        monkeypatch.setattr(XLoraModel, "fixed_scalings", standin_fixed_scalings, raising=False)


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


def test_science_verifier_uses_the_examples_task() -> None:
    import random

    from loramix.science import TASKS

    example = TASKS["biology"][0].sample(random.Random(0))
    assert science_verifier(example, example["completion"] + "\nextra")
    assert not science_verifier(example, "no idea")
    with pytest.raises(ValueError, match="exact-match verifier"):
        science_verifier({"prompt": "a", "completion": "b"}, "b")


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


def crafted_report(nll: dict[str, dict[str, float]]) -> EvalReport:
    sets = sorted({name for by_set in nll.values() for name in by_set})
    return EvalReport(
        expert_names=["bio", "chem"],
        test_sets={name: f"{name}.jsonl" for name in sets},
        systems=list(nll),
        scores={
            system: {
                name: Score(nll=v, accuracy=0.5, n_examples=4, n_tokens=20, n_correct=2)
                for name, v in by_set.items()
            }
            for system, by_set in nll.items()
        },
        usage={"bio": {"bio": 0.75, "chem": 0.25}},
        settings={"verifier": "exact_match", "max_new_tokens": 8},
    )


NUMBERS = {
    "expert:bio": {"bio": 1.00, "chem": 3.0, "mixed": 2.0, "composite": 2.5},
    "expert:chem": {"bio": 3.00, "chem": 1.0, "mixed": 2.0, "composite": 2.4},
    "uniform": {"bio": 1.50, "chem": 1.5, "mixed": 1.6, "composite": 2.0},
    "xlora": {"bio": 1.09, "chem": 1.2, "mixed": 1.6, "composite": 2.3},
}


def test_targets_pass_and_fail_on_crafted_numbers() -> None:
    checks = crafted_report(NUMBERS).check_targets({"bio": "bio", "chem": "chem"})
    status = {check.target.split(":")[0]: check.status for check in checks}
    # bio +9% passes; chem +20% fails; mixed ties the uniform average (a tie does not beat);
    # composite 2.3 beats both experts (the uniform average is not a rival there).
    assert status == {"bio": "pass", "chem": "fail", "mixed": "fail", "composite": "pass"}
    mixed = next(c for c in checks if c.target.startswith("mixed"))
    assert "uniform 1.600" in mixed.detail


def test_targets_missing_systems_or_sets_are_reported_not_passed() -> None:
    numbers = {k: v for k, v in NUMBERS.items() if k != "uniform"}
    checks = crafted_report(numbers).check_targets({"bio": "bio", "phys": "chem"})
    status = {check.target.split(":")[0]: check.status for check in checks}
    assert status == {"bio": "pass", "phys": "missing", "mixed": "missing", "composite": "pass"}
    assert not any(c.passed for c in checks if c.status == "missing")


def test_report_files_are_written_and_read_back(tmp_path: Path) -> None:
    report = crafted_report(NUMBERS)
    checks = report.check_targets({"bio": "bio"})
    paths = report.write(tmp_path / "out", checks)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["eval.json", "eval.md"]
    assert EvalReport.read(tmp_path / "out") == report
    assert EvalReport.read(paths["eval.json"]) == report
    data = json.loads(paths["eval.json"].read_text())
    assert data["targets"][0]["status"] == "pass"
    markdown = paths["eval.md"].read_text()
    assert "| xlora | 1.090 / 50% |" in markdown
    assert "| expert:bio | **1.000** / 50% |" in markdown  # lowest NLL of the column in bold
    assert "| bio | **0.750** | 0.250 |" in markdown
    assert "**PASS** bio: X-LoRA NLL within 10% of expert:bio" in markdown


def test_reading_a_foreign_json_names_the_cause(tmp_path: Path) -> None:
    path = tmp_path / "eval.json"
    path.write_text('{"scores": {}}')
    with pytest.raises(ValueError, match="not a loramix evaluation report"):
        EvalReport.read(path)
