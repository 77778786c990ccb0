"""Test helpers: tiny random models and LoRA experts, built in memory from transformers configs.

Tests import these by name (`from helpers import tiny_llama`); `tests/` is on the import path
(pyproject's `pythonpath`), so this also works under `--import-mode=importlib`. The pytest
fixtures built on them live in `conftest.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    TrainerCallback,
)

from loramix.evaluation.report import EvalReport, Score

torch.set_num_threads(1)

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


TINY_DECODER = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    pad_token_id=0,
)
"""Config fields of the tiny Llama-shaped models (other Llama-like families take them too)."""


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        **TINY_DECODER, max_position_embeddings=128, eos_token_id=1, bos_token_id=2
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=128, pad_token_id=0
    )
    return GPT2LMHeadModel(config).eval()


MODEL_FACTORIES: dict[str, tuple[Callable[..., torch.nn.Module], list[str]]] = {
    "llama": (tiny_llama, LLAMA_TARGETS),
    "gpt2": (tiny_gpt2, GPT2_TARGETS),
}


def make_expert(
    base_factory: Callable[..., torch.nn.Module],
    folder: Path,
    seed: int,
    targets: list[str],
    rank: int = 4,
    alpha: int = 8,
    **lora_kwargs,
) -> Path:
    """Saves a PEFT LoRA adapter with random (nonzero) A and B for a fresh base model."""
    base = base_factory()
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=targets,
        init_lora_weights=False,  # random B too, so the expert changes the outputs
        lora_dropout=0.0,
        **lora_kwargs,
    )
    torch.manual_seed(seed)
    peft_model = get_peft_model(base, config)
    with torch.no_grad():  # make the updates large enough to matter in tests
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                param.normal_(0, 0.2)
    peft_model.save_pretrained(folder)
    return folder


def random_ids(batch: int = 2, tokens: int = 7, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 97, (batch, tokens), generator=generator)


def randomize_gate(model: torch.nn.Module, seed: int = 0, std: float = 1.0) -> None:
    """Random gate weights (an `XLoraModel`'s `gate`), so that the scalings differ."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.gate.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * std)


def crafted_report(nll: dict[str, dict[str, float]]) -> EvalReport:
    """An evaluation report with the given NLLs (system -> test set -> NLL), nothing run."""
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


class StopAfterSave(TrainerCallback):
    """Simulates an interruption (Ctrl-C) right after the checkpoint of a given step is
    saved, before the run's result is written."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step == self.step:
            raise KeyboardInterrupt
