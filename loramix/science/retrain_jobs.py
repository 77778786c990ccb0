"""The plumbing of a retrain run folder: how many processes and threads each step gets,
the multitask LoRA's background worker, what each job's time leaves in `timings.json` (kept
as jobs finish, so that a resumed run still knows them), and the run's settings record
(`run.json`), which a resumed call must match.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loramix.atomic import write_text_atomic
from loramix.training.trainer import CHECKPOINTS, checkpoint_step, last_checkpoint

if TYPE_CHECKING:
    from loramix.science.pipeline import RetrainPaths, RetrainSettings
    from loramix.training.clock import JobClock
    from loramix.training.jobs import BackgroundJob, JobResult

logger = logging.getLogger(__name__)

TIMINGS_JSON = "timings.json"
RUN_JSON = "run.json"  # the seed and settings of a run folder
REUSED_JSON = "reused.json"  # what a run took from another (`loramix.science.reuse`)
DEV_SCORES_JSON = "dev_scores.json"  # candidate -> its gate files' digest and dev NLLs
JOB_TIME_JSON = "job_time.json"  # a finished job's timings record, beside its adapter or gate
RUN_ID = "run_id"  # a run folder's own id: it moves with the folder, and --reuse links none


def run_id(out: Path) -> str:
    """The id of the run folder `out`, made on first use (`retrain` makes it before any job):
    it tells the jobs trained in this run from those linked from another (`--reuse`)."""
    path = out / RUN_ID
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        made = uuid.uuid4().hex
        write_text_atomic(path, made + "\n")
        return made


def worker_plan(settings: RetrainSettings, n_jobs: int, busy: int = 0) -> tuple[int, int]:
    """(processes run at once, torch threads of each) for `n_jobs` jobs of a step, while
    `busy` workers run a background job. With one process left, jobs run in this one."""
    total = max(1, settings.workers or os.cpu_count() or 1)
    threads = max(1, (settings.threads or os.cpu_count() or 1) // total)
    return max(1, min(total - busy, n_jobs)), threads


def start_multitask(
    train: Callable[..., Any],
    args: tuple[Any, ...],
    settings: RetrainSettings,
    *,
    alone: bool,
    name: str = "multitask",
    threads: int | None = None,
) -> BackgroundJob:
    """Start `train(*args)`, the multitask LoRA `name` (the run's own, or a candidate's
    folder), in its own worker with `threads` torch threads (default: a worker's share,
    `worker_plan`). With one worker, or `alone` (nothing else left to train or select), it
    runs in this process, with all its threads, when it is waited for instead."""
    from loramix.training.jobs import BackgroundJob

    workers, share = worker_plan(settings, 2)
    threads = threads or share
    here = alone or workers < 2
    if not here:
        logger.info("%s: training in the background with %d thread(s)", name, threads)
    return BackgroundJob(name, train, args, threads=threads, here=here)


def finish_multitask(job: BackgroundJob) -> dict[str, Any]:
    """Wait for the multitask LoRA; its own time (it started with the experts) is "job", and
    the step's CPU time is the job's (the wait itself takes next to none)."""
    done = job.wait()
    logger.info("multitask LoRA: done in %.1f s", done.wall_s)
    return _multitask_record(done)


def _multitask_record(done: JobResult) -> dict[str, Any]:
    """The multitask step's record: the background job's own times ("job")."""
    record = job_record(done)
    return {"cpu_s": record["cpu_s"], "job": record}


def finish_candidates(
    out: Path, step: str, jobs: dict[str, BackgroundJob], earlier: dict[str, Any]
) -> dict[str, Any]:
    """Wait for the multitask candidates training in the background (folder -> job), keeping
    each one's times in `out`'s timings.json under `step` as it ends; returns the step's
    record as `train_loras` gives it: the CPU time of all of them (their jobs'), and each
    one's own times (with those of `earlier`, the step's record from a call that trained
    some of them)."""
    each = dict(earlier.get("each", {}))
    for name, job in jobs.items():
        done = job.wait()
        logger.info("%s: done in %.1f s", name, done.wall_s)
        each[name] = job_record(done)
        keep_partial_timings(out, step, {"each": each})  # kept if a later one fails
    cpu_s = round(sum(each[name]["cpu_s"] for name in jobs), 1)
    return {"cpu_s": cpu_s, "background": True, "each": each}


def keep_finished_jobs(
    out: Path,
    multitask: dict[str, BackgroundJob],
    candidates: dict[str, BackgroundJob],
    candidates_step: str,
    earlier: dict[str, Any],
) -> None:
    """After a step failed, keep in `out`'s timings.json the times of the background jobs
    that finished (a job that failed, or still runs, keeps nothing): `multitask` (its step's
    name -> job, or empty) as `finish_multitask` records it, and `candidates` (folder -> job)
    under `candidates_step` as `finish_candidates` does, with the times of `earlier`."""
    from loramix.training.jobs import JobError

    def result(job: BackgroundJob) -> JobResult | None:
        if job.here or not job.finished():
            return None
        try:
            return job.wait()
        except JobError:
            return None

    for step, job in multitask.items():
        done = result(job)
        if done is not None:
            keep_partial_timings(out, step, _multitask_record(done))
    finished = {name: result(job) for name, job in candidates.items()}
    each = {name: job_record(done) for name, done in finished.items() if done is not None}
    if each:
        keep_partial_timings(out, candidates_step, {"each": {**earlier.get("each", {}), **each}})


def share_threads(settings: RetrainSettings, n_jobs: int) -> int:
    """torch threads of each of `n_jobs` jobs that share every CPU (`settings.threads`, or
    all cores) between them."""
    return max(1, (settings.threads or os.cpu_count() or 1) // max(1, n_jobs))


def cpu_seconds() -> float:
    """CPU seconds of this process and of the jobs its `run_jobs` workers finished: the
    difference across a step is its CPU time, workers included (their jobs' own time: a
    worker's start-up, a few seconds of imports, is not counted; nor is the multitask LoRA's
    background worker, whose step takes its job's own time)."""
    from loramix.training.jobs import workers_cpu_seconds

    return time.process_time() + workers_cpu_seconds()


def job_record(done: JobResult) -> dict[str, Any]:
    """A training job's entry in timings.json: its own wall and CPU time over all the calls
    that trained it, the step whose weights it kept (its best on dev, or its last), and, when
    it resumed from a checkpoint, the step it resumed from, its steps in all and the step from
    which its time was kept (0: all of them; later when it resumed from a checkpoint that
    kept no time, from a run before clocks were kept)."""
    value = done.value if isinstance(done.value, dict) else {}
    earlier = value.get("earlier", {})
    record: dict[str, Any] = {
        "wall_s": round(done.wall_s + earlier.get("wall_s", 0.0), 2),
        "cpu_s": round(done.cpu_s + earlier.get("cpu_s", 0.0), 1),
    }
    if value.get("kept_step") is not None:
        record["kept_step"] = value["kept_step"]
    resumed_from = value.get("resumed_from_step")
    if resumed_from:
        record["steps"] = value["steps"]
        record["resumed_from_step"] = resumed_from
        record["timed_from_step"] = earlier.get("timed_from_step", resumed_from)
    return record


def resume_clock(out: Path) -> JobClock:
    """A clock for a training into `out`, holding the time of the calls before this one (kept
    in the checkpoint it resumes from: `loramix.training.clock`)."""
    from loramix.training.clock import JobClock

    return JobClock.resuming(last_checkpoint(out / CHECKPOINTS))


def earlier_time(clock: JobClock) -> dict[str, Any]:
    """The part of a job's return value that carries its earlier calls' time to `job_record`
    (the job's own timing, in `run_jobs`, covers only this call)."""
    return {"earlier": dataclasses.asdict(clock.earlier)}


def resumed_step(out: Path) -> int:
    """The step a training into `out` resumes from: its last checkpoint's, or 0."""
    checkpoint = last_checkpoint(out / CHECKPOINTS)
    return checkpoint_step(checkpoint) if checkpoint is not None else 0


def finished_job(out: Path, clock: JobClock, value: dict[str, Any]) -> dict[str, Any]:
    """The return value `value` (with `earlier_time`) of a job whose adapter (or gate) in `out`
    is complete. Its timings record (`job_record`, this call's time from `clock`) is first
    kept in `out/job_time.json`, then its checkpoints are deleted: a call killed before it
    kept the record in timings.json leaves it there for the next call (`recover_job_times`),
    which finds the job done and would have no time for it.
    `out` is a job folder of a run folder (`RUN/experts/NAME`, `RUN/gates/NAME`), whose id
    and path the file keeps too."""
    from loramix.training.jobs import JobResult

    total = clock.total()
    this_call = JobResult(
        out.name, value, total.wall_s - clock.earlier.wall_s, total.cpu_s - clock.earlier.cpu_s
    )
    run = out.parents[1]
    kept = {"run_id": run_id(run), "run": str(run.resolve()), "record": job_record(this_call)}
    write_text_atomic(out / JOB_TIME_JSON, json.dumps(kept, indent=2) + "\n")
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)  # the job is complete
    return value


