"""Tests of loramix.training.loss: the labelled positions' loss equals the model's own loss,
and the trainer keeps the model's loss wherever it could differ."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch
from helpers import LLAMA_TARGETS, tiny_llama
from peft import LoraConfig, get_peft_model
from torch.utils.data import Dataset
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaForCausalLM, Trainer

from loramix import XLoraConfig, XLoraModel
from loramix.training.data import IGNORE_INDEX, PadCollator
from loramix.training.loss import CompletionLossTrainer, causal_lm_model_type, forward_labelled
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


class Examples(Dataset):
    def __init__(self, rows: list[dict[str, list[int]]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.rows[index]


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

    mine, out = forward_labelled(
        model, model.get_output_embeddings(), inputs, kwargs.get("num_items_in_batch")
    )
    assert out.logits.shape[1] == 1  # one position's logits, not (B, T, vocab)
    mine.backward()
    torch.testing.assert_close(mine, own, rtol=1e-6, atol=1e-7)
    for name, grad in lora_grads(model).items():
        torch.testing.assert_close(grad, own_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def train(model: torch.nn.Module, tmp_path: Path, trainer_class=CompletionLossTrainer) -> Trainer:
    return run_trainer(
        model,
        Examples(examples(9)),
        None,
        collator=PadCollator(0),
        config=dataclasses.replace(CONFIG, max_steps=4, save_steps=100),
        out=tmp_path,
        trainer_class=trainer_class,
    )


def test_trainer_takes_the_labelled_logits_and_trains_as_with_the_models_loss(tmp_path):
    fast = train(lora_llama(), tmp_path / "fast")
    plain = train(lora_llama(), tmp_path / "plain", trainer_class=Trainer)
    assert fast.labelled_logits is True
    fast_losses = [e["loss"] for e in fast.state.log_history if "loss" in e]
    plain_losses = [e["loss"] for e in plain.state.log_history if "loss" in e]
    assert len(fast_losses) == 4
    assert fast_losses == pytest.approx(plain_losses, rel=1e-5)
    plain_weights = dict(plain.model.named_parameters())
    for name, weight in fast.model.named_parameters():
        if weight.requires_grad:
            torch.testing.assert_close(weight, plain_weights[name], rtol=1e-4, atol=1e-6)


class ScaledLlama(LlamaForCausalLM):
    """A Llama whose logits are scaled after the head (as Cohere's and Granite's are)."""

    def forward(self, *args, **kwargs):
        labels = kwargs.pop("labels", None)
        output = super().forward(*args, **kwargs)
        output.logits = output.logits * 4.0
        if labels is not None:
            output.loss = self.loss_function(output.logits, labels, self.config.vocab_size)
        return output


def scaled_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return ScaledLlama(tiny_llama().config)


def tiny_gemma2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        final_logit_softcapping=30.0,
        pad_token_id=0,
    )
    return Gemma2ForCausalLM(config)


@pytest.mark.parametrize(
    ("make_model", "reason"),
    [
        (scaled_llama, "logits are not its output embeddings applied"),
        (tiny_gemma2, "model type 'gemma2' is not known to compute plain logits"),
    ],
)
def test_trainer_keeps_the_models_loss_where_logits_differ(make_model, reason, tmp_path, caplog):
    model = make_model()
    for name, parameter in model.named_parameters():  # train the last norm only
        parameter.requires_grad = name.endswith("model.norm.weight")
    with caplog.at_level(logging.INFO, logger="loramix.training.loss"):
        trainer = train(model, tmp_path / "out")
    assert trainer.labelled_logits is False
    assert reason in caplog.text

    torch.manual_seed(0)
    reference = make_model()
    for name, parameter in reference.named_parameters():
        parameter.requires_grad = name.endswith("model.norm.weight")
    plain = train(reference, tmp_path / "plain", trainer_class=Trainer)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses == pytest.approx([e["loss"] for e in plain.state.log_history if "loss" in e])


def test_a_trained_head_keeps_the_models_loss(tmp_path, caplog):
    model = tiny_llama()
    for name, parameter in model.named_parameters():
        parameter.requires_grad = name.startswith("lm_head") or name.endswith("embed_tokens.weight")
    with caplog.at_level(logging.INFO, logger="loramix.training.loss"):
        trainer = train(model, tmp_path / "out")
    assert trainer.labelled_logits is False
    assert "the output embeddings are trained" in caplog.text


def test_model_type_seen_through_peft_and_xlora(llama_experts):
    assert causal_lm_model_type(lora_llama()) == "llama"
    xlora = XLoraModel(tiny_llama(), XLoraConfig(hidden_size=32, adapters=llama_experts))
    assert causal_lm_model_type(xlora) == "llama"
    assert causal_lm_model_type(torch.nn.Linear(2, 2)) is None
