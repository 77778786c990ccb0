"""Reading LoRA experts from PEFT adapter folders.

A PEFT adapter folder holds `adapter_config.json` and `adapter_model.safetensors` (or the
older `adapter_model.bin`). Its weight keys look like
`base_model.model.<module path>.lora_A.weight` (shape `(r, in)`) and `...lora_B.weight`
(shape `(out, r)`); embeddings use `...lora_embedding_A` `(r, num_embeddings)` and
`...lora_embedding_B` `(embedding_dim, r)`. The module path is relative to the causal LM.

Everything is read and checked here, before any model is touched.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

ADAPTER_CONFIG_NAME = "adapter_config.json"
SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
BIN_WEIGHTS_NAME = "adapter_model.bin"

logger = logging.getLogger(__name__)

# peft LoRA variants whose update is not `scale * B @ A`, or that train more than A and B.
_UNMIXABLE_LORA_OPTIONS = (
    "alora_invocation_tokens",
    "use_bdlora",
    "kasa_config",
    "monteclora_config",
    "arrow_config",
    "trainable_token_indices",
)

_KEY_PATTERN = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\."
    r"(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.[^.]+)?(?:\.weight)?$"
)


@dataclass(frozen=True)
class ModuleLora:
    """One expert's low-rank update of one module: `delta(x) = scale * B @ A @ x`.

    Attributes:
        lora_a: `(r, in_features)`; for an embedding `(r, num_embeddings)`.
        lora_b: `(out_features, r)`; for an embedding `(embedding_dim, r)`.
        scale: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
        is_embedding: Whether the weights came from `lora_embedding_A/B`.
    """

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scale: float
    is_embedding: bool

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]


@dataclass(frozen=True)
class LoraExpert:
    """A frozen LoRA expert: its name, folder, PEFT config and per-module weights."""

    name: str
    path: Path
    peft_config: dict
    modules: dict[str, ModuleLora]  # module path in the causal LM -> its low-rank update

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.peft_config.get("fan_in_fan_out", False))


def load_expert(
    name: str,
    folder: str | Path,
    *,
    config_file: str = ADAPTER_CONFIG_NAME,
    weights_file: str | None = None,
) -> LoraExpert:
    """Reads one PEFT LoRA adapter folder.

    Args:
        name: The expert's name (used in errors).
        folder: The adapter folder.
        config_file: The config's file name in `folder` (mistral.rs's flat layout prefixes it
            with the adapter's name).
        weights_file: The weights' file name in `folder`; None looks for
            `adapter_model.safetensors`, then `adapter_model.bin`.

    Raises:
        FileNotFoundError: the folder, its config or its weights file is missing.
        ValueError: the config or weights are unreadable or describe something loramix cannot
            mix (DoRA, trained biases, `modules_to_save`, a non-LoRA adapter). The message
            names the file and the fix.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"expert {name!r}: adapter folder {folder} does not exist")
    peft_config = _read_adapter_config(name, folder / config_file)
    weights_path, state = _read_weights(name, folder, weights_file)

    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if ".base_layer." in key:
            # peft saves the base embedding beside an embedding adapter
            # (`save_embedding_layers`); it is the base model's own weight, not the expert's.
            logger.debug("expert %r: skipping base-layer weight %s", name, key)
            continue
        match = None if key.endswith(".bias") else _KEY_PATTERN.match(key)
        if match is None:
            raise ValueError(
                f"expert {name!r}: {weights_path} has key {key!r}, which is not a LoRA weight. "
                "Only lora_A/lora_B (and lora_embedding_A/B) weights can be mixed; re-save the "
                "adapter without extra modules (modules_to_save) or biases."
            )
        if match["part"] == "lora_magnitude_vector":
            raise ValueError(
                f"expert {name!r}: {weights_path} is a DoRA adapter (key {key!r}); X-LoRA "
                "mixes plain LoRA experts only. Retrain it with use_dora=False."
            )
        parts.setdefault(match["module"], {})[match["part"]] = tensor
    if not parts:
        raise ValueError(f"expert {name!r}: {weights_path} holds no LoRA weights")

    modules = {}
    for module_name, module_parts in parts.items():
        is_embedding = "lora_embedding_A" in module_parts or "lora_embedding_B" in module_parts
        a_key, b_key = (
            ("lora_embedding_A", "lora_embedding_B") if is_embedding else ("lora_A", "lora_B")
        )
        if a_key not in module_parts or b_key not in module_parts:
            raise ValueError(
                f"expert {name!r}: {weights_path} has {sorted(module_parts)} for module "
                f"{module_name!r} but needs both {a_key} and {b_key}; the file is incomplete."
            )
        lora_a, lora_b = module_parts[a_key], module_parts[b_key]
        if lora_a.ndim != 2 or lora_b.ndim != 2 or lora_a.shape[0] != lora_b.shape[1]:
            raise ValueError(
                f"expert {name!r}: module {module_name!r} has {a_key} {tuple(lora_a.shape)} "
                f"and {b_key} {tuple(lora_b.shape)}; expected (r, in) and (out, r) with one r."
            )
        scale = module_scale(peft_config, module_name, lora_a.shape[0])
        modules[module_name] = ModuleLora(lora_a, lora_b, scale, is_embedding)
    return LoraExpert(name=name, path=folder, peft_config=peft_config, modules=modules)


