"""Tests of loramix.training.loss: the labelled positions' loss equals the model's own loss,
and the trainer keeps the model's loss wherever it could differ."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch
from helpers import LLAMA_TARGETS, TINY_DECODER, make_expert, randomize_gate, tiny_llama
from peft import LoraConfig, get_peft_model
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Trainer,
    TrainingArguments,
)

from loramix import XLoraConfig, XLoraModel
from loramix.training.data import IGNORE_INDEX, PadCollator, TokenizedDataset
from loramix.training.gate import GateTrainer
from loramix.training.loss import (
    CompletionLossTrainer,
    RowNlls,
    causal_lm_model_type,
    forward_labelled,
    labelled_logits_reason,
    row_nlls,
)
from loramix.training.trainer import TrainingConfig, run_trainer

CONFIG = TrainingConfig(
    batch_size=3, progress=False, logging_steps=1, warmup=0, lr=1e-2, eval_fraction=0.0
)


def lora_llama(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, init_lora_weights=False)
    return get_peft_model(tiny_llama(seed), config)


def examples(n: int = 6, seed: int = 0) -> list[dict[str, list[int]]]:
    """Prompt/completion-shaped examples of different lengths: labels on the last few tokens."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = 5 + (i * 3) % 7
        ids = torch.randint(3, 97, (length,), generator=generator).tolist()
        answer = 1 + i % 3
        labels = [IGNORE_INDEX] * (length - answer) + ids[length - answer :]
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": labels})
    return rows


def batch() -> dict[str, torch.Tensor]:
    return PadCollator(0)(examples())  # (B, T) with right padding


def lora_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("num_items", [None, 7])
def test_labelled_loss_and_gradients_equal_the_models(num_items):
    inputs = batch()
    model = lora_llama().train()
    kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    own = model(**inputs, **kwargs).loss
    own.backward()
    own_grads = lora_grads(model)
    model.zero_grad()

    mine, out = forward_labelled(model, inputs, kwargs.get("num_items_in_batch"))
    labelled = int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert out.logits.shape == (labelled, 97)  # not (B, T, vocab)
    mine.backward()
    torch.testing.assert_close(mine, own, rtol=1e-6, atol=1e-7)
    for name, grad in lora_grads(model).items():
        torch.testing.assert_close(grad, own_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def train(
    model: torch.nn.Module, tmp_path: Path, trainer_class=CompletionLossTrainer, **changes
) -> Trainer:
    settings = {"max_steps": 4, "save_steps": 100, **changes}
    return run_trainer(
        model,
        TokenizedDataset(examples(13)),
        TokenizedDataset(examples(5, seed=1)),
        collator=PadCollator(0),
        config=dataclasses.replace(CONFIG, **settings),
        out=tmp_path,
        trainer_class=trainer_class,
    )


def logged(trainer: Trainer, key: str) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry]


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_trainer_takes_the_labelled_logits_and_trains_as_with_the_models_loss(grad_accum, tmp_path):
    """Also with gradient accumulation over micro-batches of different label counts, where
    the loss is a sum over the whole accumulated batch's labels."""
    fast = train(lora_llama(), tmp_path / "fast", grad_accum=grad_accum, eval_steps=2)
    plain = train(lora_llama(), tmp_path / "plain", Trainer, grad_accum=grad_accum, eval_steps=2)
    assert fast.labelled_logits is True
    assert len(logged(fast, "loss")) == 4 and len(logged(fast, "eval_loss")) == 2
    assert logged(fast, "loss") == pytest.approx(logged(plain, "loss"), rel=1e-5)
    assert logged(fast, "eval_loss") == pytest.approx(logged(plain, "eval_loss"), rel=1e-5)
    plain_weights = dict(plain.model.named_parameters())
    for name, weight in fast.model.named_parameters():
        if weight.requires_grad:
            torch.testing.assert_close(weight, plain_weights[name], rtol=1e-4, atol=1e-6)


