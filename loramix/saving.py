"""Saving and loading an `XLoraModel`: the loramix folder, peft's X-LoRA folder, the scalings log.

`XLoraModel.save_pretrained` and `XLoraModel.from_pretrained` call the functions here; the
model class keeps only the model's own logic (`loramix.model`). The folder layout:

    xlora_config.json                        the config, adapters -> "experts/<name>"
    gate.safetensors                         gate weights (`layers.{i}.weight/bias`)
    base_model.json                          the base model: name, source, fingerprint
    experts/<name>/adapter_config.json       each expert as a standard PEFT adapter
    experts/<name>/adapter_model.safetensors

With `safe_serialization=False` the weights are `gate.bin` and `adapter_model.bin`
(`torch.save`); both formats load. `base_model.json` and the training record beside it are
described in `loramix.records`.

A new folder appears whole (written beside it, then renamed). Into an existing folder, as
transformers and peft do, loramix's own files are replaced one rename each
(`xlora_config.json` last: whenever it exists, the files beside it come from one complete
save), the files of an earlier save that this one does not write (experts no longer in the
config, the other weight format) are removed, and every other file is left alone. A folder
that holds another kind of model (a PEFT adapter, a transformers model) is refused before
anything is written.

A folder written by peft's X-LoRA is read too: its config through `XLoraConfig.from_file`,
its gate from the classifier weights inside `adapter_model.safetensors`. Every write goes
through `loramix.atomic`, every read is checked before the base model is changed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from loramix.atomic import atomic_file, move_files_into
from loramix.config import CONFIG_NAME, XLoraConfig
from loramix.experts import (
    ADAPTER_CONFIG_NAME,
    BIN_WEIGHTS_NAME,
    SAFETENSORS_WEIGHTS_NAME,
    load_expert,
)
from loramix.records import (
    BASE_RECORD_NAME,
    base_record,
    check_base,
    prompt_rendering,
    read_base_record,
    read_training_record,
)

if TYPE_CHECKING:
    from loramix.model import XLoraModel

GATE_WEIGHTS_NAME = "gate.safetensors"
GATE_BIN_NAME = "gate.bin"  # save_pretrained(safe_serialization=False)
EXPERTS_DIR = "experts"
HUB_KWARGS = ("repo_id", "commit_message", "private", "token", "create_pr")
"""save_pretrained's keyword arguments for push_to_hub (as transformers names them)."""
FOREIGN_MARKERS = {
    "adapter_config.json": "a PEFT adapter (adapter_config.json)",
    "config.json": "a transformers model (config.json)",
}
"""Files that say a folder holds another kind of model: no loramix folder is saved beside them."""
EXPERT_FILES = (ADAPTER_CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, BIN_WEIGHTS_NAME)

__all__ = [  # prompt_rendering and read_training_record: for front ends (see loramix.records)
    "check_save_arguments",
    "load_folder",
    "prompt_rendering",
    "read_training_record",
    "save_folder",
    "save_pretrained",
    "write_folder",
]


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


def save_pretrained(
    model: XLoraModel,
    save_directory: str | os.PathLike[str],
    *,
    safe_serialization: bool = True,
    is_main_process: bool = True,
    push_to_hub: bool = False,
    **hub_kwargs: Any,
) -> None:
    """`XLoraModel.save_pretrained`: `save_folder` with transformers' keyword arguments.

    Args:
        model: The model.
        save_directory: The folder.
        safe_serialization: False writes `gate.bin` and `adapter_model.bin` with `torch.save`
            instead of safetensors (`load_folder` reads both).
        is_main_process: False writes nothing (the other processes of a distributed run).
        push_to_hub: Also upload loramix's files of the folder to the Hugging Face hub with
            `huggingface_hub` (`create_repo`, then `upload_folder`).
        **hub_kwargs: With `push_to_hub`: `repo_id` (default: the folder's name),
            `commit_message`, `private`, `token`, `create_pr`.

    Raises:
        TypeError: On a keyword argument loramix does not support (it is named).
        ValueError: If the folder holds another kind of model or is a file.
    """
    check_save_arguments(push_to_hub, hub_kwargs)
    if not is_main_process:
        return
    written = save_folder(model, save_directory, safe_serialization=safe_serialization)
    if push_to_hub:
        _push_to_hub(Path(save_directory), written, **hub_kwargs)


def check_save_arguments(push_to_hub: bool, hub_kwargs: dict[str, object]) -> None:
    """Refuse, by name, the keyword arguments of transformers' save_pretrained that do not apply.

    Raises:
        TypeError: Naming the unsupported arguments and the supported ones.
    """
    unsupported = sorted(set(hub_kwargs) - set(HUB_KWARGS))
    if unsupported:
        raise TypeError(
            f"save_pretrained() got unsupported keyword argument(s) {unsupported}: loramix "
            "writes the gate and each expert as one file each (no max_shard_size, variant, "
            "state_dict or save_function); it supports safe_serialization, is_main_process, "
            f"push_to_hub and, with push_to_hub, {list(HUB_KWARGS)}."
        )
    if hub_kwargs and not push_to_hub:
        raise TypeError(
            f"save_pretrained(): {sorted(hub_kwargs)} only apply with push_to_hub=True."
        )


def save_folder(
    model: XLoraModel, save_directory: str | os.PathLike[str], *, safe_serialization: bool = True
) -> list[str]:
    """Writes the model's folder (see the module docstring); returns the files written.

    Raises:
        ValueError: If `save_directory` is a file or holds another kind of model (nothing is
            written).
    """
    target = Path(save_directory)
    existing = target.exists()
    if existing:
        _check_save_target(target)
    parent = target if existing else target.parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=parent, prefix=f".{target.name}.tmp"))
    try:
        written = write_folder(model, staging, safe_serialization=safe_serialization)
        if existing:
            stale = [p for p in _own_files(target) if p not in written]
            move_files_into(staging, target, marker=CONFIG_NAME, remove=stale)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return sorted(p.as_posix() for p in written)


