"""What mistral.rs needs to load an X-LoRA model: the original layout, flattened.

    xlora_config.json                  every field written out (mistral.rs's defaults differ:
                                       `enable_relu_and_dropout` false, `xlora_size` 1)
    xlora_classifier.safetensors       the gate: `inner.{k}.*` (k counts linear layers only)
                                       and `last.*`
    ordering.json                      `order` (the adapters' names), `layers` (adapted module
                                       path -> index in `named_modules()` order) and
                                       `base_model_id`
    <name>_adapter_config.json         one LoRA adapter per expert, as flat files: mistral.rs
    <name>_adapter_model.safetensors   does not look into sub-folders

Run it with `mistralrs run -m <base_model_id> --xlora DIR --xlora-order DIR/ordering.json`.
What mistral.rs (read from its source) asks of the files, and what loramix does about it:

- it applies the classifier's dropout at inference, so `xlora_dropout_p` is written as 0;
- its classifier sizes the last layer's input from `hidden_size`: a deeper gate is exported
  with its hidden layers zero-padded to `hidden_size` (exact), and refused if wider;
- every adapter must target the same modules with one rank and one `lora_alpha / r`: the
  experts are zero-padded to the union of modules and to their largest rank, and per-module
  scales (rsLoRA, `alpha_pattern`, `rank_pattern`) are folded into `lora_B`;
- it finds an adapter's files by the adapter's name appearing in the file name: names that
  would match another file are replaced by `expert_<i>` (logged); a save into an existing
  folder refuses the other files there whose names contain an adapter's (`check_other_files`);
- `enable_softmax_topk` is not implemented there, nor LoRA on embeddings: both are refused.

Its X-LoRA models also need, in the base model's folder: an explicit `lm_head.weight` when
the embeddings are tied, and `rope_theta` at the top level of `config.json` (transformers 5
writes it inside `rope_parameters`). `write_base_folder` writes such a folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional

from loramix.atomic import atomic_folder
from loramix.config import CONFIG_NAME, XLoraConfig
from loramix.experts import LoraExpert, load_expert, module_scale
from loramix.formats.classifier import pad_hidden_width, to_xlora_keys
from loramix.formats.xlora import (
    CLASSIFIER_NAME,
    config_dict,
    recorded_names,
    safe_name,
    write_expert,
)

if TYPE_CHECKING:
    from loramix.formats import Contents
    from loramix.model import XLoraModel

logger = logging.getLogger(__name__)

ORDERING_NAME = "ordering.json"
CONFIG_SUFFIX = "_adapter_config.json"
WEIGHTS_SUFFIX = "_adapter_model.safetensors"


def is_mistralrs_folder(folder: Path) -> bool:
    return (folder / ORDERING_NAME).is_file()


def own_files(folder: Path) -> list[Path]:
    """The files of an earlier save in `folder` (relative paths): the adapter files of the
    names its `ordering.json` and `xlora_config.json` list; other files are never listed."""
    names = recorded_names(folder / ORDERING_NAME, "order")
    names += recorded_names(folder / CONFIG_NAME, "adapters")
    own = [Path(name) for name in (CONFIG_NAME, CLASSIFIER_NAME, ORDERING_NAME)]
    own += [
        Path(name + suffix)
        for name in dict.fromkeys(names)
        for suffix in (CONFIG_SUFFIX, WEIGHTS_SUFFIX)
    ]
    return [path for path in own if (folder / path).is_file()]


def check_other_files(folder: Path, expert_names: list[str]) -> None:
    """Refuse other files in an existing `folder` that mistral.rs would take for its own.

    mistral.rs gives every file of the folder whose name contains an adapter's name to that
    adapter (and reads the first file whose name contains `xlora_config.json`, or
    `xlora_classifier.safetensors`), so a user's `bio_notes.txt` beside adapter `bio` would
    break loading.

    Raises:
        ValueError: Naming the files and the fix; nothing is written.
    """
    if not folder.is_dir():
        return
    names = adapter_names(expert_names)
    ours = {CONFIG_NAME, CLASSIFIER_NAME, ORDERING_NAME}
    ours |= {name + suffix for name in names for suffix in (CONFIG_SUFFIX, WEIGHTS_SUFFIX)}
    ours |= {path.as_posix() for path in own_files(folder)}  # an earlier save's: replaced
    claimed = [*names, CONFIG_NAME, CLASSIFIER_NAME]
    clashes = sorted(
        p.name for p in folder.iterdir() if p.name not in ours and any(c in p.name for c in claimed)
    )
    if clashes:
        raise ValueError(
            f"{folder} holds {clashes}, whose names contain an adapter's name ({names}) or "
            f"{CONFIG_NAME} / {CLASSIFIER_NAME}; mistral.rs takes every such file in the folder "
            "for the X-LoRA's own. Nothing was written: rename or move them, or save to "
            "another folder."
        )


def read_experts(folder: Path) -> tuple[list[LoraExpert], list[str], str]:
    """The experts from the flat adapter files, in `order`; the order; `base_model_id`."""
    path = folder / ORDERING_NAME
    try:
        ordering = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    order = ordering.get("order") if isinstance(ordering, dict) else None
    if not isinstance(order, list) or not order or not all(isinstance(n, str) for n in order):
        raise ValueError(f"{path}: 'order' must list the adapters' names, got {order!r}")
    experts = [
        load_expert(
            name, folder, config_file=name + CONFIG_SUFFIX, weights_file=name + WEIGHTS_SUFFIX
        )
        for name in order
    ]
    return experts, order, str(ordering.get("base_model_id", ""))


def check_writable(model: XLoraModel) -> None:
    problems = []
    if model.current_config().enable_softmax_topk:
        problems.append("enable_softmax_topk=True is not implemented in mistral.rs")
    embeddings = [
        name
        for name, module in zip(model.adapted_modules, model.mixed_modules(), strict=True)
        if isinstance(module.base_layer, nn.Embedding)
    ]
    if embeddings:
        problems.append(f"mistral.rs has no LoRA on embeddings, and {embeddings} are adapted")
    head = model.lm.get_output_embeddings()
    heads = [
        n for n, m in zip(model.adapted_modules, model.mixed_modules(), strict=True) if m is head
    ]
    if heads:
        problems.append(f"mistral.rs refuses an X-LoRA adapter on the output layer {heads}")
    targets = {name.rsplit(".", 1)[-1] for name in model.adapted_modules}
    adapted = set(model.adapted_modules)
    missing = [
        name
        for name, module in model.lm.named_modules()
        if name.rsplit(".", 1)[-1] in targets
        and name not in adapted
        and not any(name.startswith(a + ".") for a in adapted)
        and isinstance(module, nn.Linear)
    ]
    if missing:
        problems.append(
            f"mistral.rs adapts every module named {sorted(targets)}, but {missing[:3]} are not "
            "adapted (experts trained with layers_to_transform?); retrain on all layers"
        )
    if problems:
        raise ValueError("cannot save for mistral.rs:\n  " + "\n  ".join(problems))


def write(contents: Contents, folder: Path) -> None:
    """Writes the mistral.rs layout into the empty staging `folder` (needs `contents.model`)."""
    model = contents.model
    check_writable(model)
    config = contents.config
    hidden_size = contents.hidden_size
    gate_state = pad_hidden_width(contents.gate_state, config, hidden_size)
    exported = dataclasses.replace(
        config,
        xlora_size=hidden_size if config.xlora_depth > 1 else config.xlora_size,
        xlora_dropout_p=0.0,
    )
    names = adapter_names(contents.expert_names)
    targets = sorted({name.rsplit(".", 1)[-1] for name in model.adapted_modules})
    for index, name in enumerate(names):
        peft_config, state = padded_expert(model, index, targets)
        write_expert(
            contents, index, folder, name + CONFIG_SUFFIX, name + WEIGHTS_SUFFIX, peft_config, state
        )
    data = config_dict(contents, names)
    data.update(xlora_size=exported.xlora_size, xlora_dropout_p=0.0)
    (folder / CONFIG_NAME).write_text(json.dumps(data, indent=2) + "\n")
    save_file(
        to_xlora_keys(gate_state, config, "mistralrs"),
        folder / CLASSIFIER_NAME,
        metadata={"format": "pt"},
    )
    ordering = {
        "order": names,
        "layers": {name: i for i, name in enumerate(model.adapted_modules)},
        "base_model_id": contents.base_model_id,
    }
    (folder / ORDERING_NAME).write_text(json.dumps(ordering, indent=2) + "\n")


def adapter_names(expert_names: list[str]) -> list[str]:
    """The experts' names, or `expert_<i>` for all when one would match another's files.

    mistral.rs gives a file to the first adapter (in order) whose name is part of the file
    name, so no name may appear in any other file of the folder.
    """
    names = [safe_name(name) for name in expert_names]
    if _names_clash(names):
        width = len(str(len(names) - 1))
        fallback = [f"expert_{i:0{width}d}" for i in range(len(names))]
        logger.warning(
            "expert names %s would match other files in mistral.rs's folder; exported as %s",
            names,
            fallback,
        )
        return fallback
    return names


def _names_clash(names: list[str]) -> bool:
    files = [CONFIG_NAME, CLASSIFIER_NAME, ORDERING_NAME]
    files += [name + suffix for name in names for suffix in (CONFIG_SUFFIX, WEIGHTS_SUFFIX)]
    for name in names:
        own = {name + CONFIG_SUFFIX, name + WEIGHTS_SUFFIX}
        if any(name in file for file in files if file not in own):
            return True
        # a file of its own that an earlier adapter in the order would take
        earlier = names[: names.index(name)]
        if any(other in file for other in earlier for file in own):
            return True
    return False


def padded_expert(
    model: XLoraModel, index: int, targets: list[str]
) -> tuple[dict, dict[str, torch.Tensor]]:
    """One expert on every adapted module with one rank R and scale 1 or one shared scale.

    Modules the expert does not adapt get zero A and B; smaller ranks are zero-padded to R.
    When the modules' scales differ, each scale is folded into its `lora_B`.
    """
    modules = list(zip(model.adapted_modules, model.mixed_modules(), strict=True))
    weights = {name: module.expert_weights(index) for name, module in modules}
    peft_config = dict(model.expert_configs[index])
    scales = {
        name: module_scale(peft_config, name, pair[0].shape[0])
        for name, pair in weights.items()
        if pair is not None
    }
    rank = max(pair[0].shape[0] for pair in weights.values() if pair is not None)
    fold = len(set(scales.values())) > 1
    scale = 1.0 if fold else next(iter(scales.values()))
    state = {}
    for name, module in modules:
        pair = weights[name]
        if pair is None:
            in_features, out_features = _shape(module)
            lora_a = torch.zeros(rank, in_features)
            lora_b = torch.zeros(out_features, rank)
        else:
            lora_a, lora_b = (w.detach().cpu() for w in pair)
            if fold:
                lora_b = lora_b * scales[name]
            pad = rank - lora_a.shape[0]
            lora_a = functional.pad(lora_a, (0, 0, 0, pad))  # (R, in)
            lora_b = functional.pad(lora_b, (0, pad))  # (out, R)
        state[f"base_model.model.{name}.lora_A.weight"] = lora_a.contiguous()
        state[f"base_model.model.{name}.lora_B.weight"] = lora_b.contiguous()
    for key in ("alpha_pattern", "rank_pattern"):
        peft_config[key] = {}
    alpha = scale * rank
    peft_config.update(
        r=rank,
        lora_alpha=round(alpha) if math.isclose(alpha, round(alpha), rel_tol=1e-12) else alpha,
        use_rslora=False,
        lora_dropout=0.0,
        target_modules=targets,
        layers_to_transform=None,
    )
    return peft_config, state


def _shape(module: nn.Module) -> tuple[int, int]:
    """`(in, out)` of a mixing module's LoRA: its stacked A is `(R, in)`, B `(out, R)`."""
    return module.lora_a.shape[-1], module.lora_b.shape[-2]