def recover_job_times(
    out: Path,
    recorded: dict[str, Any],
    groups: dict[str, list[Path]],
    multitask: Path | None = None,
) -> list[str]:
    """Put into `recorded` (`out`'s timings.json, kept there too) the records that finished
    jobs left in their folders (`finished_job`) and that it lacks: those of `groups` (step ->
    job folders, each kept under its step's "each" by folder name) and of the run's own
    multitask LoRA in `multitask` (its step's "job"). Returns the steps/jobs recovered."""
    here = run_id(out)

    def kept_record(folder: Path) -> dict[str, Any] | None:
        kept = read_json(folder / JOB_TIME_JSON)
        record = kept.get("record")
        if not isinstance(record, dict) or "cpu_s" not in record:
            return None
        if kept.get("run_id") != here:  # linked from another run (`--reuse`), timed there
            record = {"reused_from": kept.get("run"), **record}
        return record

    recovered = []
    for step, folders in groups.items():
        each = recorded.get(step, {}).get("each", {})
        found = {f.name: kept_record(f) for f in folders if f.name not in each}
        found = {name: record for name, record in found.items() if record is not None}
        if found:
            recorded[step] = {**recorded.get(step, {}), "each": {**each, **found}}
            recovered += [f"{step}/{name}" for name in found]
    if multitask is not None and multitask.name not in recorded:
        record = kept_record(multitask)
        if record is not None:
            recorded[multitask.name] = {"cpu_s": record["cpu_s"], "job": record}
            recovered.append(multitask.name)
    if recovered:
        logger.info("times of finished jobs kept in their folders: %s", ", ".join(recovered))
        write_text_atomic(out / TIMINGS_JSON, json.dumps(recorded, indent=2) + "\n")
    return recovered


