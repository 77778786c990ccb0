"""The X-LoRA gate (the paper's "X-LoRA classifier").

A small MLP maps the scaling pass's last hidden state to one weight per token, adapted
module and expert. Its parameters live in `layers`, an `nn.Sequential` laid out exactly as
peft's `XLoraClassifier.layers`, so gate weights move between peft and loramix unchanged:
`layers.{i}.weight` / `layers.{i}.bias`.

Precision: the gate is built in float32 whatever the base model's dtype (`XLoraModel` and
`XLoraModel.from_pretrained` do so; `model.to(dtype)` casts it like any module). Its input, the
last hidden state, is cast to the gate's dtype, and its logits are taken to at least float32
before the softmax, so the scalings are float32 (float64 for a float64 gate) even over a
float16 or bfloat16 base: a softmax over half-precision logits loses the small scalings, and
the gate is too small (`D x H + H x L*E` weights) for its precision to cost time. The mixing
modules receive the scalings in the experts' dtype, cast once per forward call (see
`loramix.layer.MixingState`).

Two options of the original `xlora` package are honoured too: `use_bias=False` builds every
linear layer without a bias, and `enable_relu_and_dropout=False` stacks the hidden linear
layers with no ReLU and no dropout between them (peft has neither option: it always uses
both). A hidden layer is followed by `ReLU` and, when `xlora_dropout_p > 0`, `Dropout`.

`XLoraModel.forward` (`loramix.model`) calls it between the scaling pass and the mixed
pass; `loramix.training.gate` trains it.

Shapes: B batch, T tokens, D hidden size, L adapted modules, E experts, H `xlora_size`.
"""

from __future__ import annotations

import torch
from torch import nn

from loramix.config import XLoraConfig


class XLoraGate(nn.Module):
    """Hidden states `(B, T, D)` -> scalings `(B, T, L, E)`.

    Args:
        config: Depth, width, dropout, softmax and layer-wise options.
        hidden_size: D.
        n_layers: L, the number of adapted modules (not transformer blocks).
        n_experts: E.
    """

    def __init__(self, config: XLoraConfig, hidden_size: int, n_layers: int, n_experts: int):
        super().__init__()
        self.n_layers = n_layers
        self.n_experts = n_experts
        self.layerwise = config.layerwise_scalings
        self.enable_softmax = config.enable_softmax
        self.temperature = config.softmax_temperature
        n_out = n_experts * n_layers if config.layerwise_scalings else n_experts
        layers: list[nn.Module] = []
        width = hidden_size
        for _ in range(config.xlora_depth - 1):
            layers.append(nn.Linear(width, config.xlora_size, bias=config.use_bias))
            if config.enable_relu_and_dropout:
                layers.append(nn.ReLU())
                if config.xlora_dropout_p > 0:
                    layers.append(nn.Dropout(config.xlora_dropout_p))
            width = config.xlora_size
        layers.append(nn.Linear(width, n_out, bias=config.use_bias))
        self.layers = nn.Sequential(*layers)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Scalings after the softmax over experts (before any top-k).

        Args:
            hidden_states: `(B, T, D)` last hidden state of the scaling pass, any float dtype.

        Returns:
            `(B, T, L, E)` scalings, float32 or wider (see the module docstring).
        """
        batch, tokens, _ = hidden_states.shape
        logits = self.layers(hidden_states.to(self.layers[-1].weight.dtype))  # (B, T, E or L*E)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if self.layerwise:
            logits = logits.view(batch, tokens, self.n_layers, self.n_experts)  # (B, T, L, E)
        else:
            logits = logits.unsqueeze(2)  # (B, T, 1, E): softmax once, then share it
        if self.enable_softmax:
            logits = torch.softmax(logits / self.temperature, dim=-1)
        return logits.expand(-1, -1, self.n_layers, -1)  # (B, T, L, E)

    def linear_layers(self) -> list[nn.Linear]:
        """The gate's linear layers in order (hidden layers, then the output layer)."""
        return [layer for layer in self.layers if isinstance(layer, nn.Linear)]


def select_top_k(scalings: torch.Tensor, k: int | None, renormalize: bool) -> torch.Tensor:
    """Keeps the k largest scalings per token and module; optionally softmaxes over them.

    Matches peft's X-LoRA: the kept scalings are unchanged unless `renormalize`, which
    replaces them by a softmax over the kept values (the others stay 0).

    Args:
        scalings: `(B, T, L, E)`.
        k: Experts kept per token and module; None keeps all.
        renormalize: peft's `enable_softmax_topk`.

    Returns:
        `(B, T, L, E)`.
    """
    if k is None or k >= scalings.shape[-1]:
        keep = scalings != 0 if renormalize else None
    else:
        top = scalings.topk(k, dim=-1).indices  # (B, T, L, k)
        keep = torch.zeros_like(scalings, dtype=torch.bool).scatter_(-1, top, True)
        keep &= scalings != 0
        if not renormalize:
            return scalings * keep
    if keep is None:
        return scalings
    masked = scalings.masked_fill(~keep, float("-inf"))
    return torch.softmax(masked, dim=-1).masked_fill(~keep, 0.0)