def test_a_trained_head_takes_the_labelled_logits_too(tmp_path):
    def head_trained() -> torch.nn.Module:
        model = tiny_llama()
        for name, parameter in model.named_parameters():
            parameter.requires_grad = name.startswith("lm_head") or "embed_tokens" in name
        return model

    fast = train(head_trained(), tmp_path / "fast")
    plain = train(head_trained(), tmp_path / "plain", Trainer)
    assert fast.labelled_logits is True
    assert logged(fast, "loss") == pytest.approx(logged(plain, "loss"), rel=1e-5)


def test_gate_trainer_takes_the_labelled_logits_of_the_xlora_model(llama_experts, tmp_path):
    model = XLoraModel(tiny_llama(), XLoraConfig(hidden_size=32, adapters=llama_experts))
    randomize_gate(model)
    model.train()
    inputs = batch()
    own = model(**inputs).loss
    own.backward()
    own_grads = [p.grad.clone() for p in model.gate.parameters()]
    model.zero_grad()

    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = GateTrainer(model=model, args=args)
    loss, output = trainer.compute_loss(model, dict(inputs), return_outputs=True)
    assert trainer.labelled_logits is True
    assert output["scalings"].shape[:2] == inputs["input_ids"].shape
    loss.backward()
    torch.testing.assert_close(loss, own, rtol=1e-6, atol=1e-7)
    for grad, expected in zip((p.grad for p in model.gate.parameters()), own_grads, strict=True):
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)


class LlamaWithExtraLoss(LlamaForCausalLM):
    """A Llama whose loss adds a term of its own (as a z-loss would)."""

    def forward(self, *args, **kwargs):
        output = super().forward(*args, **kwargs)
        if output.loss is not None:
            output.loss = output.loss + 0.5
        return output


class LlamaWithoutMasks(LlamaForCausalLM):
    """A Llama that ignores `logits_to_keep` (as a model written before it would)."""

    def forward(self, *args, logits_to_keep=0, **kwargs):
        return super().forward(*args, **kwargs)


def tiny_cohere() -> torch.nn.Module:
    torch.manual_seed(0)
    return CohereForCausalLM(CohereConfig(**TINY_DECODER))


def tiny_mixtral_with_router_loss() -> torch.nn.Module:
    torch.manual_seed(0)
    config = MixtralConfig(
        **TINY_DECODER, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True
    )
    return MixtralForCausalLM(config)


def llama_like(cls):
    def make() -> torch.nn.Module:
        torch.manual_seed(0)
        return cls(tiny_llama().config)

    return make


@pytest.mark.parametrize(
    ("make_model", "reason"),
    [
        (llama_like(LlamaWithExtraLoss), "its loss differs (first labelled batch"),
        (llama_like(LlamaWithoutMasks), "it does not take such a mask"),
        (tiny_cohere, "model type 'cohere' is not among those checked for it"),
        (tiny_mixtral_with_router_loss, "its loss adds the router's auxiliary loss"),
    ],
)
def test_trainer_keeps_the_models_loss_where_it_could_differ(make_model, reason, tmp_path, caplog):
    def norm_trained() -> torch.nn.Module:
        model = make_model()
        for name, parameter in model.named_parameters():
            parameter.requires_grad = name.endswith("model.norm.weight")
        return model

    with caplog.at_level(logging.INFO, logger="loramix.training.loss"):
        trainer = train(norm_trained(), tmp_path / "out")
    assert trainer.labelled_logits is False
    assert reason in caplog.text
    plain = train(norm_trained(), tmp_path / "plain", Trainer)
    assert logged(trainer, "loss") == pytest.approx(logged(plain, "loss"))


def test_the_check_waits_for_a_batch_with_labels(tmp_path):
    model = lora_llama().train()
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = CompletionLossTrainer(model=model, args=args)
    unlabelled = batch()
    unlabelled["labels"] = torch.full_like(unlabelled["labels"], IGNORE_INDEX)
    trainer.compute_loss(model, unlabelled)
    assert trainer.labelled_logits is None
    trainer.compute_loss(model, batch())
    assert trainer.labelled_logits is True


def test_model_type_seen_through_peft_and_xlora(llama_experts):
    assert causal_lm_model_type(lora_llama()) == "llama"
    xlora = XLoraModel(tiny_llama(), XLoraConfig(hidden_size=32, adapters=llama_experts))
    assert causal_lm_model_type(xlora) == "llama"
    assert causal_lm_model_type(torch.nn.Linear(2, 2)) is None


def full_and_labelled_sums(model, inputs, **forward) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        fast_sums, fast_counts, _ = row_nlls(model, {**inputs, **forward}, labelled=True)
        full_sums, full_counts, _ = row_nlls(model, {**inputs, **forward}, labelled=False)
    assert fast_counts.tolist() == full_counts.tolist()
    return fast_sums, full_sums


def test_row_nlls_agree_with_and_without_the_labelled_positions(llama_experts):
    """The evaluation's per-example sums: a peft LoRA, and an X-LoRA model with per-token
    scalings, with one fixed mix per sequence, and with its adapters off."""
    xlora = XLoraModel(tiny_llama(), XLoraConfig(hidden_size=32, adapters=llama_experts))
    randomize_gate(xlora)
    xlora.eval()
    inputs = batch()
    inputs["labels"][2] = IGNORE_INDEX  # a row without labels sums to 0
    for model in (lora_llama().eval(), xlora):
        fast, full = full_and_labelled_sums(model, inputs)
        torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6)
        assert fast[2] == 0
        with torch.no_grad():
            mean = model(**inputs).loss
        counts = (inputs["labels"][:, 1:] != IGNORE_INDEX).sum()
        torch.testing.assert_close(fast.sum() / counts, mean)
    mixes = torch.softmax(torch.randn(len(inputs["labels"]), 3), dim=-1)  # (B, E)
    with xlora.fixed_scalings(mixes, per_sequence=True):
        torch.testing.assert_close(*full_and_labelled_sums(xlora, inputs), rtol=1e-5, atol=1e-6)
    with xlora.disable_adapters():
        torch.testing.assert_close(*full_and_labelled_sums(xlora, inputs), rtol=1e-5, atol=1e-6)


def test_an_adapted_head_takes_every_positions_logits(tmp_path, caplog):
    """Experts on lm_head: per-token mixing of the head needs every position, so the
    evaluation (and training) keep the full logits, with the same numbers."""
    experts = {
        name: str(make_expert(tiny_llama, tmp_path / name, seed, ["q_proj", "lm_head"]))
        for seed, name in enumerate(("a", "b"), start=1)
    }
    xlora = XLoraModel(tiny_llama(), XLoraConfig(hidden_size=32, adapters=experts))
    randomize_gate(xlora)
    xlora.eval()
    assert "adapt the output head" in labelled_logits_reason(xlora)
    inputs = batch()
    with caplog.at_level(logging.INFO, logger="loramix.training.loss"):
        nlls = RowNlls(xlora)
        with torch.no_grad():
            sums, counts, _ = nlls(inputs)
            full, _, _ = row_nlls(xlora, inputs, labelled=False)
    assert nlls.labelled is False and "adapt the output head" in caplog.text
    torch.testing.assert_close(sums, full)


def test_row_nlls_fall_back_once_when_the_mask_is_not_taken(caplog):
    model = llama_like(LlamaWithoutMasks)().eval()
    nlls = RowNlls(model)
    assert nlls.labelled is True  # a listed type: tried first
    with caplog.at_level(logging.INFO, logger="loramix.training.loss"), torch.no_grad():
        first, _, _ = nlls(batch())
        second, _, _ = nlls(batch())
    assert nlls.labelled is False and caplog.text.count("does not take such a mask") == 1
    with torch.no_grad():
        expected, _, _ = row_nlls(model, batch(), labelled=False)
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)
