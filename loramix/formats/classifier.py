"""The gate's weights under each format's key names.

The gate is one stack of linear layers; only the names of its weights differ:

    loramix, peft     `layers.{i}.weight/bias`: positions in an `nn.Sequential` of Linear,
                      ReLU and (when `xlora_dropout_p > 0`) Dropout modules
    original xlora    `inner.{i}.weight/bias` for the hidden layers, where `i` counts the ReLU
                      and Dropout modules too (a Dropout is there even when p = 0), and
                      `last.weight/bias` for the output layer
    mistral.rs        `inner.{k}` with `k` counting the hidden linear layers only, and `last`

Both `inner` numberings are read; they differ only for gates deeper than 2 with ReLU.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch.nn import functional

from loramix.config import XLoraConfig

_XLORA_KEY = re.compile(r"^(?:inner\.(?P<index>\d+)|last)\.(?P<part>weight|bias)$")


def loramix_positions(config: XLoraConfig) -> list[int]:
    """Positions of the gate's linear layers in `XLoraGate.layers` (hidden layers, then last)."""
    step = 1
    if config.enable_relu_and_dropout:
        step += 2 if config.xlora_dropout_p > 0 else 1
    return [k * step for k in range(config.xlora_depth)]


def xlora_positions(config: XLoraConfig, numbering: str) -> list[int]:
    """`inner` indices of the hidden linear layers: "xlora" (the original) or "mistralrs"."""
    step = 3 if numbering == "xlora" and config.enable_relu_and_dropout else 1
    return [k * step for k in range(config.xlora_depth - 1)]


def to_xlora_keys(
    gate_state: dict[str, torch.Tensor], config: XLoraConfig, numbering: str = "xlora"
) -> dict[str, torch.Tensor]:
    """loramix gate weights -> the original package's (or mistral.rs's) classifier keys."""
    names = [f"inner.{i}" for i in xlora_positions(config, numbering)] + ["last"]
    out = {}
    for position, name in zip(loramix_positions(config), names, strict=True):
        for part in ("weight", "bias"):
            key = f"layers.{position}.{part}"
            if key in gate_state:
                out[f"{name}.{part}"] = gate_state[key].detach().contiguous().cpu()
    return out


def from_xlora_keys(
    state: dict[str, torch.Tensor], config: XLoraConfig, path: Path
) -> dict[str, torch.Tensor]:
    """The original package's (or mistral.rs's) classifier keys -> loramix gate weights.

    Raises:
        ValueError: a key that is not `inner.{i}.*` / `last.*`, or hidden-layer indices
            that fit neither numbering for the config's `xlora_depth`; naming `path`.
    """
    found: dict[int, str] = {}
    for key in sorted(state):
        match = _XLORA_KEY.match(key)
        if match is None:
            raise ValueError(
                f"{path}: key {key!r} is not an X-LoRA classifier weight (expected "
                "inner.{i}.weight/bias and last.weight/bias)"
            )
        if match["index"] is not None:
            found[int(match["index"])] = key
    indices = sorted(found)
    for numbering in ("xlora", "mistralrs"):
        if indices == xlora_positions(config, numbering):
            break
    else:
        raise ValueError(
            f"{path}: hidden classifier layers inner.{indices} do not fit xlora_depth="
            f"{config.xlora_depth} (expected inner.{xlora_positions(config, 'xlora')}); "
            "check xlora_depth and enable_relu_and_dropout in xlora_config.json"
        )
    names = [f"inner.{i}" for i in indices] + ["last"]
    out = {}
    for position, name in zip(loramix_positions(config), names, strict=True):
        for part in ("weight", "bias"):
            if f"{name}.{part}" in state:
                out[f"layers.{position}.{part}"] = state[f"{name}.{part}"]
    return out


def pad_hidden_width(
    gate_state: dict[str, torch.Tensor], config: XLoraConfig, width: int
) -> dict[str, torch.Tensor]:
    """Zero-pads the hidden layers to `width` units; the gate's outputs stay exactly the same.

    A padded unit has zero weights and bias, so its value is 0 (after ReLU too) and the zero
    columns added to the next layer multiply it by 0.

    Raises:
        ValueError: when the hidden layers are wider than `width`.
    """
    if config.xlora_depth == 1 or config.xlora_size == width:
        return dict(gate_state)
    if config.xlora_size > width:
        raise ValueError(
            f"xlora_size={config.xlora_size} is wider than {width}; the gate cannot be narrowed "
            f"exactly. Retrain the gate with xlora_size <= {width}."
        )
    extra = width - config.xlora_size
    positions = loramix_positions(config)
    out = dict(gate_state)
    for rank, position in enumerate(positions):
        weight = gate_state[f"layers.{position}.weight"]  # (out, in)
        pad_in = 0 if rank == 0 else extra
        pad_out = extra if rank < len(positions) - 1 else 0
        out[f"layers.{position}.weight"] = functional.pad(weight, (0, pad_in, 0, pad_out))
        bias_key = f"layers.{position}.bias"
        if bias_key in gate_state:
            out[bias_key] = functional.pad(gate_state[bias_key], (0, pad_out))
    return out
