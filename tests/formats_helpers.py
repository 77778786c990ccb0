"""Shared by the loramix.formats tests: a tiny X-LoRA with a random gate, its logits."""

from __future__ import annotations

import torch
from helpers import tiny_llama
from torch import nn

from loramix import XLoraConfig, XLoraModel

GATE_OPTIONS = [
    {},
    {"xlora_depth": 2, "xlora_size": 16, "layerwise_scalings": True},
    {"xlora_depth": 3, "xlora_size": 32, "xlora_dropout_p": 0.0},
    {"xlora_depth": 3, "xlora_size": 8, "enable_relu_and_dropout": False, "use_bias": False},
    {"top_k_lora": 2, "scaling_pass_value": 0.25, "global_scaling_weight": 0.6},
]


def build(experts: dict[str, str], seed: int = 0, **options) -> XLoraModel:
    model = XLoraModel(tiny_llama(), XLoraConfig(adapters=experts, **options))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.gate.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
    return model


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits
