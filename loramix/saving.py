"""Saving and loading an `XLoraModel`: the loramix folder, peft's X-LoRA folder, the scalings log.

`XLoraModel.save_pretrained` and `XLoraModel.from_pretrained` call the functions here; the
model class keeps only the model's own logic (`loramix.model`). The folder layout:

    xlora_config.json                        the config, adapters -> "experts/<name>"
    gate.safetensors                         gate weights (`layers.{i}.weight/bias`)
    experts/<name>/adapter_config.json       each expert as a standard PEFT adapter
    experts/<name>/adapter_model.safetensors

A folder written by peft's X-LoRA is read too: its config through `XLoraConfig.from_file`,
its gate from the classifier weights inside `adapter_model.safetensors`. Every write goes
through `loramix.atomic`, every read is checked before the base model is changed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from loramix.atomic import atomic_file, atomic_folder
from loramix.config import CONFIG_NAME, XLoraConfig
from loramix.experts import ADAPTER_CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, load_expert

if TYPE_CHECKING:
    from loramix.model import XLoraModel

GATE_WEIGHTS_NAME = "gate.safetensors"
EXPERTS_DIR = "experts"


def expert_state(model: XLoraModel, expert_index: int) -> dict[str, torch.Tensor]:
    """One expert's weights with PEFT's key names, read back from the stacked modules."""
    state = {}
    for name, module in zip(model.adapted_modules, model.mixed_modules(), strict=True):
        weights = module.expert_weights(expert_index)
        if weights is None:
            continue
        lora_a, lora_b = (w.detach().contiguous().cpu() for w in weights)
        if isinstance(module.base_layer, nn.Embedding):
            state[f"base_model.model.{name}.lora_embedding_A"] = lora_a
            state[f"base_model.model.{name}.lora_embedding_B"] = lora_b
        else:
            state[f"base_model.model.{name}.lora_A.weight"] = lora_a
            state[f"base_model.model.{name}.lora_B.weight"] = lora_b
    return state


def save_folder(model: XLoraModel, save_directory: str | os.PathLike[str]) -> None:
    """Writes the model's folder (see the module docstring) atomically."""
    with atomic_folder(save_directory) as staging:
        write_folder(model, staging)


def write_folder(model: XLoraModel, folder: Path) -> None:
    """Writes the model's files into an existing, empty `folder` (not atomic by itself)."""
    adapters = {}
    for index, name in enumerate(model.expert_names):
        expert_folder = Path(EXPERTS_DIR) / _folder_name(name, index)
        adapters[name] = expert_folder.as_posix()
        (folder / expert_folder).mkdir(parents=True)
        peft_config = dict(model.expert_configs[index])
        (folder / expert_folder / ADAPTER_CONFIG_NAME).write_text(_json_dumps(peft_config) + "\n")
        save_file(
            expert_state(model, index),
            folder / expert_folder / SAFETENSORS_WEIGHTS_NAME,
            metadata={"format": "pt"},
        )
    config = dataclasses.replace(model.current_config(), adapters=adapters)
    (folder / CONFIG_NAME).write_text(config.to_json_string())
    gate_state = {k: v.detach().contiguous().cpu() for k, v in model.gate.state_dict().items()}
    save_file(gate_state, folder / GATE_WEIGHTS_NAME, metadata={"format": "pt"})


def load_folder(
    cls: type[XLoraModel], base_model: PreTrainedModel, save_directory: str | os.PathLike[str]
) -> XLoraModel:
    """Loads a folder written by `save_folder` (or by peft's X-LoRA) onto `base_model`.

    Expert paths in the config are resolved relative to the folder. Everything is read and
    checked before `base_model` is changed; a gate that does not fit puts the base model's
    modules back before the error.
    """
    folder = Path(save_directory)
    config = XLoraConfig.from_file(folder)
    adapters = {}
    for name, path in config.adapters.items():
        path = Path(path)
        adapters[name] = str(path if path.is_absolute() else folder / path)
    config = dataclasses.replace(config, adapters=adapters)
    gate_state = read_gate_state(folder)
    experts = [load_expert(name, path) for name, path in config.adapters.items()]
    model = cls(base_model, config, experts)  # checks the experts before any change
    expected = model.gate.state_dict()
    missing, unexpected = (
        sorted(set(expected) - set(gate_state)),
        sorted(set(gate_state) - set(expected)),
    )
    if missing or unexpected:
        model.unload()
        raise ValueError(
            f"{folder}: gate weights do not fit the config (missing keys {missing}, "
            f"unexpected keys {unexpected}); check xlora_depth and layerwise_scalings."
        )
    for key, value in gate_state.items():
        if value.shape != expected[key].shape:
            model.unload()
            raise ValueError(
                f"{folder}: gate weight {key} has shape {tuple(value.shape)}, the config "
                f"needs {tuple(expected[key].shape)}; were the experts or the base model "
                "changed?"
            )
    model.gate.load_state_dict(gate_state)
    return model


def read_gate_state(folder: Path) -> dict[str, torch.Tensor]:
    """The gate's weights from `gate.safetensors`, or from a peft X-LoRA folder's classifier."""
    path = folder / GATE_WEIGHTS_NAME
    peft_path = folder / "adapter_model.safetensors"
    try:
        if path.is_file():
            return load_file(path, device="cpu")
        if peft_path.is_file():  # a peft X-LoRA folder: the classifier's weights
            prefix = re.compile(r"^.*internal_xlora_classifier\.")
            state = load_file(peft_path, device="cpu")
            gate = {prefix.sub("", k): v for k, v in state.items() if prefix.match(k)}
            if gate:
                return gate
    except (SafetensorError, OSError) as error:
        raise ValueError(
            f"{path if path.is_file() else peft_path}: cannot read gate weights ({error}); the "
            "file is corrupt or truncated"
        ) from None
    raise FileNotFoundError(
        f"{folder}: no {GATE_WEIGHTS_NAME} found; was this folder written by save_pretrained?"
    )


def save_scalings_log(model: XLoraModel, path: str | os.PathLike[str]) -> None:
    """Writes the scalings log as `.npz`: `scalings_{i}` arrays `(B, T, L, E)`, plus the axes.

    The file also holds `expert_names` and `adapted_modules` so it can be read alone.
    """
    arrays = {f"scalings_{i}": s.float().numpy() for i, s in enumerate(model.get_scalings_log())}
    arrays["expert_names"] = np.array(model.expert_names)
    arrays["adapted_modules"] = np.array(model.adapted_modules)
    with atomic_file(path, suffix=".npz") as tmp:  # np.savez adds .npz to other names
        np.savez(tmp, **arrays)


def _folder_name(name: str, index: int) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._")
    return safe if safe and safe == name else f"{index}_{safe or 'expert'}"


def _json_dumps(data: dict) -> str:
    return json.dumps(data, indent=2, sort_keys=True)
