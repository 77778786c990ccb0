"""The original `xlora` package's layout, as the paper's published models ship it.

xlora_config.json             the config; `adapters` a list of the experts' names (or a
                              dict name -> training-time path), plus `base_model_id`,
                              `enable_relu_and_dropout` and `use_bias`
xlora_classifier.safetensors  the gate: `inner.{i}.*` and `last.*` (see `classifier`),
                              or `xlora_classifier.pt`, a pickled state dict
<name>/adapter_config.json    one PEFT adapter folder per expert, named after it
<name>/adapter_model.safetensors
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from loramix.config import CONFIG_NAME, XLoraConfig
from loramix.experts import ADAPTER_CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from loramix.formats.classifier import from_xlora_keys, to_xlora_keys

if TYPE_CHECKING:
    from loramix.formats import Contents

logger = logging.getLogger(__name__)

CLASSIFIER_NAME = "xlora_classifier.safetensors"
CLASSIFIER_PT_NAME = "xlora_classifier.pt"

# The fields of the original package's `xLoRAConfig`, in its order; it accepts no others.
ORIGINAL_FIELDS = (
    "hidden_size",
    "base_model_id",
    "adapters",
    "enable_softmax",
    "enable_softmax_topk",
    "layerwise_scalings",
    "xlora_depth",
    "xlora_size",
    "enable_relu_and_dropout",
    "use_bias",
    "xlora_dropout_p",
    "use_trainable_adapters",
    "softmax_temperature",
    "top_k_lora",
    "scaling_pass_value",
    "global_scaling_weight",
)


def is_xlora_folder(folder: Path) -> bool:
    return (folder / CONFIG_NAME).is_file() and (
        (folder / CLASSIFIER_NAME).is_file() or (folder / CLASSIFIER_PT_NAME).is_file()
    )


def own_files(folder: Path) -> list[Path]:
    """The files of an earlier save in `folder` (relative paths): the expert folders are those
    its `xlora_config.json` names; other files are never listed."""
    own = [Path(name) for name in (CONFIG_NAME, CLASSIFIER_NAME, CLASSIFIER_PT_NAME)]
    for name in recorded_names(folder / CONFIG_NAME, "adapters"):
        own += [Path(name) / file for file in (ADAPTER_CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME)]
    return [path for path in own if (folder / path).is_file()]


def recorded_names(path: Path, key: str) -> list[str]:
    """The plain file names listed under `key` of a JSON file (a list, or a dict's keys);
    none when the file is missing or unreadable (then nothing is taken for an earlier save's)."""
    try:
        value = json.loads(path.read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return []
    names = list(value) if isinstance(value, (list, dict)) else []
    return [n for n in names if isinstance(n, str) and n and Path(n).name == n and n != ".."]


def read_config(folder: Path) -> tuple[XLoraConfig, list[str]]:
    """The config, with each expert's folder resolved, and the experts' names in order.

    An expert's folder is the sub-folder named after it (where the original package saves
    it); a dict entry whose sub-folder is missing falls back to its path, relative to
    `folder`.
    """
    path = folder / CONFIG_NAME
    data = _read_json(path)
    adapters = data.get("adapters")
    if isinstance(adapters, list):
        names = [str(name) for name in adapters]
        if len(set(names)) != len(names):
            raise ValueError(f"{path}: adapters {names} name an expert twice")
        paths = {name: folder / name for name in names}
    elif isinstance(adapters, dict):
        paths = {}
        for name, where in adapters.items():
            sub, given = folder / name, folder / Path(str(where)).expanduser()
            if not sub.is_dir() and not given.is_dir():
                raise FileNotFoundError(
                    f"{path}: adapters[{name!r}]: neither the sub-folder {sub} (where the "
                    f"original package saves the expert) nor {given} exists; put the expert's "
                    "PEFT adapter folder there"
                )
            paths[name] = sub if sub.is_dir() else given
    else:
        raise ValueError(
            f"{path}: adapters is {adapters!r}; expected the experts' names (a list) or a dict "
            "of name -> adapter folder"
        )
    data["adapters"] = {name: str(where) for name, where in paths.items()}
    config = XLoraConfig.from_dict(data, source=str(path))
    if config.enable_softmax_topk:
        logger.warning(
            "%s: enable_softmax_topk is on; the original package softmaxes over the kept "
            "scalings of the whole batch at once, loramix (like peft) per token and module, so "
            "outputs differ from the original package's",
            path,
        )
    return config, list(paths)


def read_gate(folder: Path, config: XLoraConfig) -> dict[str, torch.Tensor]:
    """The classifier's weights, renamed to loramix's gate keys."""
    path = folder / CLASSIFIER_NAME
    try:
        if path.is_file():
            state = load_file(path, device="cpu")
        else:
            path = folder / CLASSIFIER_PT_NAME
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise ValueError(
            f"{path}: cannot read the classifier's weights ({error}); the file is corrupt, "
            "truncated, or holds more than tensors"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a dict of tensors (a state dict)")
    return from_xlora_keys(state, config, path)


def config_dict(contents: Contents, names: list[str]) -> dict[str, Any]:
    """`xlora_config.json` as the original package writes it, every field written out."""
    data = dataclasses.asdict(contents.config)
    data.update(
        hidden_size=contents.hidden_size, base_model_id=contents.base_model_id, adapters=names
    )
    return {name: data[name] for name in ORIGINAL_FIELDS}


def write(contents: Contents, folder: Path) -> None:
    """Writes the original layout into the empty staging `folder`."""
    names = [safe_name(name) for name in contents.expert_names]
    for index, name in enumerate(names):
        write_expert(contents, index, folder / name)
    (folder / CONFIG_NAME).write_text(json.dumps(config_dict(contents, names), indent=2) + "\n")
    gate = to_xlora_keys(contents.gate_state, contents.config, "xlora")
    save_file(gate, folder / CLASSIFIER_NAME, metadata={"format": "pt"})


def write_expert(
    contents: Contents,
    index: int,
    folder: Path,
    config_name: str = ADAPTER_CONFIG_NAME,
    weights_name: str = SAFETENSORS_WEIGHTS_NAME,
    peft_config: dict | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> None:
    """One expert as a PEFT adapter: its config and its weights (peft's key names)."""
    folder.mkdir(parents=True, exist_ok=True)
    peft_config = contents.expert_configs[index] if peft_config is None else peft_config
    (folder / config_name).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
    state = contents.expert_states[index] if state is None else state
    save_file(state, folder / weights_name, metadata={"format": "pt"})


def safe_name(name: str) -> str:
    """The expert's name as a file name: refused when it would not name a plain file."""
    if not name or name in {".", ".."} or any(c in name for c in '/\\:*?"<>|\0'):
        raise ValueError(
            f"expert name {name!r} cannot name a file or folder; rename the expert (the names "
            "are the keys of XLoraConfig.adapters)"
        )
    return name


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
