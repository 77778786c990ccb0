"""Tiny random models and LoRA experts, built in memory from transformers configs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

torch.set_num_threads(1)

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
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


@pytest.fixture
def llama_experts(tmp_path: Path) -> dict[str, str]:
    """Three experts on a tiny Llama with different ranks, alphas and targets."""
    return {
        "bio": str(make_expert(tiny_llama, tmp_path / "bio", 1, LLAMA_TARGETS, rank=4)),
        "chem": str(make_expert(tiny_llama, tmp_path / "chem", 2, LLAMA_TARGETS, rank=2, alpha=4)),
        "mech": str(
            make_expert(
                tiny_llama, tmp_path / "mech", 3, ["q_proj", "v_proj"], rank=3, use_rslora=True
            )
        ),
    }


@pytest.fixture
def gpt2_experts(tmp_path: Path) -> dict[str, str]:
    return {
        "a": str(make_expert(tiny_gpt2, tmp_path / "a", 1, GPT2_TARGETS, rank=4)),
        "b": str(make_expert(tiny_gpt2, tmp_path / "b", 2, GPT2_TARGETS, rank=2)),
    }


def random_ids(batch: int = 2, tokens: int = 7, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 97, (batch, tokens), generator=generator)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `cuda` run only where torch sees a CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