def module_scale(peft_config: dict, module_name: str, rank: int) -> float:
    """PEFT's LoRA scale of one module: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA."""
    alpha = _pattern_value(peft_config.get("alpha_pattern"), module_name)
    alpha = peft_config.get("lora_alpha", 8) if alpha is None else alpha
    use_rslora = bool(peft_config.get("use_rslora", False))
    return float(alpha / math.sqrt(rank) if use_rslora else alpha / rank)


def _read_adapter_config(name: str, path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(
            f"expert {name!r}: {path} is missing; an expert must be a PEFT adapter folder "
            "saved with `save_pretrained`"
        )
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"expert {name!r}: {path} is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"expert {name!r}: {path} must hold a JSON object")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    problems = []
    if peft_type != "LORA":
        problems.append(f"peft_type is {peft_type!r}; only LoRA adapters can be experts")
    if config.get("use_dora"):
        problems.append("use_dora is true; X-LoRA mixes plain LoRA experts, retrain without DoRA")
    if config.get("bias", "none") != "none":
        problems.append(f"bias is {config['bias']!r}; retrain with bias='none'")
    if config.get("lora_bias"):
        problems.append("lora_bias is true; retrain with lora_bias=False")
    if config.get("modules_to_save"):
        problems.append(
            f"modules_to_save is {config['modules_to_save']!r}; fully trained modules cannot be "
            "mixed per token, retrain without modules_to_save"
        )
    if config.get("target_parameters"):
        problems.append(
            f"target_parameters is {config['target_parameters']!r}: LoRA on a "
            "mixture-of-experts block's routed expert weights (3-D parameters) or its router "
            "cannot be mixed per token (each token reaches only its routed experts). Retrain "
            "without target_parameters, with target_modules listed explicitly (e.g. the "
            "attention and shared-expert projections): peft adds target_parameters by itself "
            "for target_modules='all-linear' on Mixtral-style models"
        )
    for option in _UNMIXABLE_LORA_OPTIONS:
        if config.get(option):
            problems.append(
                f"{option} is set; only plain LoRA (scale * B @ A) can be mixed, retrain without it"
            )
    if config.get("layer_replication"):
        problems.append("layer_replication is set; it is not supported")
    for field in ("r", "lora_alpha"):
        value = config.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            problems.append(f"{field} is {value!r}; it must be a number")
    for field in ("alpha_pattern", "rank_pattern"):
        pattern = config.get(field) or {}
        if not isinstance(pattern, dict) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in pattern.values()
        ):
            problems.append(f"{field} is {pattern!r}; it must map module names to numbers")
    if not isinstance(config.get("use_rslora", False), bool):
        problems.append(f"use_rslora is {config['use_rslora']!r}; it must be true or false")
    if problems:
        raise ValueError(f"expert {name!r}: {path}: " + "; ".join(problems))
    return config


def _read_weights(
    name: str, folder: Path, weights_file: str | None = None
) -> tuple[Path, dict[str, torch.Tensor]]:
    safetensors_path = folder / (weights_file or SAFETENSORS_WEIGHTS_NAME)
    bin_path = folder / BIN_WEIGHTS_NAME
    try:
        if safetensors_path.is_file():
            return safetensors_path, load_file(safetensors_path, device="cpu")
        if bin_path.is_file():
            state = torch.load(bin_path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict):
                raise ValueError("not a state dict")
            return bin_path, state
    except (
        SafetensorError,
        OSError,
        RuntimeError,
        ValueError,
        EOFError,
        pickle.UnpicklingError,
    ) as error:
        path = safetensors_path if safetensors_path.is_file() else bin_path
        raise ValueError(
            f"expert {name!r}: cannot read weights file {path} ({error}); the file is corrupt "
            "or truncated, save the adapter again"
        ) from None
    if weights_file is not None:
        raise FileNotFoundError(f"expert {name!r}: {safetensors_path} is missing")
    raise FileNotFoundError(
        f"expert {name!r}: {folder} has neither {SAFETENSORS_WEIGHTS_NAME} nor {BIN_WEIGHTS_NAME}"
    )


def _pattern_value(patterns: dict | None, module_name: str) -> float | None:
    """PEFT's `alpha_pattern`: the first key that matches the end of the module path wins."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module_name):
            return value
    return None
