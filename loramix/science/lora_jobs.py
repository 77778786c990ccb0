"""Train the LoRA adapters of a retrain run: each expert on its domain, and the multitask LoRA
on all of them, with the run's one `TrainingConfig` (`training_config`).

With `RetrainSettings.keep_best`, every adapter ends at its checkpoint with the lowest loss on
the dev split of its data (the multitask LoRA: on all domains' dev files), measured
`EVAL_POINTS` times during training: the number of steps is then chosen on dev, per adapter,
up to `expert_steps`. Test files are never read here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from loramix.atomic import write_text_atomic
from loramix.science.retrain_jobs import resumed_step
from loramix.training.trainer import CHECKPOINTS, TrainingConfig, last_checkpoint

if TYPE_CHECKING:
    from loramix.science.pipeline import RetrainPaths, RetrainSettings

MULTITASK = "multitask"  # the multitask LoRA's folder under experts/ and its system name
MULTITASK_JSON = "multitask.json"  # its rank, steps and data, beside its adapter
EVAL_POINTS = 10
"""Dev-loss measurements (and checkpoints) per adapter when `keep_best` is on."""


def resume_flags(out: Path) -> dict[str, bool]:
    """Resume from a checkpoint if one exists; otherwise start over (replacing leftovers)."""
    resume = last_checkpoint(out / CHECKPOINTS) is not None
    return {"resume": resume, "overwrite": not resume}


def training_config(
    settings: RetrainSettings, seed: int, *, lr: float, steps: int, keep_best: bool = False
) -> TrainingConfig:
    """The one `TrainingConfig` of the run; experts and gate differ in `lr` and `steps`, and
    the LoRA adapters may keep their best checkpoint on dev (`keep_best`): they then save a
    checkpoint and measure the dev loss every `steps / EVAL_POINTS` steps (at least
    `settings.save_steps`)."""
    save_steps = (
        max(settings.save_steps, steps // EVAL_POINTS) if keep_best else settings.save_steps
    )
    return TrainingConfig(
        lr=lr,
        max_steps=steps,
        batch_size=settings.batch_size,
        seed=seed,
        max_length=settings.max_length,
        chat=False,
        eval_fraction=0.0,
        save_steps=save_steps,
        eval_steps=save_steps if keep_best else None,
        save_total_limit=1,
        warmup=0.05,
        lr_scheduler=settings.lr_scheduler,
        logging_steps=25,
        progress=False,
        keep_best=keep_best,
    )


def train_lora_job(
    paths: RetrainPaths, name: str, seed: int, settings: RetrainSettings
) -> dict[str, int]:
    """Train one expert, or the multitask LoRA (`MULTITASK`), in a worker process.

    Returns:
        Its optimizer steps, the step it resumed from (0 when it started afresh), so that its
        time can be read as the time of all its steps, and the step whose weights it kept.
    """
    from loramix.records import TRAINING_RECORD_NAME
    from loramix.training.expert import LoraSettings, train_expert

    n = len(settings.domains) if name == MULTITASK else 1
    out = paths.expert(name)
    resumed_from = resumed_step(out)
    domains = settings.domains if name == MULTITASK else [name]
    files = [paths.train_file(d) for d in domains]
    train_expert(
        settings.base,
        files,
        out,
        LoraSettings(rank=n * settings.rank, alpha=n * settings.alpha, targets=settings.targets),
        training_config(
            settings,
            seed,
            lr=settings.multitask_lr if name == MULTITASK else settings.expert_lr,
            steps=n * settings.expert_steps,
            keep_best=settings.keep_best,
        ),
        dtype=getattr(torch, settings.train_dtype),
        eval_data=[paths.dev_file(d) for d in domains] if settings.keep_best else (),
        **resume_flags(out),
    )
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)  # the adapter is complete
    record = json.loads((out / TRAINING_RECORD_NAME).read_text())
    kept = record.get("kept_step", record["global_step"])  # older records: the last step
    if name == MULTITASK:  # how it matches the experts, for the report
        plan = {
            "rank": n * settings.rank,
            "alpha": n * settings.alpha,
            "steps": n * settings.expert_steps,
            "kept_step": kept,
            "lr": settings.multitask_lr,
            "examples_seen": n * settings.expert_steps * settings.batch_size,
            "train_files": [f.name for f in files],
            "experts": list(settings.domains),
        }
        write_text_atomic(out / MULTITASK_JSON, json.dumps(plan, indent=2) + "\n")
    return {
        "steps": n * settings.expert_steps,
        "resumed_from_step": resumed_from,
        "kept_step": kept,
    }