def keep_partial_timings(out: Path, step: str, record: dict[str, Any]) -> None:
    """Keep what a step has timed so far in `timings.json`, for a call that resumes it."""
    timings = read_json(out / TIMINGS_JSON)
    timings[step] = record
    write_text_atomic(out / TIMINGS_JSON, json.dumps(timings, indent=2) + "\n")


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or {} if it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def run_record(seed: int, settings: RetrainSettings) -> dict[str, Any]:
    """The seed and settings as `run.json` holds them (tuples as lists, candidates as
    dicts), without the speed-only settings a run may resume with others of."""
    current = {"seed": seed, **dataclasses.asdict(settings)}
    for speed_only in ("threads", "workers"):
        current.pop(speed_only)
    return json.loads(json.dumps(current))


LATER_SETTINGS = {"keep_best": False, "multitask_candidates": []}
"""`RetrainSettings` fields added after runs were recorded, with the value those runs had:
a `run.json` without them is read with them (`recorded_run`), so that those runs still
resume and can be reused."""


def recorded_run(path: Path) -> dict[str, Any]:
    """A run's `run.json` (empty if missing), with `LATER_SETTINGS` where it lacks them."""
    recorded = read_json(path)
    return {**LATER_SETTINGS, **recorded} if recorded else recorded


def check_run_settings(
    out: Path, seed: int, settings: RetrainSettings, ignore: tuple[str, ...] = ()
) -> None:
    """Record the seed and settings of the run in `out`, or check them against the record.

    Gate candidates may be added or dropped between calls on the same folder (each is trained
    into its own `gates/NAME` and the selection compares those of the call); the record then
    takes the call's list. A candidate kept under its name must keep its settings. Multitask
    candidates (`multitask_candidates`, names that spell their settings) may be added or
    dropped the same way.

    Raises:
        ValueError: If `out` holds a run made with another seed or other settings (which
            the skipped steps would silently mix in), naming the differences.
    """
    current = run_record(seed, settings)
    path = out / RUN_JSON
    if not path.is_file():
        write_text_atomic(path, json.dumps(current, indent=2) + "\n")
        return
    recorded = recorded_run(path)
    if isinstance(recorded.get("gate_candidates"), list):
        from loramix.science.selection import recorded_candidate

        recorded["gate_candidates"] = [recorded_candidate(c) for c in recorded["gate_candidates"]]
    changed = sorted(
        k
        for k in current.keys() | recorded.keys()
        if k not in ignore and k not in CHANGEABLE and current.get(k) != recorded.get(k)
    )
    details = [f"{k}: {recorded.get(k)!r} -> {current.get(k)!r}" for k in changed]
    if "gate_candidates" not in ignore:
        details += _changed_candidates(recorded.get("gate_candidates"), current["gate_candidates"])
    if details:
        raise ValueError(
            f"{out} holds a run made with other settings ({', '.join(details)}); its finished "
            "steps would be reused. Pass another output folder (--out), optionally starting "
            f"from this run's finished steps that the new settings leave valid (--out NEW "
            f"--reuse {out}), or delete this one to start over."
        )
    now = {k: current[k] for k in CHANGEABLE if k not in ignore and recorded.get(k) != current[k]}
    if now:
        shown = {k: [c["name"] for c in v] if k == "gate_candidates" else v for k, v in now.items()}
        logger.info("%s: now %s", out, "; ".join(f"{k} {v}" for k, v in shown.items()))
        write_text_atomic(path, json.dumps({**recorded, **now}, indent=2) + "\n")