def write_folder(model: XLoraModel, folder: Path, *, safe_serialization: bool = True) -> set[Path]:
    """Writes the model's files into an existing, empty `folder` (not atomic by itself).

    Returns:
        The relative paths of the files written.
    """
    base = base_record(model.lm)
    written = {Path(CONFIG_NAME), Path(BASE_RECORD_NAME)}
    weights_name = SAFETENSORS_WEIGHTS_NAME if safe_serialization else BIN_WEIGHTS_NAME
    adapters = {}
    for index, name in enumerate(model.expert_names):
        expert_folder = Path(EXPERTS_DIR) / _folder_name(name, index)
        adapters[name] = expert_folder.as_posix()
        (folder / expert_folder).mkdir(parents=True)
        peft_config = dict(model.expert_configs[index])
        if base["name"] is not None:  # a real name, which peft's loaders and ours understand
            peft_config["base_model_name_or_path"] = base["name"]
        (folder / expert_folder / ADAPTER_CONFIG_NAME).write_text(_json_dumps(peft_config) + "\n")
        _save_weights(expert_state(model, index), folder / expert_folder / weights_name)
        written |= {expert_folder / ADAPTER_CONFIG_NAME, expert_folder / weights_name}
    gate_state = {k: v.detach().contiguous().cpu() for k, v in model.gate.state_dict().items()}
    gate_name = GATE_WEIGHTS_NAME if safe_serialization else GATE_BIN_NAME
    _save_weights(gate_state, folder / gate_name)
    written.add(Path(gate_name))
    (folder / BASE_RECORD_NAME).write_text(_json_dumps(base) + "\n")
    config = dataclasses.replace(model.current_config(), adapters=adapters)
    (folder / CONFIG_NAME).write_text(config.to_json_string())
    return written


def _push_to_hub(
    folder: Path,
    files: list[str],
    repo_id: str | None = None,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    create_pr: bool = False,
) -> None:
    """Uploads `files` of `folder` to a hub model repository (created if needed)."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    name = repo_id or folder.resolve().name
    repo = api.create_repo(name, private=private, exist_ok=True)
    api.upload_folder(
        repo_id=getattr(repo, "repo_id", None) or name,
        folder_path=folder,
        commit_message=commit_message or "Upload X-LoRA model (loramix)",
        allow_patterns=files,
        create_pr=create_pr,
    )


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
    check_base(base_model, read_base_record(folder), str(folder))
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
        if (folder / GATE_BIN_NAME).is_file():
            path = folder / GATE_BIN_NAME
            return torch.load(path, map_location="cpu", weights_only=True)
        if peft_path.is_file():  # a peft X-LoRA folder: the classifier's weights
            prefix = re.compile(r"^.*internal_xlora_classifier\.")
            state = load_file(peft_path, device="cpu")
            gate = {prefix.sub("", k): v for k, v in state.items() if prefix.match(k)}
            if gate:
                return gate
    except (SafetensorError, OSError, RuntimeError, pickle.UnpicklingError) as error:
        raise ValueError(
            f"{path if path.is_file() else peft_path}: cannot read gate weights ({error}); the "
            "file is corrupt or truncated"
        ) from None
    raise FileNotFoundError(
        f"{folder}: no {GATE_WEIGHTS_NAME} (or {GATE_BIN_NAME}) found; was this folder written "
        "by save_pretrained?"
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


def _save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    if path.suffix == ".bin":
        torch.save(state, path)
    else:
        save_file(state, path, metadata={"format": "pt"})


def _check_save_target(target: Path) -> None:
    """Refuse a save into a file, or into a folder that holds another kind of model."""
    if not target.is_dir():
        raise ValueError(f"save_pretrained: {target} is a file; pass a folder path.")
    found = [what for name, what in FOREIGN_MARKERS.items() if (target / name).exists()]
    if found:
        raise ValueError(
            f"save_pretrained: {target} holds {' and '.join(found)}; an X-LoRA saved beside it "
            "would make a folder that no loader reads as either. Nothing was written: save to "
            "another folder."
        )
    for name in (CONFIG_NAME, GATE_WEIGHTS_NAME, GATE_BIN_NAME, BASE_RECORD_NAME, EXPERTS_DIR):
        path = target / name
        if path.exists() and (path.is_dir() != (name == EXPERTS_DIR)):
            kind = "folder" if path.is_dir() else "file"
            raise ValueError(
                f"save_pretrained: {path} is in the way (a {kind} where loramix writes the "
                "other); move it away. Nothing was written."
            )


def _own_files(folder: Path) -> list[Path]:
    """loramix's files in an earlier save (relative paths); other files are never listed."""
    names = (CONFIG_NAME, GATE_WEIGHTS_NAME, GATE_BIN_NAME, BASE_RECORD_NAME)
    own = [Path(name) for name in names]
    experts = folder / EXPERTS_DIR
    if experts.is_dir():
        for expert in sorted(p for p in experts.iterdir() if p.is_dir()):
            own += [Path(EXPERTS_DIR) / expert.name / name for name in EXPERT_FILES]
    return [path for path in own if (folder / path).is_file()]


def _folder_name(name: str, index: int) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._")
    return safe if safe and safe == name else f"{index}_{safe or 'expert'}"


def _json_dumps(data: dict) -> str:
    return json.dumps(data, indent=2, sort_keys=True)
