"""X-LoRA folders in the layouts other tools read and write.

    format      written by / for                          read   written
    loramix     loramix (`xlora_config.json`, `gate.safetensors`, `experts/`)   yes    yes
    peft        peft's `XLoraModel` (`PeftModel.from_pretrained` loads it)       yes    yes
    xlora       the original `xlora` package (the paper's published models)      yes    yes
    mistralrs   mistral.rs's X-LoRA (flat adapter files, `ordering.json`)       yes    yes

`read_folder` finds the format from the files and returns everything a model needs, read
and checked, before any model is touched; `write_folder` writes a model in any format,
atomically (a staging folder beside the target, then one rename). The per-format details
are in the modules of this package.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from loramix.config import CONFIG_NAME, XLoraConfig
from loramix.experts import LoraExpert, load_expert
from loramix.formats import mistralrs, peft, xlora

if TYPE_CHECKING:
    from loramix.model import XLoraModel

logger = logging.getLogger(__name__)

FORMATS = ("loramix", "peft", "xlora", "mistralrs")
GATE_WEIGHTS_NAME = "gate.safetensors"


@dataclass(frozen=True)
class XLoraFiles:
    """An X-LoRA folder's contents, read and checked.

    Attributes:
        format: One of `FORMATS`.
        config: The config; `adapters` maps each expert's name to its folder.
        experts: The experts, in config order.
        gate_state: The gate's weights under loramix's keys (`layers.{i}.*`).
        base_model_id: The base model the folder names (None when it names none).
    """

    format: str
    config: XLoraConfig
    experts: list[LoraExpert]
    gate_state: dict[str, torch.Tensor]
    base_model_id: str | None


def detect_format(folder: Path) -> str:
    """The folder's format, from the files it holds.

    Raises:
        FileNotFoundError: when the folder is missing or matches no format, naming the files
            each format needs.
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    if (folder / GATE_WEIGHTS_NAME).is_file() and (folder / CONFIG_NAME).is_file():
        return "loramix"
    if peft.is_peft_folder(folder):
        return "peft"
    if mistralrs.is_mistralrs_folder(folder) and xlora.is_xlora_folder(folder):
        return "mistralrs"
    if xlora.is_xlora_folder(folder):
        return "xlora"
    raise FileNotFoundError(
        f"{folder} holds no X-LoRA model: expected {CONFIG_NAME} with {GATE_WEIGHTS_NAME} "
        "(loramix), adapter_config.json with peft_type XLORA (peft), or "
        f"{CONFIG_NAME} with {xlora.CLASSIFIER_NAME} or {xlora.CLASSIFIER_PT_NAME} "
        f"(the original xlora package; mistral.rs adds {mistralrs.ORDERING_NAME})"
    )


def read_folder(folder: str | os.PathLike[str]) -> XLoraFiles:
    """Reads an X-LoRA folder of any format in `FORMATS`; changes nothing."""
    folder = Path(folder)
    fmt = detect_format(folder)
    base_model_id: str | None = None
    if fmt == "loramix":
        config = _resolve_relative(XLoraConfig.from_file(folder / CONFIG_NAME), folder)
        gate_state = _read_safetensors(folder / GATE_WEIGHTS_NAME, "gate weights")
        experts = _load_experts(config)
    elif fmt == "peft":
        config, base_model_id = peft.read_config(folder)
        gate_state = peft.read_gate(folder)
        experts = _load_experts(config)
    else:
        config, names = xlora.read_config(folder)
        base_model_id = _base_model_id(folder)
        if fmt == "mistralrs":
            experts, order, ordering_base = mistralrs.read_experts(folder)
            if sorted(order) != sorted(names):
                raise ValueError(
                    f"{folder / mistralrs.ORDERING_NAME}: order {order} and the adapters "
                    f"{names} of {CONFIG_NAME} name different experts"
                )
            config = mistralrs.config_for_reading(config, order, folder)
            base_model_id = base_model_id or ordering_base
        else:
            experts = _load_experts(config)
        gate_state = xlora.read_gate(folder, config)
    return XLoraFiles(fmt, config, experts, gate_state, base_model_id)


def write_folder(
    model: XLoraModel,
    save_directory: str | os.PathLike[str],
    format: str,
    base_model_id: str | None = None,
) -> None:
    """Writes `model` in `format` (not "loramix": `XLoraModel.save_pretrained` writes that).

    Args:
        model: The model to write.
        save_directory: The folder; it is replaced atomically if it exists.
        format: "peft", "xlora" or "mistralrs".
        base_model_id: The base model's Hub id or path, written into the files; defaults to
            the base model's `name_or_path`. Required by "xlora" and "mistralrs".

    Raises:
        ValueError: an unknown format, a missing `base_model_id`, or a model the format
            cannot hold (the message says why and which format can); nothing is written.
    """
    if format not in FORMATS or format == "loramix":
        raise ValueError(f"format={format!r}: use one of {FORMATS}")
    base_model_id = base_model_id or getattr(model.lm, "name_or_path", "") or None
    if format in ("xlora", "mistralrs") and not base_model_id:
        raise ValueError(
            f"format={format!r} records the base model's id, and this base model has no "
            "name_or_path; pass base_model_id='<hub id or folder of the base model>'"
        )
    if format == "peft":
        peft.check_writable(model)
    elif format == "mistralrs":
        mistralrs.check_writable(model)
    target = Path(save_directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp"))
    try:
        if format == "peft":
            peft.write(model, staging, target, base_model_id)
        elif format == "xlora":
            xlora.write(model, staging, base_model_id)
        else:
            mistralrs.write(model, staging, base_model_id)
        _replace_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _resolve_relative(config: XLoraConfig, folder: Path) -> XLoraConfig:
    adapters = {}
    for name, path in config.adapters.items():
        path = Path(path).expanduser()
        adapters[name] = str(path if path.is_absolute() else folder / path)
    return dataclasses.replace(config, adapters=adapters)


def _load_experts(config: XLoraConfig) -> list[LoraExpert]:
    return [load_expert(name, path) for name, path in config.adapters.items()]


def _base_model_id(folder: Path) -> str | None:
    data = json.loads((folder / CONFIG_NAME).read_text())
    value = data.get("base_model_id")
    return str(value) if value else None


def _read_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError) as error:
        raise ValueError(
            f"{path}: cannot read {what} ({error}); the file is corrupt or truncated"
        ) from None


def _replace_folder(staging: Path, target: Path) -> None:
    """Moves `staging` to `target`; an existing `target` is removed only after the move."""
    if not target.exists():
        os.replace(staging, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
    os.replace(target, old / target.name)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)
