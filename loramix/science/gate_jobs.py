"""Train the gates of a retrain run: one per `GateCandidate` over the frozen experts, side by
side in worker processes (`train_gates`), with the run's one `TrainingConfig`
(`loramix.science.lora_jobs.training_config`). `loramix.science.add_domain` trains one more
with `train_gate_candidate`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback

from loramix.config import XLoraConfig
from loramix.science.lora_jobs import resume_flags, training_config
from loramix.science.retrain_jobs import (
    earlier_time,
    finished_job,
    job_record,
    keep_partial_timings,
    resume_clock,
    resumed_step,
    worker_plan,
)

if TYPE_CHECKING:
    from loramix.science.pipeline import RetrainPaths, RetrainSettings
    from loramix.science.selection import GateCandidate

logger = logging.getLogger(__name__)


def train_gates(
    paths: RetrainPaths,
    candidates: Sequence[GateCandidate],
    seed: int,
    settings: RetrainSettings,
    earlier: dict[str, Any],
) -> dict[str, Any]:
    """Train one gate per candidate, side by side; returns the CPU time of all candidates (the
    workers'), the workers and each one's time (with those of `earlier`, the step's record
    from a call that trained some of them)."""
    from loramix.training.jobs import run_jobs

    workers, threads = worker_plan(settings, len(candidates))
    logger.info(
        "training %d gate(s), %d at a time with %d thread(s) each",
        len(candidates),
        workers,
        threads,
    )
    jobs = {c.name: (paths, c, seed, settings) for c in candidates}
    each = dict(earlier.get("each", {}))
    for done in run_jobs(gate_job, jobs, workers=workers, threads=threads):
        each[done.name] = job_record(done)
        logger.info("gate %s: done in %.1f s", done.name, done.wall_s)
        keep_partial_timings(paths.out, "gates", {"each": each})  # kept if interrupted
    cpu_s = round(sum(each[c.name]["cpu_s"] for c in candidates if c.name in each), 1)
    return {"cpu_s": cpu_s, "workers": workers, "threads": threads, "each": each}


def gate_job(
    paths: RetrainPaths, candidate: GateCandidate, seed: int, settings: RetrainSettings
) -> dict[str, Any]:
    """Train the gate of one candidate, in a worker process (returns as `train_lora_job`)."""
    out = paths.gate(candidate.name)
    resumed_from, clock = resumed_step(out), resume_clock(out)
    train_gate_candidate(paths, out, candidate, seed, settings, callbacks=[clock])
    value = {"steps": candidate.steps, "resumed_from_step": resumed_from}
    return finished_job(out, clock, {**value, **earlier_time(clock)})


def train_gate_candidate(
    paths: RetrainPaths,
    out: Path,
    candidate: GateCandidate,
    seed: int,
    settings: RetrainSettings,
    domains: Sequence[str] | None = None,
    callbacks: Sequence[TrainerCallback] = (),
) -> None:
    """Train the gate of `candidate` over the experts of `domains` (default: the run's), with
    extra `callbacks` for its Trainer. Its checkpoints stay in `out/checkpoints` for the
    caller to delete once it has kept what it needs (`gate_job`: the job's time)."""
    from loramix.training.gate import train_gate

    domains = settings.domains if domains is None else domains
    xlora = XLoraConfig(
        adapters={domain: str(paths.expert(domain)) for domain in domains},
        layerwise_scalings=settings.layerwise
        if candidate.layerwise is None
        else candidate.layerwise,
        xlora_depth=candidate.depth,
        xlora_size=settings.gate_size,
        xlora_dropout_p=0.0,
        softmax_temperature=candidate.temperature,
    )
    train_gate(
        settings.base,
        xlora,
        [f"{paths.train_file(d)}:{candidate.weights.get(d, 1)}" for d in domains],
        out,
        training_config(settings, seed, lr=candidate.lr, steps=candidate.steps),
        dtype=getattr(torch, settings.train_dtype),
        callbacks=callbacks,
        **resume_flags(out),
    )
