"""X-LoRA configuration: a validated dataclass with a JSON round trip.

Field names follow peft's `XLoraConfig` so that users move over without relearning, and
`XLoraConfig.from_file` reads the configs written by peft (`adapter_config.json` with
`"peft_type": "XLORA"`) and by the original `xlora` package (`xlora_config.json`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loramix.atomic import write_text_atomic
from loramix.checks import is_int, is_number, raise_problems

logger = logging.getLogger(__name__)

# Keys that peft's or the original package's config files carry and loramix does not use.
# They are dropped on read (with a debug message); any other unknown key is an error.
FOREIGN_KEYS = frozenset(
    {
        # peft's PeftConfig
        "peft_type",
        "task_type",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "auto_mapping",
        "peft_version",
        "modules_to_save",
        # the original xlora package
        "base_model_id",
        "device",
        "stop_token_id",
        "use_mean_pool",
    }
)


@dataclass
class XLoraConfig:
    """How to mix a set of LoRA experts with a learned gate.

    Attributes:
        adapters: Expert name -> PEFT adapter folder. The order is the expert axis order.
        hidden_size: Width of the base model's last hidden state; `None` infers it from the
            base model.
        enable_softmax: Softmax over experts on the gate's output.
        enable_softmax_topk: After top-k selection, softmax again over the kept experts.
        layerwise_scalings: One set of scalings per adapted module instead of one shared set.
        xlora_depth: Number of linear layers in the gate (1 = a single linear map).
        xlora_size: Width of the gate's hidden layers (used when `xlora_depth > 1`).
        xlora_dropout_p: Dropout between the gate's hidden layers.
        enable_relu_and_dropout: ReLU (and dropout) after each hidden layer of the gate; off,
            the hidden layers are stacked linear maps. A field of the original `xlora`
            package (peft always uses ReLU).
        use_bias: Biases in the gate's linear layers (the original package's field; peft
            always uses biases).
        use_trainable_adapters: Train the experts' LoRA weights together with the gate.
        softmax_temperature: Temperature of the softmax over experts.
        top_k_lora: Keep only the k largest scalings per token and layer (`None` keeps all).
        scaling_pass_value: Scaling of every expert during the scaling pass (0 = experts off).
        global_scaling_weight: Factor `g` on the mixed LoRA term of every module.
    """

    adapters: dict[str, str] = field(default_factory=dict)
    hidden_size: int | None = None
    enable_softmax: bool = True
    enable_softmax_topk: bool = False
    layerwise_scalings: bool = False
    xlora_depth: int = 1
    xlora_size: int = 2048
    xlora_dropout_p: float = 0.2
    enable_relu_and_dropout: bool = True
    use_bias: bool = True
    use_trainable_adapters: bool = False
    softmax_temperature: float = 1.0
    top_k_lora: int | None = None
    scaling_pass_value: float = 0.0
    global_scaling_weight: float = 1.0

    def __post_init__(self) -> None:
        self.validate()

    @property
    def expert_names(self) -> list[str]:
        return list(self.adapters)

    def validate(self) -> None:
        """Raises one `ValueError` listing every invalid field, its value and the fix."""
        problems: list[str] = []

        def check(ok: bool, name: str, fix: str) -> None:
            if not ok:
                problems.append(f"{name}={getattr(self, name)!r}: {fix}")

        check(
            isinstance(self.adapters, dict)
            and all(isinstance(k, str) and k for k in self.adapters)
            and all(isinstance(v, str | os.PathLike) for v in self.adapters.values()),
            "adapters",
            "give a dict of expert name -> PEFT adapter folder, e.g. {'math': './math_lora'}",
        )
        check(
            not isinstance(self.adapters, dict) or len(self.adapters) > 0,
            "adapters",
            "give at least one expert",
        )
        check(
            self.hidden_size is None or is_int(self.hidden_size) and self.hidden_size > 0,
            "hidden_size",
            "use a positive int, or None to infer it from the base model",
        )
        for name in (
            "enable_softmax",
            "enable_softmax_topk",
            "layerwise_scalings",
            "enable_relu_and_dropout",
            "use_bias",
        ):
            check(isinstance(getattr(self, name), bool), name, "use True or False")
        check(isinstance(self.use_trainable_adapters, bool), "use_trainable_adapters", "use a bool")
        check(is_int(self.xlora_depth) and self.xlora_depth >= 1, "xlora_depth", "use an int >= 1")
        check(is_int(self.xlora_size) and self.xlora_size >= 1, "xlora_size", "use an int >= 1")
        check(
            is_number(self.xlora_dropout_p) and 0.0 <= self.xlora_dropout_p < 1.0,
            "xlora_dropout_p",
            "use a probability in [0, 1)",
        )
        check(
            is_number(self.softmax_temperature) and self.softmax_temperature > 0,
            "softmax_temperature",
            "use a number > 0",
        )
        n_experts = len(self.adapters) if isinstance(self.adapters, dict) else 0
        check(
            self.top_k_lora is None
            or is_int(self.top_k_lora)
            and 1 <= self.top_k_lora <= max(n_experts, 1),
            "top_k_lora",
            f"use None or an int between 1 and the number of experts ({n_experts})",
        )
        check(is_number(self.scaling_pass_value), "scaling_pass_value", "use a number")
        check(is_number(self.global_scaling_weight), "global_scaling_weight", "use a number")
        raise_problems("Invalid XLoraConfig", problems)

    # ----------------------------------------------------------------- serialisation

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["adapters"] = {name: str(path) for name, path in self.adapters.items()}
        return data

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    def save(self, path: str | os.PathLike) -> None:
        """Writes the config as JSON, atomically."""
        write_text_atomic(Path(path), self.to_json_string())

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> XLoraConfig:
        """Builds a config from a dict, dropping peft's and xlora's extra keys.

        Raises:
            ValueError: on an unknown key (naming it and `source`) or an invalid value.
        """
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
        data = dict(data)
        peft_type = data.get("peft_type")
        peft_type = getattr(peft_type, "value", peft_type)  # peft's to_dict() gives a PeftType
        if peft_type is not None and str(peft_type).upper() != "XLORA":
            raise ValueError(
                f"{source}: peft_type is {peft_type!r}, not 'XLORA'. This looks like a single "
                "adapter's config; list it under `adapters` of an X-LoRA config instead."
            )
        known = {f.name for f in dataclasses.fields(cls)}
        dropped = sorted(k for k in data if k in FOREIGN_KEYS)
        unknown = sorted(k for k in data if k not in known and k not in FOREIGN_KEYS)
        if unknown:
            raise ValueError(
                f"{source}: unknown X-LoRA config keys {unknown}. Known keys: {sorted(known)}."
            )
        if dropped:
            logger.debug("%s: ignoring keys not used by loramix: %s", source, dropped)
        kwargs = {k: v for k, v in data.items() if k in known}
        adapters = kwargs.get("adapters", {})
        if isinstance(adapters, list):  # the original package also accepted a list of folders
            names = [Path(p).name for p in adapters]
            shared = sorted({n for n in names if names.count(n) > 1})
            if shared:
                raise ValueError(
                    f"{source}: adapter folders {shared} share a name; give `adapters` as a "
                    "dict of expert name -> folder"
                )
            adapters = dict(zip(names, adapters, strict=True))
        kwargs["adapters"] = adapters
        try:
            return cls(**kwargs)
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> XLoraConfig:
        """Reads loramix's, peft's (`adapter_config.json`) or xlora's (`xlora_config.json`) file.

        A folder may be given; it is searched for those file names in that order. Relative
        adapter paths are kept as written.
        """
        path = Path(path)
        if path.is_dir():
            for name in (CONFIG_NAME, "adapter_config.json", "xlora_config.json"):
                if (path / name).is_file():
                    path = path / name
                    break
            else:
                raise FileNotFoundError(
                    f"{path}: no {CONFIG_NAME}, adapter_config.json or xlora_config.json found"
                )
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: X-LoRA config file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from None
        return cls.from_dict(data, source=str(path))


CONFIG_NAME = "xlora_config.json"
