"""X-LoRA folders in the layouts other tools read and write.

    format      for                                                           module
    loramix     loramix (`xlora_config.json`, `gate.safetensors`, experts/)   native.py
    peft        peft's `XLoraModel` (`PeftModel.from_pretrained` loads it)    peft.py
    xlora       the original `xlora` package (the paper's published models)   xlora.py
    mistralrs   mistral.rs's X-LoRA (flat adapter files, `ordering.json`)     mistralrs.py

Every format is read and written. The gate's weights are renamed between formats by
`classifier.py`; `hub.py` turns a Hugging Face Hub id into a local folder.

`read_folder` finds the format from the files and returns everything a model needs, read
and checked, before any model is touched; `write_folder` writes a model in any format,
atomically: a new folder appears whole, and into an existing one only the format's own files
are moved (the user's other files stay; `existing.py`). The per-format details are in the
modules of this package.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from loramix.config import CONFIG_NAME, XLoraConfig
from loramix.experts import LoraExpert, load_expert
from loramix.formats import existing as existing_folder
from loramix.formats import mistralrs, native, peft, xlora
from loramix.formats.classifier import loramix_positions
from loramix.records import base_record, canonical_base_name, named_base_record, read_base_record

if TYPE_CHECKING:
    from loramix.model import XLoraModel

FORMATS = ("loramix", "peft", "xlora", "mistralrs")
# Formats written from the files alone; mistral.rs's needs the base model's module order.
FILES_ONLY_FORMATS = ("loramix", "peft", "xlora")


@dataclass(frozen=True)
class XLoraFiles:
    """An X-LoRA folder's contents, read and checked.

    Attributes:
        format: One of `FORMATS`.
        config: The config; `adapters` maps each expert's name to its folder.
        experts: The experts, in config order.
        gate_state: The gate's weights under loramix's keys (`layers.{i}.*`).
        base_model_id: The base model the folder names (None when it names none).
        base_record: loramix's `base_model.json` (see `loramix.records`), or None.
    """

    format: str
    config: XLoraConfig
    experts: list[LoraExpert]
    gate_state: dict[str, torch.Tensor]
    base_model_id: str | None
    base_record: dict[str, Any] | None = None


@dataclass(frozen=True)
class Contents:
    """What a writer writes: from a loaded model, or straight from another folder's files.

    Attributes:
        config: The config to record (runtime settings folded in; `adapters` is rewritten).
        expert_names: The E axis.
        expert_configs: Each expert's PEFT `adapter_config.json` contents.
        expert_states: Each expert's weights under PEFT's key names.
        gate_state: The gate's weights under loramix's keys, on the CPU.
        adapted_modules: Adapted module paths, in the base model's `named_modules()` order
            when a model is at hand (`model` set), else sorted.
        base_model_id: The base model's Hub id or path, or None.
        base_record: What loramix's format writes as `base_model.json`, or None.
        model: The loaded model, when there is one (mistral.rs's writer needs it).
    """

    config: XLoraConfig
    expert_names: list[str]
    expert_configs: list[dict]
    expert_states: list[dict[str, torch.Tensor]]
    gate_state: dict[str, torch.Tensor]
    adapted_modules: list[str]
    base_model_id: str | None
    base_record: dict[str, Any] | None = None
    model: XLoraModel | None = None

    @property
    def n_experts(self) -> int:
        return len(self.expert_names)

    @property
    def hidden_size(self) -> int:
        """D, the gate's input width."""
        first = loramix_positions(self.config)[0]
        return self.gate_state[f"layers.{first}.weight"].shape[1]


def contents_of_model(model: XLoraModel, base_model_id: str | None = None) -> Contents:
    return Contents(
        config=model.current_config(),
        expert_names=list(model.expert_names),
        expert_configs=[dict(c) for c in model.expert_configs],
        expert_states=[model.expert_state(i) for i in range(model.n_experts)],
        gate_state={k: v.detach().contiguous().cpu() for k, v in model.gate.state_dict().items()},
        adapted_modules=list(model.adapted_modules),
        base_model_id=base_model_id or getattr(model.lm, "name_or_path", "") or None,
        base_record=base_record(model.lm, base_model_id),
        model=model,
    )


def contents_of_files(files: XLoraFiles, base_model_id: str | None = None) -> Contents:
    """What the files hold, for writing without a model; the gate's keys are checked.

    Raises:
        ValueError: when the gate's weights do not fit the config (naming the keys).
    """
    expected = {
        f"layers.{position}.{part}"
        for position in loramix_positions(files.config)
        for part in (("weight", "bias") if files.config.use_bias else ("weight",))
    }
    missing, unexpected = (
        sorted(expected - set(files.gate_state)),
        sorted(set(files.gate_state) - expected),
    )
    if missing or unexpected:
        raise ValueError(
            f"the {files.format} folder's gate weights do not fit its config (missing keys "
            f"{missing}, unexpected keys {unexpected}); check xlora_depth, use_bias and "
            "enable_relu_and_dropout"
        )
    states = []
    for expert in files.experts:
        state = {}
        for name, lora in expert.modules.items():
            a, b = (
                ("lora_embedding_A", "lora_embedding_B")
                if lora.is_embedding
                else (
                    "lora_A.weight",
                    "lora_B.weight",
                )
            )
            state[f"base_model.model.{name}.{a}"] = lora.lora_a.contiguous()
            state[f"base_model.model.{name}.{b}"] = lora.lora_b.contiguous()
        states.append(state)
    return Contents(
        config=files.config,
        expert_names=list(files.config.adapters),
        expert_configs=[dict(e.peft_config) for e in files.experts],
        expert_states=states,
        gate_state={k: v.contiguous() for k, v in files.gate_state.items()},
        adapted_modules=sorted({m for e in files.experts for m in e.modules}),
        base_model_id=base_model_id or files.base_model_id,
        base_record=_carried_record(files, base_model_id),
    )


def _carried_record(files: XLoraFiles, base_model_id: str | None) -> dict[str, Any] | None:
    """The source's `base_model.json` unless `base_model_id` names another base; else a record
    of the name alone (None when no name is known)."""
    name = base_model_id or files.base_model_id
    recorded = files.base_record
    if recorded and canonical_base_name(recorded.get("name")) == canonical_base_name(name):
        return recorded
    return named_base_record(name) if name else None


def detect_format(folder: Path) -> str:
    """The folder's format, from the files it holds.

    Raises:
        FileNotFoundError: when the folder is missing or matches no format, naming the files
            each format needs.
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    if native.is_native_folder(folder):
        return "loramix"
    if peft.is_peft_folder(folder):
        return "peft"
    if mistralrs.is_mistralrs_folder(folder) and xlora.is_xlora_folder(folder):
        return "mistralrs"
    if xlora.is_xlora_folder(folder):
        return "xlora"
    raise FileNotFoundError(
        f"{folder} holds no X-LoRA model: expected {CONFIG_NAME} with "
        f"{native.GATE_WEIGHTS_NAME} (loramix), adapter_config.json with peft_type XLORA "
        f"(peft), or {CONFIG_NAME} with {xlora.CLASSIFIER_NAME} or {xlora.CLASSIFIER_PT_NAME} "
        f"(the original xlora package; mistral.rs adds {mistralrs.ORDERING_NAME})"
    )


def read_folder(folder: str | os.PathLike[str]) -> XLoraFiles:
    """Reads an X-LoRA folder of any format in `FORMATS`; changes nothing."""
    folder = Path(folder)
    fmt = detect_format(folder)
    base_model_id: str | None = None
    recorded = None
    if fmt == "loramix":
        recorded = read_base_record(folder)
        name = (recorded or {}).get("name")
        base_model_id = str(name) if name else None
        config = native.read_config(folder)
        gate_state = native.read_gate(folder)
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
    return XLoraFiles(fmt, config, experts, gate_state, base_model_id, recorded)


def write_folder(
    contents: Contents,
    save_directory: str | os.PathLike[str],
    format: str,
    caller: str = "save_pretrained",
) -> set[Path]:
    """Writes `contents` in `format`, atomically; an existing folder keeps its other files.

    See `loramix.formats.existing`: a new folder appears whole; into an existing one only the
    format's own files are moved, and stale ones of an earlier save in the same format go.

    Returns:
        The relative paths of the files written.

    Raises:
        ValueError: an unknown format, a missing base model id ("xlora", "mistralrs"),
            contents the format cannot hold (the message says why and which format can), or a
            target that is a file or holds another kind of model or another format's X-LoRA
            (the message starts with `caller` unless it is empty); nothing is written then.
    """
    if format not in FORMATS:
        raise ValueError(f"format={format!r}: use one of {FORMATS}")
    if format in ("xlora", "mistralrs") and not contents.base_model_id:
        raise ValueError(
            f"format={format!r} records the base model's id, and none is known (the source "
            "names none, or the base model has no name_or_path); pass "
            "base_model_id='<hub id or folder of the base model>' (convert: --base-model-id)"
        )
    if format not in FILES_ONLY_FORMATS and contents.model is None:
        raise ValueError(
            "format='mistralrs' lists the adapted modules in the base model's named_modules() "
            "order, which the files alone do not give; load the model (convert: --base)"
        )
    if format == "peft":
        peft.check_writable(contents)
    target = Path(save_directory)
    if format == "mistralrs":
        mistralrs.check_writable(contents.model)
        existing_folder.check_target(target, format, caller)  # what the folder is, first
        mistralrs.check_other_files(target, contents.expert_names)

    def write(staging: Path) -> None:
        if format == "loramix":
            native.write(contents, staging)
        elif format == "peft":
            peft.write(contents, staging, target)
        elif format == "xlora":
            xlora.write(contents, staging)
        else:
            mistralrs.write(contents, staging)

    return existing_folder.save(target, format, write, caller)


def convert(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    format: str,
    base_model: nn.Module | None = None,
    base_model_id: str | None = None,
) -> str:
    """Rewrites an X-LoRA folder in another format; returns the source's format.

    Without `base_model` the files alone are converted (any format to loramix, peft or
    xlora); with it the model is loaded first, which checks the experts and gate against
    the base and is needed for mistral.rs's format.
    """
    source, target = Path(source), Path(target)
    files = read_folder(source)
    if target.resolve() == source.resolve() or source.resolve() in target.resolve().parents:
        where = "is" if target.resolve() == source.resolve() else "is inside"
        raise ValueError(
            f"the target {target} {where} the source folder {source}; write to a folder "
            "outside it (nothing was written, the source is as it was)"
        )
    if base_model is None:
        contents = contents_of_files(files, base_model_id)
    else:
        from loramix.model import XLoraModel

        model = XLoraModel.from_pretrained(base_model, source)
        contents = contents_of_model(model, base_model_id or files.base_model_id)
    write_folder(contents, target, format, caller="")
    return files.format


def _load_experts(config: XLoraConfig) -> list[LoraExpert]:
    return [load_expert(name, path) for name, path in config.adapters.items()]


def _base_model_id(folder: Path) -> str | None:
    data = json.loads((folder / CONFIG_NAME).read_text())
    value = data.get("base_model_id")
    return str(value) if value else None