def write_base_folder(
    base_model: nn.Module, save_directory: str | Path, tokenizer: object | None = None
) -> Path:
    """Saves a base model as mistral.rs's X-LoRA models load it, atomically.

    The weights go to one `model.safetensors` with `lm_head.weight` written out even when it
    is tied to the input embeddings, and `config.json` gets a top-level `rope_theta`.

    Args:
        base_model: The plain transformers causal LM (not wrapped by an `XLoraModel`).
        save_directory: The folder; replaced if it exists.
        tokenizer: Saved into the folder too when given.

    Raises:
        ValueError: when `base_model` holds X-LoRA mixing modules.
    """
    from loramix.layer import MixedLora

    if any(isinstance(module, MixedLora) for module in base_model.modules()):
        raise ValueError(
            "base_model holds X-LoRA mixing modules; pass the base model itself (call "
            "`unload()` on the X-LoRA model first)"
        )
    with atomic_folder(save_directory) as staging:
        base_model.save_pretrained(staging)
        for path in list(staging.glob("model*.safetensors")) + list(staging.glob("*.index.json")):
            path.unlink()
        state = {k: v.detach().contiguous().cpu() for k, v in base_model.state_dict().items()}
        output = base_model.get_output_embeddings()
        if output is not None and "lm_head.weight" not in state:
            state["lm_head.weight"] = output.weight.detach().cpu().clone()
        elif "lm_head.weight" in state:
            state["lm_head.weight"] = state["lm_head.weight"].clone()  # untie for safetensors
        save_file(state, staging / "model.safetensors", metadata={"format": "pt"})
        config_path = staging / "config.json"
        config = json.loads(config_path.read_text())
        theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta")
        if theta is not None:
            config["rope_theta"] = theta
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    return Path(save_directory)


def config_for_reading(config: XLoraConfig, order: list[str], folder: Path) -> XLoraConfig:
    """The config with `adapters` naming the flat files' folder (read via `read_experts`)."""
    return dataclasses.replace(config, adapters={name: str(folder) for name in order})