CHANGEABLE = ("gate_candidates", "multitask_candidates")
"""Settings a later call on the same run folder may change: candidates to choose among, each
trained into a folder of its own."""


def _changed_candidates(recorded: Any, current: list[dict[str, Any]]) -> list[str]:
    """The differences between two candidate lists that a run cannot take: a kept name with
    other settings (or an unreadable record)."""
    if not isinstance(recorded, list) or not all(isinstance(c, dict) for c in recorded):
        return [f"gate_candidates: {recorded!r} -> {current!r}"]
    before = {c.get("name"): c for c in recorded}
    return [
        f"gate candidate {c['name']}: {before[c['name']]!r} -> {c!r}"
        for c in current
        if c["name"] in before and before[c["name"]] != c
    ]


def provenance(
    paths: RetrainPaths,
    seed: int,
    settings: RetrainSettings,
    timings: dict[str, float],
    bundle_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """The bundle's `retrain.json`: the command that made it, seed, settings, data sizes and
    versions, timings, and what the run reused from others."""
    manifest = read_json(paths.data / "manifest.json")
    reused = read_json(paths.out / REUSED_JSON)
    return {
        "command": retrain_command(paths, seed, settings, bundle_dir),
        "seed": seed,
        "settings": dataclasses.asdict(settings),
        "data": {
            key: manifest.get(key)
            for key in ("n_train", "n_test", "n_dev", "n_composite", "versions")
        },
        "timings": timings,
        **({"reused": reused} if reused else {}),
    }


def retrain_command(
    paths: RetrainPaths,
    seed: int,
    settings: RetrainSettings,
    bundle_dir: str | os.PathLike[str] | None = None,
) -> str | None:
    """The `loramix science retrain` command line that makes this run again (run from the
    same working directory): its folder, seed, reused runs, export folder when not the
    default, and a flag for every setting that is not its default (speed-only settings left
    out). None when the settings came from Python and no flags give them (a gate candidate
    whose name spells other settings than its own, beyond the steps that `--gate-steps`
    gives all of them, or None where a flag needs a value).
    """
    from loramix.commands.flags import field_flags
    from loramix.science.pipeline import RUN_BUNDLE
    from loramix.science.selection import DEFAULT_CANDIDATES, candidate_from_name

    words = ["loramix", "science", "retrain", "--out", _shown(paths.out), "--seed", str(seed)]
    reused = read_json(paths.out / REUSED_JSON)
    if reused:
        words += ["--reuse", *(_shown(r["from"]) for r in [reused, *reused.get("also", [])])]
    if bundle_dir is not None and Path(bundle_dir).resolve() != (paths.out / RUN_BUNDLE).resolve():
        words += ["--bundle", _shown(bundle_dir)]
    candidates = tuple(settings.gate_candidates)
    known = {c.name: c for c in DEFAULT_CANDIDATES}
    named = [known.get(c.name) or candidate_from_name(c.name) for c in candidates]
    if [c.name for c in candidates] != list(known):
        words += ["--gate-candidates", *(c.name for c in candidates)]
    if any(c != spelled for c, spelled in zip(candidates, named, strict=True)):
        steps = {c.steps for c in candidates}  # `--gate-steps N` sets every candidate's steps
        if len(steps) != 1 or any(
            spelled is None or c != dataclasses.replace(spelled, steps=c.steps)
            for c, spelled in zip(candidates, named, strict=True)
        ):
            return None
        words += ["--gate-steps", str(steps.pop())]
    try:
        words += field_flags(settings, skip=("gate_candidates", "threads", "workers"))
    except ValueError:
        return None
    return shlex.join(words)


def _shown(path: str | os.PathLike[str]) -> str:
    """`path` relative to the working directory when it lies under it, else as given."""
    try:
        return Path(path).resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return Path(path).as_posix()
