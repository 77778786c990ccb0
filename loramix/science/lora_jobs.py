"""Train the LoRA adapters of a retrain run: each expert on its domain, and the multitask LoRA
(and its candidate schedules, `loramix.science.multitask_choice`) on all of them, with the
run's one `TrainingConfig` (`training_config`), side by side in worker processes
(`train_loras`).

With `RetrainSettings.keep_best`, every adapter ends at its checkpoint with the lowest loss on
the dev split of its data (the multitask LoRA: on all domains' dev files), measured
`EVAL_POINTS` times during training: the number of steps is then chosen on dev, per adapter,
up to `expert_steps`. A multitask candidate's name says whether it does (`s4000-best`) or
trains to its end (`s4000`). Test files are never read here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from loramix.atomic import write_text_atomic
from loramix.science.retrain_jobs import (
    earlier_time,
    finished_job,
    job_record,
    keep_partial_timings,
    resume_clock,
    resumed_step,
    worker_plan,
)
from loramix.training.trainer import CHECKPOINTS, TrainingConfig, last_checkpoint

if TYPE_CHECKING:
    from loramix.science.pipeline import RetrainPaths, RetrainSettings

logger = logging.getLogger(__name__)

MULTITASK = "multitask"  # the multitask LoRA's folder under experts/ and its system name
MULTITASK_JSON = "multitask.json"  # its rank, steps and data, beside its adapter
EVAL_POINTS = 10
"""Dev-loss measurements (each with a checkpoint) per adapter when `keep_best` is on;
checkpoints to resume from come every `save_steps` besides."""


def resume_flags(out: Path) -> dict[str, bool]:
    """Resume from a checkpoint if one exists; otherwise start over (replacing leftovers)."""
    resume = last_checkpoint(out / CHECKPOINTS) is not None
    return {"resume": resume, "overwrite": not resume}


def training_config(
    settings: RetrainSettings, seed: int, *, lr: float, steps: int, keep_best: bool = False
) -> TrainingConfig:
    """The one `TrainingConfig` of the run; experts and gate differ in `lr` and `steps`, and
    the LoRA adapters may keep their best checkpoint on dev (`keep_best`): they then measure
    the dev loss, and save a checkpoint, every `steps / EVAL_POINTS` steps (at least
    `settings.save_steps`). Checkpoints to resume from come every `settings.save_steps`
    either way."""
    eval_steps = max(settings.save_steps, steps // EVAL_POINTS) if keep_best else None
    return TrainingConfig(
        lr=lr,
        max_steps=steps,
        batch_size=settings.batch_size,
        seed=seed,
        max_length=settings.max_length,
        chat=False,
        eval_fraction=0.0,
        save_steps=settings.save_steps,
        eval_steps=eval_steps,
        save_total_limit=1,
        warmup=0.05,
        lr_scheduler=settings.lr_scheduler,
        logging_steps=25,
        progress=False,
        keep_best=keep_best,
    )


def is_multitask(name: str) -> bool:
    """Whether `name` is the multitask LoRA's folder or one of its candidates'
    (`multitask-s4000`, see `loramix.science.multitask_choice`)."""
    return name == MULTITASK or name.startswith(MULTITASK + "-")


def multitask_schedule(name: str, settings: RetrainSettings) -> tuple[int, bool]:
    """(optimizer steps, keep the best checkpoint on dev) of the multitask LoRA `name`: the
    run's own (`MULTITASK`: E x expert_steps, `keep_best`), or a candidate's as its name
    spells them (`multitask-s4000`, `multitask-s4000-best`).

    Raises:
        ValueError: If `name` spells no candidate.
    """
    if name == MULTITASK:
        return len(settings.domains) * settings.expert_steps, settings.keep_best
    from loramix.science.multitask_choice import parse_candidate

    spelled = parse_candidate(name.removeprefix(MULTITASK + "-"))
    if spelled is None:
        raise ValueError(f"{name}: not a multitask LoRA candidate (multitask-s<steps>[-best])")
    return spelled


def train_lora_job(
    paths: RetrainPaths, name: str, seed: int, settings: RetrainSettings
) -> dict[str, Any]:
    """Train one expert, or a multitask LoRA (`MULTITASK`, or a candidate's folder name such as
    `multitask-s4000`), in a worker process.

    Returns:
        Its optimizer steps, the step it resumed from (0 when it started afresh), the step
        whose weights it kept, and the time its earlier calls took (`earlier_time`), so that
        its record adds up to the time of all its steps.
    """
    from loramix.records import TRAINING_RECORD_NAME
    from loramix.training.expert import LoraSettings, train_expert

    multitask = is_multitask(name)
    n = len(settings.domains) if multitask else 1
    steps, keep_best = (
        multitask_schedule(name, settings)
        if multitask
        else (settings.expert_steps, settings.keep_best)
    )
    out = paths.expert(name)
    resumed_from, clock = resumed_step(out), resume_clock(out)
    domains = settings.domains if multitask else [name]
    files = [paths.train_file(d) for d in domains]
    train_expert(
        settings.base,
        files,
        out,
        LoraSettings(rank=n * settings.rank, alpha=n * settings.alpha, targets=settings.targets),
        training_config(
            settings,
            seed,
            lr=settings.multitask_lr if multitask else settings.expert_lr,
            steps=steps,
            keep_best=keep_best,
        ),
        dtype=getattr(torch, settings.train_dtype),
        eval_data=[paths.dev_file(d) for d in domains] if keep_best else (),
        callbacks=[clock],
        **resume_flags(out),
    )
    record = json.loads((out / TRAINING_RECORD_NAME).read_text())
    kept = record.get("kept_step", record["global_step"])  # older records: the last step
    if multitask:  # how it matches the experts, for the report
        plan = {
            "rank": n * settings.rank,
            "alpha": n * settings.alpha,
            "steps": steps,
            "kept_step": kept,
            "keep_best": keep_best,
            "lr": settings.multitask_lr,
            "examples_seen": steps * settings.batch_size,
            "train_files": [f.name for f in files],
            "experts": list(settings.domains),
        }
        write_text_atomic(out / MULTITASK_JSON, json.dumps(plan, indent=2) + "\n")
    value = {"steps": steps, "resumed_from_step": resumed_from, "kept_step": kept}
    return finished_job(out, clock, {**value, **earlier_time(clock)})


def train_loras(
    step: str,
    paths: RetrainPaths,
    names: Sequence[str],
    seed: int,
    settings: RetrainSettings,
    earlier: dict[str, Any],
    busy: int = 0,
) -> dict[str, Any]:
    """Trains the LoRAs `names` (experts' domains, or multitask candidates' folders: see
    `train_lora_job`), up to `settings.workers - busy` side by side.

    Args:
        step: The step's name in timings.json.
        earlier: The step's record in timings.json, if an earlier call trained some of them.
        busy: Workers taken by background jobs (the multitask LoRA and its candidates).

    Returns:
        The step's record besides its wall time: CPU time of all of them (their workers',
        over all the calls that trained them), workers, threads per worker, and each one's
        own times.
    """
    from loramix.training.jobs import run_jobs

    workers, threads = worker_plan(settings, len(names), busy=busy)
    each = dict(earlier.get("each", {}))
    logger.info(
        "%s: training %d LoRA(s), %d at a time with %d thread(s) each",
        step,
        len(names),
        workers,
        threads,
    )
    jobs = {name: (paths, name, seed, settings) for name in names}
    for done in run_jobs(train_lora_job, jobs, workers=workers, threads=threads):
        each[done.name] = job_record(done)
        logger.info("%s %s: done in %.1f s", step, done.name, done.wall_s)
        keep_partial_timings(paths.out, step, {"each": each})  # kept if interrupted
    cpu_s = round(sum(each[name]["cpu_s"] for name in names), 1)
    return {"cpu_s": cpu_s, "workers": workers, "threads": threads, "each": each}
