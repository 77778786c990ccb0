"""Shared set-up for the benchmarks: a random model with SmolLM2-135M's shape and experts.

Every benchmark measures loramix, the base model and peft's X-LoRA in the same run and
prints ratios, so results compare across machines.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

SEVEN_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def smollm2_135m_config() -> LlamaConfig:
    """SmolLM2-135M's architecture (random weights; no download needed)."""
    return LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )


def random_base(seed: int = 0, use_cache: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = smollm2_135m_config()
    config.use_cache = use_cache
    return LlamaForCausalLM(config).eval()


def make_experts(n_experts: int, rank: int, folder: Path | None = None) -> dict[str, str]:
    """Saves `n_experts` random rank-`rank` LoRA adapters on all seven projections."""
    folder = folder or Path(tempfile.mkdtemp(prefix="loramix-bench-"))
    base = random_base()
    experts = {}
    for index in range(n_experts):
        config = LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=SEVEN_PROJECTIONS, init_lora_weights=False
        )
        torch.manual_seed(100 + index)
        peft_model = get_peft_model(base, config)
        path = folder / f"expert_{index}"
        peft_model.save_pretrained(path)
        base = peft_model.unload()
        experts[f"expert_{index}"] = str(path)
    return experts


def time_call(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
