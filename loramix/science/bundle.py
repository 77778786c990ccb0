"""The bundle: a trained X-LoRA folder exported in float16 beside its evaluation report.

`export_bundle` is the last step of `loramix.science.pipeline.retrain`; `loramix science demo`
reads the bundle back. Its place is an argument everywhere (`--bundle`, `--model`); the
default, `models/science-xlora`, is relative to the working directory (the repository root
for `make demo`), never to where the package is installed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from loramix.atomic import atomic_folder
from loramix.config import CONFIG_NAME
from loramix.records import BASE_RECORD_NAME, TRAINING_RECORD_NAME, read_training_record

logger = logging.getLogger(__name__)

DEFAULT_BUNDLE = Path("models") / "science-xlora"
"""Where the repository keeps the trained experts and gate, relative to its root."""

MAX_BUNDLE_BYTES = 40_000_000
"""The bundle's size limit: 40 MB (decimal) of half precision weights, configs and reports
(eight rank-8 experts on SmolLM2 take about 31 MB; the multitask baseline is not bundled)."""

RETRAIN_JSON = "retrain.json"
"""Settings, data manifest and step timings of the run that made a bundle."""

MAKE_RETRAIN = "loramix science retrain --out runs/retrain --seed 0 --multitask-candidates s4000"
"""The command `make retrain` runs (Makefile), as `retrain.json` records it."""

_WEIGHT_SUFFIX = ".safetensors"
_ADAPTER_CONFIG = "adapter_config.json"
_BUNDLED_RECORD = ("command", "status", "base_model", "prompts", "global_step")
"""The fields of the gate's training_args.json that the bundle keeps (no paths or timings)."""


def export_bundle(
    xlora_dir: str | os.PathLike[str],
    bundle_dir: str | os.PathLike[str],
    *,
    reports: Sequence[str | os.PathLike[str]] = (),
    provenance: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float16,
    max_bytes: int = MAX_BUNDLE_BYTES,
) -> int:
    """Copy an X-LoRA folder into `bundle_dir` with every floating weight cast to `dtype`.

    Configs are copied as they are (peft adapter configs with `target_modules` sorted, so
    that the same run gives the same bytes); `*.safetensors` files of the gate and the
    experts are rewritten with floating tensors in `dtype`; training logs and checkpoints
    are left out. `base_model.json` is copied, and of `training_args.json` only the base model
    and the prompt rendering are kept (what `generate` and `eval` default to).
    `reports` (e.g. `eval.md`) are copied beside the model, and `provenance` is written as
    `retrain.json` with a short `README.md`. The bundle is assembled in a temporary folder
    beside `bundle_dir` and swapped in only when complete and within `max_bytes`.

    Args:
        xlora_dir: A folder written by `XLoraModel.save_pretrained` (or `train_gate`).
        bundle_dir: The bundle folder; replaced as a whole.
        reports: Files to copy into the bundle (missing ones are skipped with a warning).
        provenance: JSON-able record of how the model was made.
        dtype: Dtype of the exported floating weights.
        max_bytes: Largest allowed total size of the bundle.

    Returns:
        The bundle's size in bytes.

    Raises:
        FileNotFoundError: If `xlora_dir` holds no `xlora_config.json`.
        ValueError: If the bundle would exceed `max_bytes` (the old bundle is kept).
    """
    source, target = Path(xlora_dir), Path(bundle_dir)
    if not (source / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"{source} holds no {CONFIG_NAME}: it is not an X-LoRA folder. Train the gate "
            "first (`loramix train-gate` or `loramix science retrain`)."
        )
    with atomic_folder(target) as staging:
        files = [source / CONFIG_NAME, source / "gate.safetensors"]
        files += [source / BASE_RECORD_NAME] if (source / BASE_RECORD_NAME).is_file() else []
        files += sorted(p for p in (source / "experts").rglob("*") if p.is_file())
        for path in files:
            dest = staging / path.relative_to(source)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if path.suffix == _WEIGHT_SUFFIX:
                tensors = {
                    name: t.to(dtype) if t.is_floating_point() else t
                    for name, t in load_file(path).items()
                }
                save_file(tensors, dest, metadata={"format": "pt"})
            elif path.name == _ADAPTER_CONFIG:
                dest.write_text(_stable_adapter_config(path.read_text()))
            else:
                shutil.copyfile(path, dest)
        for report in map(Path, reports):
            if report.is_file():
                shutil.copyfile(report, staging / report.name)
            else:
                logger.warning("export: %s does not exist; not bundled", report)
        training = read_training_record(source)
        if training is not None:  # which base and prompt rendering generate / eval default to
            kept = {k: training[k] for k in _BUNDLED_RECORD if k in training}
            (staging / TRAINING_RECORD_NAME).write_text(json.dumps(kept, indent=2) + "\n")
        if provenance is not None:
            (staging / RETRAIN_JSON).write_text(json.dumps(provenance, indent=2) + "\n")
            (staging / "README.md").write_text(bundle_readme(provenance, target))
        _make_readable(staging)
        size = folder_size(staging)
        if size > max_bytes:
            raise ValueError(
                f"the bundle would take {size / 1e6:.2f} MB, above the limit of "
                f"{max_bytes / 1e6:.2f} MB; lower the rank, adapt fewer modules "
                "(targets) or shrink the gate (gate_size), then retrain"
            )
    logger.info("exported the bundle to %s (%.2f MB)", target, size / 1e6)
    return size


def _stable_adapter_config(text: str) -> str:
    """A peft adapter config with `target_modules` sorted.

    peft writes the set of target modules in the process's hash order, so the same training
    would otherwise give a different file in every run; sorted, a retrain reproduces the
    bundle byte for byte.
    """
    config = json.loads(text)
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def folder_size(folder: str | os.PathLike[str]) -> int:
    """Total bytes of the files under `folder`."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def bundle_readme(provenance: dict[str, Any], folder: str | os.PathLike[str]) -> str:
    """The bundle's README.md, from the provenance of the run that made it.

    Args:
        provenance: The run's settings, data and timings (`retrain.json`).
        folder: Where the bundle goes, as its commands should name it.
    """
    settings = provenance.get("settings", {})
    where = Path(folder).as_posix()
    domains = ", ".join(settings.get("domains", ()))
    command = provenance.get("command")
    if command == MAKE_RETRAIN:
        made = f"It is the output of `make retrain`:\n\n    {command}\n"
    elif command:
        made = f"It is the output of\n\n    {command}\n"
    else:
        made = "It was made through the Python API (`loramix.science.retrain`).\n"
    systems = "base, experts, uniform average" + (
        ", multitask LoRA" if settings.get("multitask") else ""
    )
    return f"""# science-xlora

An X-LoRA model over SmolLM2-135M-Instruct: {len(settings.get("domains", ()))} rank-\
{settings.get("rank")} LoRA experts ({domains}) and the gate that mixes them per token and
per adapted module, all weights in float16. {made}
Settings, data sizes and step times are in `retrain.json`, the evaluation of {systems} and
X-LoRA on held-out data in `eval.md`.

    loramix science demo --model {where}
    loramix generate {where} --show-experts \\
        --prompt "What peptide do the DNA codons ATG GCC TTT encode?"

```python
from loramix.model import XLoraModel
from loramix.smollm2 import load_base_model

base, tokenizer = load_base_model("smollm2")
model = XLoraModel.from_pretrained(base, "{where}")  # weights upcast to float32
```

Prompts are plain text, without the chat template (as in training).
"""


def _make_readable(folder: Path) -> None:
    """Ordinary repository permissions (mkdtemp and safetensors create owner-only ones)."""
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
