"""peft's X-LoRA folder: what `PeftModel.from_pretrained(base, folder)` loads.

    adapter_config.json         peft's `XLoraConfig` (`"peft_type": "XLORA"`); `adapters` maps
                                "0".."n-1" to the experts' folders
    adapter_model.safetensors   the gate: `base_model.internal_xlora_classifier.layers.{i}.*`
    0/, 1/, ...                 one PEFT adapter folder per expert
    expert_names.json           loramix's names of the experts ("0" -> "bio"); peft ignores it

What peft needs, and why the layout is so:
- peft names the experts "0".."n-1" and refuses other names;
- peft loads each expert from the path in `adapters` as given (a relative path is taken from
  the working directory), so loramix writes the sub-folders' absolute paths; loramix itself
  falls back to the sub-folder `<i>` when the folder has moved;
- peft's loader rewrites expert keys assuming module paths that start with `model.` (Llama,
  Mistral, Qwen, ...); other bases are refused with the reason;
- peft's gate always has ReLU and biases: `enable_relu_and_dropout=False` and
  `use_bias=False` are refused;
- the base model needs `config.use_cache = False` before peft loads it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from loramix.config import XLoraConfig
from loramix.experts import ADAPTER_CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from loramix.formats.xlora import write_expert

if TYPE_CHECKING:
    from loramix.formats import Contents

NAMES_FILE = "expert_names.json"
CLASSIFIER_PREFIX = "base_model.internal_xlora_classifier."

# peft's XLoraConfig fields that loramix writes (peft's PeftConfig fields are added below).
_PEFT_FIELDS = (
    "hidden_size",
    "adapters",
    "enable_softmax",
    "enable_softmax_topk",
    "layerwise_scalings",
    "xlora_depth",
    "xlora_size",
    "xlora_dropout_p",
    "use_trainable_adapters",
    "softmax_temperature",
    "top_k_lora",
    "scaling_pass_value",
    "global_scaling_weight",
)


def is_peft_folder(folder: Path) -> bool:
    path = folder / ADAPTER_CONFIG_NAME
    if not path.is_file():
        return False
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return True  # let the reader report the broken file
    return isinstance(data, dict) and str(data.get("peft_type", "")).upper() == "XLORA"


def own_files(folder: Path) -> list[Path]:
    """The files of an earlier save in `folder` (relative paths): the expert folders are
    those named by a number; other files are never listed."""
    own = [Path(name) for name in (ADAPTER_CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, NAMES_FILE)]
    for expert in sorted(p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()):
        own += [
            Path(expert.name) / name for name in (ADAPTER_CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME)
        ]
    return [path for path in own if (folder / path).is_file()]


def read_config(folder: Path) -> tuple[XLoraConfig, str | None]:
    """The config with each expert's folder resolved, and `base_model_name_or_path`.

    An expert's path is taken as written (relative to `folder`); when that folder does not
    exist, the sub-folder `<i>` of `folder` is used if it holds the adapter.
    """
    path = folder / ADAPTER_CONFIG_NAME
    config = XLoraConfig.from_file(path)
    data = json.loads(path.read_text())
    names = _read_names(folder, list(config.adapters))
    adapters = {}
    for index, (key, where) in enumerate(config.adapters.items()):
        candidate = folder / Path(where).expanduser()
        fallback = folder / str(index)
        if not candidate.is_dir() and (fallback / ADAPTER_CONFIG_NAME).is_file():
            candidate = fallback
        if not candidate.is_dir():
            raise FileNotFoundError(
                f"{path}: adapters[{key!r}] is {where!r}, which is not a folder (relative paths "
                f"are taken from {folder}), and {fallback} holds no adapter; fix the path in "
                "the config or put the expert's adapter folder there"
            )
        adapters[names[index]] = str(candidate)
    base_id = data.get("base_model_name_or_path")
    return XLoraConfig.from_dict({**config.to_dict(), "adapters": adapters}), base_id


def read_gate(folder: Path) -> dict[str, torch.Tensor]:
    """The classifier's weights from `adapter_model.safetensors`, as loramix's gate keys."""
    path = folder / SAFETENSORS_WEIGHTS_NAME
    try:
        state = load_file(path, device="cpu")
    except (SafetensorError, OSError) as error:
        raise ValueError(
            f"{path}: cannot read the gate's weights ({error}); the file is missing, corrupt "
            "or truncated"
        ) from None
    prefix = re.compile(r"^.*internal_xlora_classifier\.")
    gate = {prefix.sub("", k): v for k, v in state.items() if prefix.match(k)}
    if not gate:
        raise ValueError(
            f"{path}: no internal_xlora_classifier.* key; this file holds no X-LoRA gate"
        )
    return gate


def check_writable(contents: Contents) -> None:
    """Raises `ValueError` naming what peft's X-LoRA cannot load, and what to do instead."""
    problems = []
    config = contents.config
    for name in ("enable_relu_and_dropout", "use_bias"):
        if not getattr(config, name):
            problems.append(
                f"{name}=False: peft's gate always has ReLU and biases; save with "
                "format='xlora' (the original package reads it) or 'loramix'"
            )
    unfit = [m for m in contents.adapted_modules if not peft_loads_module(m)]
    if unfit:
        problems.append(
            f"adapted modules {unfit[:3]}{' ...' if len(unfit) > 3 else ''} do not start with "
            "'model.': peft's X-LoRA loader rewrites expert keys assuming they do and cannot "
            "load these; save with format='loramix' or 'xlora'"
        )
    if problems:
        raise ValueError("cannot save in peft's X-LoRA format:\n  " + "\n  ".join(problems))


def peft_loads_module(path: str) -> bool:
    """Whether peft's key rewriting (strip to the first `model.`, add one) keeps `path`."""
    return path.startswith("model.") and not path.startswith("model.model.")


def write(contents: Contents, staging: Path, target: Path) -> None:
    """Writes peft's layout into the empty `staging` folder that will become `target`."""
    check_writable(contents)
    adapters = {}
    for index in range(contents.n_experts):
        write_expert(contents, index, staging / str(index))
        adapters[str(index)] = str(target.resolve() / str(index))
    (staging / ADAPTER_CONFIG_NAME).write_text(
        json.dumps(config_dict(contents, adapters), indent=2) + "\n"
    )
    gate = {CLASSIFIER_PREFIX + k: v for k, v in contents.gate_state.items()}
    save_file(gate, staging / SAFETENSORS_WEIGHTS_NAME, metadata={"format": "pt"})
    names = {str(i): name for i, name in enumerate(contents.expert_names)}
    (staging / NAMES_FILE).write_text(json.dumps(names, indent=2) + "\n")


def config_dict(contents: Contents, adapters: dict[str, str]) -> dict[str, Any]:
    config = contents.config.to_dict()
    config.update(hidden_size=contents.hidden_size, adapters=adapters)
    return {
        "peft_type": "XLORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": contents.base_model_id,
        "revision": None,
        "inference_mode": True,
        **{name: config[name] for name in _PEFT_FIELDS},
    }


def _read_names(folder: Path, keys: list[str]) -> list[str]:
    path = folder / NAMES_FILE
    if not path.is_file():
        return keys
    try:
        names = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(names, dict) or sorted(names) != sorted(keys):
        raise ValueError(
            f"{path}: expected an object with the keys {keys} (the adapters' keys in "
            f"{ADAPTER_CONFIG_NAME}); delete the file to use those keys as names"
        )
    values = [names[key] for key in keys]
    if not all(isinstance(v, str) and v for v in values) or len(set(values)) != len(values):
        raise ValueError(f"{path}: the names {values} must be distinct non-empty strings")
    return values
