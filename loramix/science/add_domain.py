"""Add one domain to a finished retrain: its data, its expert and a new gate, nothing else.

This is what the mixture buys in practice. The experts already trained stay frozen and are
reused; adding a domain trains one expert and one gate (with the settings chosen on dev in
the run). The multitask LoRA, by contrast, has to be retrained on the union of all the
domains' data. `add_domain` does the former and records, in `OUT/add-<domain>/timings.json`,
its wall and CPU time beside those of the run's multitask LoRA (from `OUT/timings.json`;
the one chosen on dev when the run had candidates, `OUT/multitask_selection.json`), scaled to
one more domain.

Both clocks are given because they answer different questions. Wall time is what a user
waits on an idle machine; but a run shares its cores (the multitask LoRA trains beside the
experts, and anything else on the machine slows both), so a job's wall time also counts its
neighbours. CPU time counts only the job's own work, and is the comparison that holds when
the run was not alone on the machine. It holds at equal threads per job: the retrain's jobs
run on one thread each on a 2-core machine, while `add_domain` runs here with torch's
threads (its record says how many), whose overhead counts against adding the domain.

`add_domain_cost` reads the same comparison off the timings of a single full run (one
expert's time plus the chosen gate's time, against the multitask LoRA's time), so a run
reports it without adding a domain.

    OUT/data/<domain>_{train,dev,test}.jsonl    the new domain's files (the same bytes a run
                                                with that domain writes: each domain draws
                                                from its own seed)
    OUT/experts/<domain>/                       its expert
    OUT/add-<domain>/xlora/                     the new gate over every expert
    OUT/add-<domain>/timings.json               data, expert and gate wall times
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from loramix.atomic import write_text_atomic
from loramix.science.pipeline import (
    MULTITASK,
    SELECTION_JSON,
    TIMINGS_JSON,
    RetrainPaths,
    RetrainSettings,
    read_json,
)
from loramix.science.selection import GateCandidate, recorded_candidate
from loramix.training.trainer import CHECKPOINTS

logger = logging.getLogger(__name__)

MIN_TIMED_SHARE = 0.5
"""An expert whose recorded time covers less of its steps is left out of the slowest expert
(its time would be mostly loading and the final evaluation, scaled up)."""


def add_domain_cost(
    timings: dict[str, Any], settings: RetrainSettings, baseline: str = MULTITASK
) -> dict[str, Any]:
    """Adding a domain (one expert + one gate) against retraining the multitask LoRA
    `baseline` (the one the report scores: the run's own, or a candidate chosen on dev).

    Args:
        timings: A finished run's `timings.json` (experts with "each", gates with "each",
            select with "chosen", the multitask LoRA's own time in "multitask"). An expert
            whose time was lost (trained by a call that stopped before the timings of its
            step were kept), or covers less than half its steps (it resumed late from a
            checkpoint that kept no time: its time is mostly loading and the final
            evaluation), is left out of the slowest.

    Returns:
        Seconds of each, the multitask time scaled to one more domain, and their ratio; the
        share of its steps the gate's and the multitask LoRA's times cover, where less than
        all ("timed_shares": their times are scaled up from those steps).

    Raises:
        ValueError: If the timings lack the records this needs (say which).
    """
    try:
        each = timings["experts"]["each"]
        experts = [
            each[d]
            for d in settings.domains
            if d in each and timed_share(each[d]) >= MIN_TIMED_SHARE
        ]
        if not experts:
            raise KeyError(settings.domains[0])
        gate = timings["gates"]["each"][timings["select"]["chosen"]]
        multitask = multitask_job(timings, baseline)
        if multitask is None:
            raise KeyError(baseline)
    except (KeyError, TypeError) as error:
        raise ValueError(
            f"timings.json lacks {error}; it needs the experts (with the multitask LoRA), "
            "gates and select steps of one run, timed in the same call"
        ) from None
    n = len(settings.domains)

    def compare(clock: str) -> dict[str, Any]:
        expert_s = max(full_seconds(job, clock) for job in experts)  # the slowest domain
        gate_s = full_seconds(gate, clock)
        retrain_s = full_seconds(multitask, clock) * (n + 1) / n  # one more domain's steps
        add_s = expert_s + gate_s
        return {
            "add_domain_s": round(add_s, 1),
            "expert_s": expert_s,
            "gate_s": gate_s,
            "multitask_retrain_s": round(retrain_s, 1),
            "ratio": round(retrain_s / add_s, 2),
        }

    try:
        cost = {**compare("wall_s"), "experts_timed": len(experts), "multitask": baseline}
        if all("cpu_s" in job for job in [*experts, gate, multitask]):  # older runs lack it
            cost["cpu"] = compare("cpu_s")
    except ValueError as error:
        raise ValueError(f"timings.json cannot give the cost: {error}") from None
    shares = {name: timed_share(job) for name, job in (("gate", gate), ("multitask", multitask))}
    if any(share < 1 for share in shares.values()):
        cost["timed_shares"] = {name: round(share, 3) for name, share in shares.items()}
        for name, share in shares.items():
            if share < MIN_TIMED_SHARE:
                logger.warning(
                    "add-a-domain cost: the %s's time covers %.0f%% of its steps, "
                    "scaled up to all of them",
                    name,
                    100 * share,
                )
    return cost


def multitask_job(timings: dict[str, Any], name: str = MULTITASK) -> dict[str, Any] | None:
    """A multitask LoRA's own job record in a run's `timings.json`, if it is there. The
    run's own (`MULTITASK`): its background job's (the "multitask" step) or, in runs that
    trained it beside the experts, its entry among the experts'. A candidate (`s4000`): its
    entry in the "multitask-candidates" step."""
    if name != MULTITASK:
        from loramix.science.multitask_choice import candidate_folder

        return timings.get("multitask-candidates", {}).get("each", {}).get(candidate_folder(name))
    job = timings.get(MULTITASK, {}).get("job")
    if job is None:
        job = timings.get("experts", {}).get("each", {}).get(MULTITASK)
    return job


def multitask_seconds(
    timings: dict[str, Any], name: str = MULTITASK, clock: str = "wall_s"
) -> float | None:
    """A multitask LoRA's own training time (`clock`: "wall_s" or "cpu_s") in a run's
    `timings.json`, if it is there; scaled to all its steps if it resumed."""
    job = multitask_job(timings, name)
    return None if job is None or clock not in job else full_seconds(job, clock)


def timed_share(job: dict[str, Any]) -> float:
    """The share of a training job's steps its recorded time covers (`full_seconds`)."""
    timed_from = job.get("timed_from_step", job.get("resumed_from_step", 0))
    return (job["steps"] - timed_from) / job["steps"] if timed_from else 1.0


def full_seconds(job: dict[str, Any], clock: str = "wall_s") -> float:
    """A training job's time (`clock`: "wall_s" or "cpu_s") for all its steps. Its record
    covers them all unless it resumed from a checkpoint that kept no time (a run from before
    clocks were kept: `retrain_jobs.job_record`); its time is then scaled up from the steps
    it covers, and they must be some."""
    timed_from = job.get("timed_from_step", job.get("resumed_from_step", 0))
    if timed_from:
        timed = job["steps"] - timed_from
        if timed <= 0:  # resumed at its last checkpoint: its time covers no step
            raise ValueError(f"a job timed from step {timed_from} of {job['steps']} covers no step")
        return round(job[clock] * job["steps"] / timed, 1)
    return job[clock]


def add_domain(
    out_dir: str | os.PathLike[str],
    domain: str,
    seed: int = 0,
    settings: RetrainSettings | None = None,
) -> dict[str, Any]:
    """Train `domain`'s expert and a new gate on top of the finished run in `out_dir`.

    Args:
        out_dir: A retrain run folder whose steps up to `select` are done.
        domain: A domain of `loramix.science.DOMAINS` that the run does not have.
        seed: The run's seed.
        settings: The run's settings (checked against its `run.json`).

    Returns:
        The record written to `OUT/add-<domain>/timings.json`.

    Raises:
        ValueError: If the domain is unknown or already in the run, or the run is not
            finished, or was made with other settings.
    """
    import dataclasses

    from loramix.science.datasets import write_datasets
    from loramix.science.gate_jobs import train_gate_candidate
    from loramix.science.lora_jobs import train_lora_job
    from loramix.science.multitask_choice import recorded_choice
    from loramix.science.registry import DOMAINS
    from loramix.science.retrain_jobs import CHANGEABLE, check_run_settings, resume_clock

    settings = settings or RetrainSettings()
    paths = RetrainPaths(Path(out_dir))
    problems = []
    if domain not in DOMAINS:
        problems.append(f"domain {domain!r} is not one of {list(DOMAINS)}")
    if domain in settings.domains:
        problems.append(f"the run already has the domain {domain!r}")
    selection = read_json(paths.out / SELECTION_JSON)
    if not selection:
        problems.append(f"{paths.out} holds no finished run (no {SELECTION_JSON}); retrain first")
    if problems:
        raise ValueError("cannot add a domain: " + "; ".join(problems))
    # The gate candidates do not matter here: the new gate takes the chosen one's settings,
    # as the run recorded them (a run made with other default candidates still qualifies).
    check_run_settings(paths.out, seed, settings, ignore=CHANGEABLE)
    candidate = chosen_candidate(selection, paths.out / SELECTION_JSON)
    domains = (*settings.domains, domain)
    record: dict[str, Any] = {
        "domain": domain,
        "gate": candidate.name,
        "threads": torch.get_num_threads(),
    }
    cpu: dict[str, float] = {}  # the same steps' CPU time (everything runs in this process)
    start, cpu_start = time.perf_counter(), time.process_time()
    staging = paths.out / f"add-{domain}"
    write_datasets(
        staging / "data",
        seed=seed,
        n_train=settings.n_train,
        n_test=settings.n_test,
        n_dev=settings.n_dev,
        domains=[domain],
    )
    for split in ("train", "dev", "test"):
        name = f"{domain}_{split}.jsonl"
        write_text_atomic(paths.data / name, (staging / "data" / name).read_text())
    record["data_s"] = round(time.perf_counter() - start, 2)
    cpu["data_s"] = round(time.process_time() - cpu_start, 2)
    start, cpu_start = time.perf_counter(), time.process_time()
    earlier = train_lora_job(paths, domain, seed, settings)["earlier"]  # calls before this
    expert = {
        "wall_s": time.perf_counter() - start + earlier["wall_s"],
        "cpu_s": time.process_time() - cpu_start + earlier["cpu_s"],
        "steps": settings.expert_steps,
        "timed_from_step": earlier["timed_from_step"],
    }
    start, cpu_start = time.perf_counter(), time.process_time()
    wider = dataclasses.replace(settings, domains=domains)
    gate_clock = resume_clock(staging / "xlora")
    train_gate_candidate(paths, staging / "xlora", candidate, seed, wider, callbacks=[gate_clock])
    shutil.rmtree(staging / "xlora" / CHECKPOINTS, ignore_errors=True)  # the gate is complete
    gate = {
        "wall_s": time.perf_counter() - start + gate_clock.earlier.wall_s,
        "cpu_s": time.process_time() - cpu_start + gate_clock.earlier.cpu_s,
        "steps": candidate.steps,
        "timed_from_step": gate_clock.earlier.timed_from_step,
    }
    for key, job in (("expert_s", expert), ("gate_s", gate)):  # all steps, if resumed late
        record[key] = round(full_seconds(job, "wall_s"), 2)
        cpu[key] = round(full_seconds(job, "cpu_s"), 2)
    untimed = {"expert": expert["timed_from_step"], "gate": gate["timed_from_step"]}
    if any(untimed.values()):  # resumed from a checkpoint that kept no time: scaled up
        record["timed_from_step"] = untimed
    record["multitask"] = recorded_choice(paths)
    timings = read_json(paths.out / TIMINGS_JSON)
    n = len(settings.domains)
    for times, clock_name in ((record, "wall_s"), (cpu, "cpu_s")):
        times["add_domain_s"] = round(times["data_s"] + times["expert_s"] + times["gate_s"], 2)
        try:
            multitask_s = multitask_seconds(timings, record["multitask"], clock_name)
        except ValueError as error:  # its time covers none of its steps
            logger.warning("multitask LoRA's time not compared: %s", error)
            multitask_s = None
        if multitask_s is not None:
            times["multitask_retrain_s"] = round(multitask_s * (n + 1) / n, 1)
            times["ratio"] = round(times["multitask_retrain_s"] / times["add_domain_s"], 2)
    record["cpu"] = cpu
    write_text_atomic(staging / TIMINGS_JSON, json.dumps(record, indent=2) + "\n")
    logger.info("added %s in %.0f s: %s", domain, record["add_domain_s"], record)
    return record


def chosen_candidate(selection: dict[str, Any], path: Path) -> GateCandidate:
    """The settings of the gate a run chose, from its selection record at `path`."""
    chosen = selection.get("chosen")
    record = selection.get("candidates", {}).get(chosen, {}) if isinstance(chosen, str) else {}
    fields = record.get("settings") if isinstance(record, dict) else None
    try:
        return GateCandidate(**recorded_candidate(fields))
    except TypeError as error:
        raise ValueError(
            f"{path}: the chosen gate {chosen!r} has no readable settings ({error}); "
            "run the retrain's selection again (delete the file and call retrain)."
        ) from None
