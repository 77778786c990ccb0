"""loramix's own folder.

    xlora_config.json                         the config, adapters -> "experts/<name>"
    gate.safetensors                          gate weights (`layers.{i}.weight/bias`)
    experts/<name>/adapter_config.json        each expert as a standard PEFT adapter
    experts/<name>/adapter_model.safetensors
    base_model.json                           the base model (`loramix.records`), when known

It needs nothing outside itself; expert paths in the config are relative to the folder.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from loramix.config import CONFIG_NAME, XLoraConfig
from loramix.experts import ADAPTER_CONFIG_NAME, BIN_WEIGHTS_NAME, SAFETENSORS_WEIGHTS_NAME
from loramix.records import BASE_RECORD_NAME

if TYPE_CHECKING:
    from loramix.formats import Contents

GATE_WEIGHTS_NAME = "gate.safetensors"
GATE_BIN_NAME = "gate.bin"  # save_pretrained(safe_serialization=False): torch.save
EXPERTS_DIR = "experts"
EXPERT_FILES = (ADAPTER_CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, BIN_WEIGHTS_NAME)


def is_native_folder(folder: Path) -> bool:
    gate = (folder / GATE_WEIGHTS_NAME).is_file() or (folder / GATE_BIN_NAME).is_file()
    return gate and (folder / CONFIG_NAME).is_file()


def own_files(folder: Path) -> list[Path]:
    """The files of an earlier save in `folder` (relative paths); other files are never listed."""
    own = [Path(name) for name in (CONFIG_NAME, GATE_WEIGHTS_NAME, GATE_BIN_NAME, BASE_RECORD_NAME)]
    experts = folder / EXPERTS_DIR
    if experts.is_dir():
        for expert in sorted(p for p in experts.iterdir() if p.is_dir()):
            own += [Path(EXPERTS_DIR) / expert.name / name for name in EXPERT_FILES]
    return [path for path in own if (folder / path).is_file()]


def read_config(folder: Path) -> XLoraConfig:
    """The config with relative expert paths resolved against `folder`."""
    config = XLoraConfig.from_file(folder / CONFIG_NAME)
    adapters = {}
    for name, path in config.adapters.items():
        path = Path(path).expanduser()
        adapters[name] = str(path if path.is_absolute() else folder / path)
    return dataclasses.replace(config, adapters=adapters)


def read_gate(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / GATE_WEIGHTS_NAME
    try:
        if not path.is_file() and (folder / GATE_BIN_NAME).is_file():
            path = folder / GATE_BIN_NAME
            return torch.load(path, map_location="cpu", weights_only=True)
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, RuntimeError, pickle.UnpicklingError) as error:
        raise ValueError(
            f"{path}: cannot read the gate's weights ({error}); the file is corrupt or truncated"
        ) from None


def write(contents: Contents, folder: Path) -> None:
    """Writes the layout above into the empty staging `folder`."""
    from loramix.formats.xlora import write_expert

    adapters = {}
    for index, name in enumerate(contents.expert_names):
        sub = Path(EXPERTS_DIR) / folder_name(name, index)
        adapters[name] = sub.as_posix()
        write_expert(contents, index, folder / sub)
    config = dataclasses.replace(contents.config, adapters=adapters)
    (folder / CONFIG_NAME).write_text(config.to_json_string())
    save_file(contents.gate_state, folder / GATE_WEIGHTS_NAME, metadata={"format": "pt"})
    if contents.base_record is not None:
        record = json.dumps(contents.base_record, indent=2, sort_keys=True) + "\n"
        (folder / BASE_RECORD_NAME).write_text(record)


def folder_name(name: str, index: int) -> str:
    """The expert's name if it is a plain folder name, else `<index>_<cleaned name>`."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._")
    return safe if safe and safe == name else f"{index}_{safe or 'expert'}"
