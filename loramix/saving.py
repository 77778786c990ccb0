"""Saving and loading an `XLoraModel` in any X-LoRA format, and the scalings log.

`XLoraModel.save_pretrained` and `XLoraModel.from_pretrained` call the functions here; the
model class keeps only the model's own logic (`loramix.model`). The layouts themselves
(loramix's folder, peft's, the original `xlora` package's, mistral.rs's) are in
`loramix.formats`; loramix's own:

    xlora_config.json                        the config, adapters -> "experts/<name>"
    gate.safetensors                         gate weights (`layers.{i}.weight/bias`)
    experts/<name>/adapter_config.json       each expert as a standard PEFT adapter
    experts/<name>/adapter_model.safetensors

    base_model.json                          the base model: name, source, fingerprint

With `safe_serialization=False` the weights are `gate.bin` and `adapter_model.bin`
(`torch.save`); both load. `base_model.json` and the training record beside it are described
in `loramix.records`; `from_pretrained` checks the base model against `base_model.json`.

A new folder appears whole (written beside it, then renamed). Into an existing folder, as
transformers and peft do, the format's own files are replaced one rename each
(`xlora_config.json` last: whenever it exists, the files beside it come from one complete
save), the files of an earlier save that this one does not write (experts no longer in the
config, the other weight format) are removed, and every other file is left alone. A folder
that holds another kind of model (a PEFT adapter, a transformers model) or an X-LoRA in
another format is refused before anything is written. Every format takes this one path
(`loramix.formats.existing`).

Every write goes through `loramix.atomic`, every read is checked before the base model is
changed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import PreTrainedModel

from loramix import formats
from loramix.atomic import atomic_file
from loramix.formats import existing, hub, native
from loramix.records import (
    CANONICAL_NAME,
    DEFAULT_MODEL,
    canonical_base_name,
    check_base,
    default_base,
    prompt_rendering,
    read_base_record,
    read_training_record,
)

if TYPE_CHECKING:
    from loramix.model import XLoraModel

GATE_WEIGHTS_NAME = native.GATE_WEIGHTS_NAME
GATE_BIN_NAME = native.GATE_BIN_NAME  # save_pretrained(safe_serialization=False)
EXPERTS_DIR = native.EXPERTS_DIR
HUB_KWARGS = ("repo_id", "commit_message", "private", "token", "create_pr")
"""save_pretrained's keyword arguments for push_to_hub (as transformers names them)."""

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
    format: str = "loramix",
    base_model_id: str | None = None,
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
        format, base_model_id: See `save_folder`.
        safe_serialization: False writes `gate.bin` and `adapter_model.bin` with `torch.save`
            instead of safetensors (loramix's format only; `load_folder` reads both).
        is_main_process: False writes nothing (the other processes of a distributed run).
        push_to_hub: Also upload the files written to the Hugging Face hub with
            `huggingface_hub` (`create_repo`, then `upload_folder`).
        **hub_kwargs: With `push_to_hub`: `repo_id` (default: the folder's name),
            `commit_message`, `private`, `token`, `create_pr`.

    Raises:
        TypeError: On a keyword argument loramix does not support (it is named).
        ValueError: If the folder holds another kind of model or is a file.
    """
    check_save_arguments(push_to_hub, hub_kwargs)
    if not safe_serialization and format != "loramix":
        raise ValueError(f"safe_serialization=False applies to format='loramix', not {format!r}")
    if not is_main_process:
        return
    written = save_folder(model, save_directory, format, base_model_id, safe_serialization)
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
            "state_dict or save_function); it supports format, base_model_id, "
            "safe_serialization, is_main_process, push_to_hub and, with push_to_hub, "
            f"{list(HUB_KWARGS)}."
        )
    if hub_kwargs and not push_to_hub:
        raise TypeError(
            f"save_pretrained(): {sorted(hub_kwargs)} only apply with push_to_hub=True."
        )


def save_folder(
    model: XLoraModel,
    save_directory: str | os.PathLike[str],
    format: str = "loramix",
    base_model_id: str | None = None,
    safe_serialization: bool = True,
) -> list[str]:
    """Writes the model's folder in `format` (see `loramix.formats`); returns the files.

    An existing folder keeps its other files (see the module docstring).

    Raises:
        ValueError: If `save_directory` is a file or holds another kind of model or another
            format's X-LoRA (nothing is written).
    """
    target = Path(save_directory)
    if format != "loramix":
        contents = formats.contents_of_model(model, base_model_id)
        written = formats.write_folder(contents, target, format, caller="save_pretrained")
    else:
        written = existing.save(
            target,
            format,
            lambda staging: write_folder(model, staging, safe_serialization=safe_serialization),
            caller="save_pretrained",
        )
    return sorted(p.as_posix() for p in written)


def write_folder(model: XLoraModel, folder: Path, *, safe_serialization: bool = True) -> set[Path]:
    """Writes loramix's folder into an existing, empty `folder` (not atomic by itself).

    The experts' `base_model_name_or_path` names the base model (see `loramix.records`), and
    `base_model.json` records it.

    Returns:
        The relative paths of the files written.
    """
    contents = formats.contents_of_model(model)
    name = contents.base_record["name"] if contents.base_record else None
    if name is not None:  # a real name, which peft's loaders and ours understand
        for config in contents.expert_configs:
            config["base_model_name_or_path"] = name
    native.write(contents, folder)  # with base_model.json
    if not safe_serialization:  # the same tensors, written with torch.save
        for path in sorted(folder.rglob("*.safetensors")):
            torch.save(load_file(path), path.with_suffix(".bin"))
            path.unlink()
    return {p.relative_to(folder) for p in folder.rglob("*") if p.is_file()}


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
    named = files.base_model_id or default_base(folder)
    base_model = _base_model(base_model, named, dtype, device_map)
    check_base(base_model, read_base_record(folder), str(folder))
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
    if canonical_base_name(base_model) == CANONICAL_NAME:  # "smollm2" or its hub name
        from loramix.smollm2 import load_base_model

        if device_map is not None:
            raise ValueError("device_map: the embedded SmolLM2 loads on the CPU; leave it out")
        return load_base_model(DEFAULT_MODEL, dtype=dtype or torch.float32)[0]
    from transformers import AutoModelForCausalLM

    options = {k: v for k, v in (("dtype", dtype), ("device_map", device_map)) if v is not None}
    return AutoModelForCausalLM.from_pretrained(os.fspath(base_model), **options)


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


def save_scalings_log(model: XLoraModel, path: str | os.PathLike[str]) -> None:
    """Writes the scalings log as `.npz`: `scalings_{i}` arrays `(B, T, L, E)`, plus the axes.

    The file also holds `expert_names` and `adapted_modules` so it can be read alone.
    """
    arrays = {f"scalings_{i}": s.float().numpy() for i, s in enumerate(model.get_scalings_log())}
    arrays["expert_names"] = np.array(model.expert_names)
    arrays["adapted_modules"] = np.array(model.adapted_modules)
    with atomic_file(path, suffix=".npz") as tmp:  # np.savez adds .npz to other names
        np.savez(tmp, **arrays)


class SavingMixin:
    """`XLoraModel`'s `save_pretrained`, `from_pretrained` and `expert_state`: the arguments
    as transformers and peft take them, checked, then the functions above. Placed before
    `PreTrainedModel` among the bases, so that these methods replace transformers' own."""

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        format: str = "loramix",
        base_model_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Writes a self-contained folder; see `loramix.saving` for the layout.

        Args:
            save_directory: The folder. In loramix's format an existing folder keeps its
                other files (only loramix's own are replaced); other formats replace it.
            format: "loramix", "peft" (`PeftModel.from_pretrained` loads it), "xlora" (the
                original package's layout) or "mistralrs"; see `loramix.formats`.
            base_model_id: The base model's Hub id or path, recorded by the "xlora",
                "mistralrs" and "peft" formats; defaults to the base model's `name_or_path`.
            **kwargs: transformers' `safe_serialization`, `is_main_process` and `push_to_hub`
                (with `repo_id`, `commit_message`, `private`, `token`, `create_pr`); any
                other keyword is refused by name (see `loramix.saving.save_pretrained`).
        """
        save_pretrained(self, save_directory, format, base_model_id, **kwargs)

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        base_model: PreTrainedModel | str | os.PathLike | None,
        save_directory: str | os.PathLike,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        local_files_only: bool | None = None,
        force_download: bool | None = None,
        dtype: Any = None,
        torch_dtype: Any = None,
        device_map: Any = None,
        **unknown: Any,
    ) -> XLoraModel:
        """Loads an X-LoRA folder or Hub repo of any format in `loramix.formats` onto a base.

        Everything is read and checked before the base model is changed (see
        `loramix.saving`).

        Args:
            base_model: A transformers causal LM; or its Hub id or folder, loaded with
                `AutoModelForCausalLM.from_pretrained(..., dtype=, device_map=)` ("smollm2":
                the embedded SmolLM2-135M-Instruct); or None for the base model the files
                name (`base_model_id` of the original package and mistral.rs,
                `base_model_name_or_path` of peft).
            save_directory: A folder, or a Hugging Face Hub id of one (fetched into, or with
                `HF_HUB_OFFLINE=1` read from, the Hugging Face cache).
            revision, cache_dir, token, local_files_only, force_download: For the Hub id of
                `save_directory`, as transformers and peft take them.
            dtype, torch_dtype, device_map: For loading `base_model` from an id or folder
                (`torch_dtype` is transformers' older name of `dtype`). The experts follow
                the base model's dtype; the gate stays float32 (see `loramix.gate`).
        """
        if unknown:
            raise TypeError(
                f"XLoraModel.from_pretrained got unknown keyword arguments {sorted(unknown)}; "
                "it takes revision, cache_dir, token, local_files_only, force_download (for a "
                "Hub id) and dtype / torch_dtype, device_map (for a base model given by id)"
            )
        if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
            raise ValueError(
                f"dtype={dtype!r} and torch_dtype={torch_dtype!r}: give one (torch_dtype is the "
                "older name of dtype)"
            )
        hub_options = {
            "revision": revision,
            "cache_dir": cache_dir,
            "token": token,
            "local_files_only": local_files_only,
            "force_download": force_download,
        }
        return load_folder(
            cls,
            base_model,
            save_directory,
            hub_options=hub_options,
            dtype=dtype if dtype is not None else torch_dtype,
            device_map=device_map,
        )

    def expert_state(self, expert_index: int) -> dict[str, torch.Tensor]:
        """One expert's weights with PEFT's key names, read back from the stacked modules."""
        return expert_state(self, expert_index)
