"""What a science retrain cost, read from its run folder: every step's and every job's time.

    PYTHONPATH=. .venv/bin/python benchmarks/retrain_times.py runs/retrain [--cores 2]

Reads `timings.json` and `run.json` of a run folder made by `loramix science retrain` (or a
folder that holds copies of them, such as `docs/science-v2`) and prints, as Markdown tables:

- each step's wall and CPU time as the run recorded them (a step finished by an earlier call
  keeps that call's times);
- each training job (experts, multitask LoRAs, gate candidates): its steps, the step whose
  weights it kept, the share of its steps its time covers (all of them, unless it resumed
  from a checkpoint that kept no time), its wall and CPU time, its CPU time per step and
  scaled to all its steps;
- the work in all, in core-hours, and what it comes to on `--cores` cores if nothing waited;
- the cost of adding one domain against retraining the multitask LoRA
  (`loramix.science.add_domain.add_domain_cost`), in wall and in CPU time.

The wall times of a run whose jobs shared the cores, or that was stopped and resumed, are
not its cost; the CPU times are the steadier measure.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from loramix.science.add_domain import MIN_TIMED_SHARE, add_domain_cost, full_seconds, timed_share
from loramix.science.lora_jobs import multitask_schedule
from loramix.science.multitask_choice import recorded_choice
from loramix.science.pipeline import MULTITASK, TIMINGS_JSON, RetrainPaths, RetrainSettings
from loramix.science.retrain_jobs import RUN_JSON

EVALUATION_STEPS = ("eval-early", "eval")  # their parts are listed in both: count each once


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the run folder (timings.json, run.json)")
    parser.add_argument("--cores", type=int, default=2, help="cores of the machine to plan for")
    args = parser.parse_args()
    print("command:", shlex.join([sys.executable, *sys.argv]))
    try:
        timings = json.loads((args.run / TIMINGS_JSON).read_text())
        run = json.loads((args.run / RUN_JSON).read_text())
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print()
    print(step_table(timings))
    print()
    jobs = training_jobs(timings, run)
    print(job_table(jobs))
    print()
    print(work_summary(timings, jobs, args.cores))
    print()
    print(add_domain_summary(args.run, timings, run))
    return 0


def step_table(timings: dict[str, Any]) -> str:
    lines = ["| step | wall | CPU | notes |", "|---|---:|---:|---|"]
    for name, record in timings.items():
        if not isinstance(record, dict):
            continue
        notes = []
        if record.get("background"):
            notes.append("in the background, beside other steps")
        if "workers" in record:
            notes.append(f"{record['workers']} worker(s) x {record.get('threads')} thread(s)")
        if "reused_from" in record:
            notes.append("linked from an earlier run")
        if "job" in record:
            notes.append("a background job's wait; its own time is under the jobs")
        lines.append(
            f"| {name} | {minutes(record.get('wall_s'))} | {minutes(record.get('cpu_s'))} "
            f"| {'; '.join(notes)} |"
        )
    return "\n".join(lines)


def training_jobs(timings: dict[str, Any], run: dict[str, Any]) -> list[dict[str, Any]]:
    """Every training job's record, with its name, kind and steps in all (None for a gate
    candidate the run no longer lists, unless its record has them)."""
    settings = RetrainSettings(
        domains=tuple(run["domains"]), expert_steps=run["expert_steps"], keep_best=True
    )
    gate_steps = {c["name"]: c["steps"] for c in run.get("gate_candidates", [])}
    found: list[dict[str, Any]] = []

    def add(kind: str, name: str, record: dict[str, Any], steps: int | None) -> None:
        found.append({"kind": kind, "name": name, "steps": steps, **record})

    for name, record in timings.get("experts", {}).get("each", {}).items():
        if name == MULTITASK:  # older runs trained it among the experts
            add(
                "multitask",
                name,
                record,
                record.get("steps", multitask_schedule(name, settings)[0]),
            )
        else:
            add("expert", name, record, record.get("steps", run["expert_steps"]))
    own = timings.get(MULTITASK, {}).get("job")
    if own is not None:
        add(
            "multitask",
            MULTITASK,
            own,
            own.get("steps", multitask_schedule(MULTITASK, settings)[0]),
        )
    for name, record in timings.get("multitask-candidates", {}).get("each", {}).items():
        add("multitask", name, record, record.get("steps", multitask_schedule(name, settings)[0]))
    for name, record in timings.get("gates", {}).get("each", {}).items():
        add("gate", name, record, record.get("steps", gate_steps.get(name)))
    return found


def job_table(jobs: list[dict[str, Any]]) -> str:
    lines = [
        "| job | steps | kept step | time covers | wall | CPU | CPU per step | CPU, all steps |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for job in jobs:
        share = timed_share(job)
        per_step = all_steps_text = "-"
        if "cpu_s" in job and share > 0:
            all_steps = full_seconds(job, "cpu_s")
            all_steps_text = minutes(all_steps)
            if job["steps"]:
                per_step = f"{all_steps / job['steps']:.2f} s"
        lines.append(
            f"| {job_name(job)} | {job['steps'] or '-'} | {job.get('kept_step', '-')} "
            f"| {share:.0%} | {minutes(job.get('wall_s'))} | {minutes(job.get('cpu_s'))} "
            f"| {per_step} | {all_steps_text} |"
        )
    return "\n".join(lines)


def job_name(job: dict[str, Any]) -> str:
    if job["kind"] == "multitask":  # the run's own, or a candidate's folder
        return "multitask LoRA" + ("" if job["name"] == MULTITASK else f" {job['name']}")
    return f"{job['kind']} {job['name']}"


def work_summary(timings: dict[str, Any], jobs: list[dict[str, Any]], cores: int) -> str:
    """The CPU time of all the work: the training jobs scaled to all their steps, and the
    other steps (data, selections, evaluation parts, export) as recorded."""
    training = sum(
        full_seconds(job, "cpu_s") for job in jobs if "cpu_s" in job and timed_share(job) > 0
    )
    parts: dict[str, float] = {}
    for step in EVALUATION_STEPS:
        for name, part in timings.get(step, {}).get("each", {}).items():
            parts[name] = part.get("cpu_s", 0.0)
    evaluation = sum(parts.values())
    trained_steps = {"experts", "gates", MULTITASK, "multitask-candidates", *EVALUATION_STEPS}
    other = sum(
        record.get("cpu_s", 0.0)
        for name, record in timings.items()
        if isinstance(record, dict) and name not in trained_steps
    )
    total = training + evaluation + other
    untimed = [job["name"] for job in jobs if "cpu_s" not in job or timed_share(job) == 0]
    lines = [
        f"CPU time: training jobs {minutes(training)}, evaluation parts {minutes(evaluation)}, "
        f"other steps {minutes(other)}: {total / 3600:.1f} core-hours in all, "
        f"{hours(total / cores)} on {cores} cores with no core waiting.",
    ]
    if untimed:
        lines.append(f"Not counted (no time recorded): {', '.join(untimed)}.")
    return "\n".join(lines)


def add_domain_summary(folder: Path, timings: dict[str, Any], run: dict[str, Any]) -> str:
    settings = RetrainSettings(domains=tuple(run["domains"]))
    chosen = recorded_choice(RetrainPaths(folder))
    try:
        cost = add_domain_cost(timings, settings, chosen)
    except ValueError as error:
        return f"Adding a domain: not measurable from these timings ({error})."
    lines = [f"Adding a domain (one expert and one gate) against retraining `{chosen}`:"]
    for clock, record in (("wall", cost), ("CPU", cost.get("cpu"))):
        if record is None:
            continue
        lines.append(
            f"- {clock}: {minutes(record['add_domain_s'])} (slowest expert "
            f"{minutes(record['expert_s'])}, gate {minutes(record['gate_s'])}) against "
            f"{minutes(record['multitask_retrain_s'])}, {record['ratio']}x"
        )
    lines.append(
        f"  ({cost['experts_timed']} expert(s) timed over at least {MIN_TIMED_SHARE:.0%} of "
        f"their steps)"
    )
    for name, share in cost.get("timed_shares", {}).items():
        if share < 1:
            lines.append(f"  (the {name}'s time covers {share:.0%} of its steps, scaled up)")
    return "\n".join(lines)


def minutes(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def hours(seconds: float) -> str:
    whole = int(seconds // 3600)
    return f"{whole} h {int(seconds % 3600 // 60):02d} min"


if __name__ == "__main__":
    raise SystemExit(main())
