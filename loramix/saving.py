"""Saving and loading an `XLoraModel` in any X-LoRA format, and the scalings log.

`XLoraModel.save_pretrained` and `XLoraModel.from_pretrained` call the functions here; the
model class keeps only the model's own logic (`loramix.model`). The layouts themselves
(loramix's folder, peft's, the original `xlora` package's, mistral.rs's) are in
`loramix.formats`; loramix's own:

    xlora_config.json                        the config, adapters -> "experts/<name>"
    gate.safetensors                         gate weights (`layers.{i}.weight/bias`)
    experts/<name>/adapter_config.json       each expert as a standard PEFT adapter
    experts/<name>/adapter_model.safetensors

Every write goes through `loramix.atomic`, every read is checked before the base model is
changed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel

from loramix import formats
from loramix.atomic import atomic_file
from loramix.formats import hub, native

if TYPE_CHECKING:
    from loramix.model import XLoraModel

GATE_WEIGHTS_NAME = native.GATE_WEIGHTS_NAME
EXPERTS_DIR = native.EXPERTS_DIR


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


def save_folder(
    model: XLoraModel,
    save_directory: str | os.PathLike[str],
    format: str = "loramix",
    base_model_id: str | None = None,
) -> None:
    """Writes the model's folder in `format` (see `loramix.formats`) atomically."""
    formats.write_folder(formats.contents_of_model(model, base_model_id), save_directory, format)


def write_folder(model: XLoraModel, folder: Path) -> None:
    """Writes loramix's folder into an existing, empty `folder` (not atomic by itself)."""
    native.write(formats.contents_of_model(model), folder)


def load_folder(
    cls: type[XLoraModel],
    base_model: PreTrainedModel | str | os.PathLike[str] | None,
    save_directory: str | os.PathLike[str],
    *,
    hub_options: dict[str, Any] | None = None,
    dtype: Any = None,
    device_map: Any = None,
) -> XLoraModel:
    """Loads an X-LoRA folder (or Hub id) of any format onto a base model.

    Everything is read and checked before the base model is changed; a gate that does not
    fit puts the base model's modules back before the error.

    Args:
        cls: `XLoraModel`.
        base_model: A causal LM; its Hub id or folder ("smollm2": the embedded model); or
            None for the base model the files name.
        save_directory: A folder, or a Hugging Face Hub id.
        hub_options: For `loramix.formats.hub.resolve` (`revision`, `cache_dir`, ...).
        dtype, device_map: For loading `base_model` from an id or folder.
    """
    folder = hub.resolve(save_directory, **(hub_options or {}))
    files = formats.read_folder(folder)
    base_model = _base_model(base_model, files.base_model_id, dtype, device_map)
    model = cls(base_model, files.config, files.experts)  # checks the experts first
    gate_state, expected = files.gate_state, model.gate.state_dict()
    missing, unexpected = (
        sorted(set(expected) - set(gate_state)),
        sorted(set(gate_state) - set(expected)),
    )
    if missing or unexpected:
        model.unload()
        raise ValueError(
            f"{folder}: gate weights do not fit the config (missing keys {missing}, "
            f"unexpected keys {unexpected}); check xlora_depth, layerwise_scalings, use_bias "
            "and enable_relu_and_dropout."
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


def _base_model(
    base_model: PreTrainedModel | str | os.PathLike[str] | None,
    named: str | None,
    dtype: Any,
    device_map: Any,
) -> PreTrainedModel:
    """The base model object: as given, or loaded from its id (given, or named by the files)."""
    if isinstance(base_model, nn.Module):
        given = [n for n, v in (("dtype", dtype), ("device_map", device_map)) if v is not None]
        if given:
            raise ValueError(
                f"{' and '.join(given)} apply when loramix loads the base model from an id or "
                "folder; for a model object, load it with them yourself (or call .to())"
            )
        return base_model
    if base_model is None:
        if not named:
            raise ValueError(
                "base_model is None and the X-LoRA files name no base model; pass the base "
                "model (an object, a Hub id or a folder)"
            )
        base_model = named
    if os.fspath(base_model) == "smollm2":
        from loramix.smollm2 import load_base_model

        if device_map is not None:
            raise ValueError("device_map: the embedded SmolLM2 loads on the CPU; leave it out")
        return load_base_model("smollm2", dtype=dtype or torch.float32)[0]
    from transformers import AutoModelForCausalLM

    options = {k: v for k, v in (("dtype", dtype), ("device_map", device_map)) if v is not None}
    return AutoModelForCausalLM.from_pretrained(os.fspath(base_model), **options)


def save_scalings_log(model: XLoraModel, path: str | os.PathLike[str]) -> None:
    """Writes the scalings log as `.npz`: `scalings_{i}` arrays `(B, T, L, E)`, plus the axes.

    The file also holds `expert_names` and `adapted_modules` so it can be read alone.
    """
    arrays = {f"scalings_{i}": s.float().numpy() for i, s in enumerate(model.get_scalings_log())}
    arrays["expert_names"] = np.array(model.expert_names)
    arrays["adapted_modules"] = np.array(model.adapted_modules)
    with atomic_file(path, suffix=".npz") as tmp:  # np.savez adds .npz to other names
        np.savez(tmp, **arrays)
