"""Tests of loramix.science.retrain_jobs: a run folder's settings record (`run.json`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import shlex
import time
from pathlib import Path

import pytest

from loramix.cli import build_parser
from loramix.commands.science import settings_from_args
from loramix.science.bundle import MAKE_RETRAIN, bundle_readme
from loramix.science.pipeline import (
    MULTITASK,
    MULTITASK_CANDIDATES,
    TIMINGS_JSON,
    RetrainPaths,
    RetrainSettings,
)
from loramix.science.retrain_jobs import (
    REUSED_JSON,
    RUN_JSON,
    check_run_settings,
    cpu_seconds,
    job_record,
    keep_finished_jobs,
    retrain_command,
)
from loramix.science.selection import GateCandidate, candidate_from_name
from loramix.training.jobs import JobError, JobResult, run_jobs

A, B, C = GateCandidate("a", steps=2), GateCandidate("b", steps=3), GateCandidate("c", steps=4)


def recorded_names(out) -> list[str]:
    return [c["name"] for c in json.loads((out / RUN_JSON).read_text())["gate_candidates"]]


def test_a_later_call_may_add_and_drop_gate_candidates(tmp_path):
    settings = RetrainSettings(gate_candidates=(A, B))
    check_run_settings(tmp_path, 0, settings)
    check_run_settings(tmp_path, 0, dataclasses.replace(settings, gate_candidates=(B, C)))
    assert recorded_names(tmp_path) == ["b", "c"]
    ignored = dataclasses.replace(settings, gate_candidates=(A,))
    check_run_settings(tmp_path, 0, ignored, ignore=("gate_candidates",))  # add-domain's check
    assert recorded_names(tmp_path) == ["b", "c"]  # left as it was


def test_a_kept_candidate_must_keep_its_settings(tmp_path):
    settings = RetrainSettings(gate_candidates=(A, B))
    check_run_settings(tmp_path, 0, settings)
    longer = dataclasses.replace(B, steps=30)
    with pytest.raises(ValueError, match=r"gate candidate b: .*'steps': 3.* -> .*'steps': 30"):
        check_run_settings(tmp_path, 0, dataclasses.replace(settings, gate_candidates=(A, longer)))
    steps = settings.expert_steps
    with pytest.raises(ValueError, match=f"expert_steps: {steps} -> {2 * steps}"):
        check_run_settings(tmp_path, 0, dataclasses.replace(settings, expert_steps=2 * steps))
    assert recorded_names(tmp_path) == ["a", "b"]  # a refused call changes nothing


def test_a_run_recorded_before_keep_best_existed_reads_as_without_it(tmp_path):
    old = dataclasses.replace(RetrainSettings(gate_candidates=(A,)), keep_best=False)
    check_run_settings(tmp_path, 0, old)
    record = json.loads((tmp_path / RUN_JSON).read_text())
    del record["keep_best"]  # as an older loramix wrote it
    (tmp_path / RUN_JSON).write_text(json.dumps(record))
    check_run_settings(tmp_path, 0, old)  # resumes
    with pytest.raises(ValueError, match="keep_best: False -> True"):
        check_run_settings(tmp_path, 0, dataclasses.replace(old, keep_best=True))


# ------------------------------------------------------------------ the recorded command


def rebuilt(command: str) -> tuple[argparse.Namespace, RetrainSettings]:
    """The parsed flags and settings of a recorded `loramix science retrain` command."""
    words = shlex.split(command)
    assert words[:1] == ["loramix"]
    args = build_parser().parse_args(words[1:])
    return args, settings_from_args(args)


def test_the_recorded_command_rebuilds_the_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    paths = RetrainPaths(tmp_path / "runs" / "mine")
    paths.out.mkdir(parents=True)
    make = RetrainSettings(multitask_candidates=("s4000",))  # what `make retrain` runs
    assert retrain_command(paths, 0, make) == MAKE_RETRAIN.replace("runs/retrain", "runs/mine")
    settings = RetrainSettings(
        domains=("biology", "chemistry"),
        expert_steps=300,
        keep_best=False,
        multitask_candidates=("s4000",),
        gate_candidates=(candidate_from_name("lr3e-3-s1200"), RetrainSettings().gate_candidates[1]),
        eval_limit=40,
        workers=1,  # speed only: not part of the command
    )
    sources = [{"from": str(tmp_path / "runs" / "old")}, {"from": "/elsewhere/run"}]
    (paths.out / REUSED_JSON).write_text(json.dumps({**sources[0], "also": sources[1:]}))
    command = retrain_command(paths, 7, settings, bundle_dir=tmp_path / "models" / "x")
    args, again = rebuilt(command)
    assert again == dataclasses.replace(settings, workers=None)
    assert (args.out, args.seed, args.bundle) == ("runs/mine", 7, "models/x")
    assert args.reuse == ["runs/old", "/elsewhere/run"]  # relative where it can be
    assert "--workers" not in command and "--threads" not in command


def test_gate_steps_given_to_every_candidate_are_one_flag(tmp_path):
    paths = RetrainPaths(tmp_path)
    shorter = tuple(dataclasses.replace(c, steps=50) for c in RetrainSettings().gate_candidates)
    settings = RetrainSettings(gate_candidates=shorter)
    command = retrain_command(paths, 0, settings)
    assert "--gate-steps 50" in command and "--gate-candidates" not in command
    assert rebuilt(command)[1] == settings
    spelled = (dataclasses.replace(candidate_from_name("lr3e-3-s1200"), steps=50),)
    command = retrain_command(paths, 0, RetrainSettings(gate_candidates=spelled))
    assert rebuilt(command)[1].gate_candidates == spelled


def test_settings_no_flag_gives_record_no_command(tmp_path):
    paths = RetrainPaths(tmp_path)
    renamed = RetrainSettings(gate_candidates=(A,))  # "a" does not spell steps=2
    assert retrain_command(paths, 0, renamed) is None
    one, other = candidate_from_name("lr3e-3-s1200"), RetrainSettings().gate_candidates[1]
    uneven = (dataclasses.replace(one, steps=50), dataclasses.replace(other, steps=60))
    assert retrain_command(paths, 0, RetrainSettings(gate_candidates=uneven)) is None
    tuned = dataclasses.replace(one, lr=1e-2)  # its name spells 3e-3
    assert retrain_command(paths, 0, RetrainSettings(gate_candidates=(tuned,))) is None
    readme = bundle_readme({"command": None, "settings": {}}, "models/x")
    assert "made through the Python API" in readme


def test_make_retrain_runs_the_command_its_bundles_name():
    makefile = (Path(__file__).parent.parent / "Makefile").read_text()
    assert f"-m loramix.cli {MAKE_RETRAIN.removeprefix('loramix ')}\n" in makefile
    readme = bundle_readme({"command": MAKE_RETRAIN, "settings": {}}, "models/x")
    assert f"`make retrain`:\n\n    {MAKE_RETRAIN}\n" in readme


# ------------------------------------------------------------------ CPU time of a step


WORK = range(20_000_000)  # sum() of it: about a second of CPU, in a child that imports little


def test_a_steps_cpu_time_counts_its_workers_and_nothing_else():
    longer = range(3 * len(WORK))  # three jobs' worth: counted, it would show
    background = multiprocessing.get_context("spawn").Process(target=sum, args=(longer,))
    background.start()  # as the multitask LoRA's worker: its own result holds its time
    background.join()
    before, own_before = cpu_seconds(), time.process_time()
    done = list(run_jobs(sum, {"a": (WORK,), "b": (WORK,)}, workers=2, threads=1))
    workers = sum(job.cpu_s for job in done)
    assert min(job.cpu_s for job in done) > 0.1
    measured = cpu_seconds() - before
    assert measured == pytest.approx(workers + time.process_time() - own_before, abs=0.05)
    assert measured < 1.5 * workers  # not the background worker's time (reaped meanwhile)


class FakeJob:
    """A background job as `keep_finished_jobs` sees it: finished or not, failed or not."""

    here = False

    def __init__(self, name: str, finished: bool = True, fails: bool = False) -> None:
        self.name, self.done, self.fails = name, finished, fails

    def finished(self) -> bool:
        return self.done

    def wait(self) -> JobResult:
        if self.fails:
            raise JobError(f"job {self.name!r} failed")
        return JobResult(self.name, {"kept_step": 3}, 10.0, 8.0)


def test_a_failed_step_keeps_the_times_of_the_multitask_loras_that_finished(tmp_path):
    (tmp_path / TIMINGS_JSON).write_text(json.dumps({"experts": {"wall_s": 1.0}}))
    earlier = {"each": {"multitask-s0": {"wall_s": 5.0, "cpu_s": 4.0}}}  # an earlier call's
    candidates = {
        "multitask-s1": FakeJob("multitask-s1"),
        "multitask-s2": FakeJob("multitask-s2", fails=True),  # keeps nothing
        "multitask-s3": FakeJob("multitask-s3", finished=False),  # still training: stopped
    }
    keep_finished_jobs(
        tmp_path, {MULTITASK: FakeJob(MULTITASK)}, candidates, MULTITASK_CANDIDATES, earlier
    )
    timings = json.loads((tmp_path / TIMINGS_JSON).read_text())
    job = {"wall_s": 10.0, "cpu_s": 8.0, "kept_step": 3}
    assert timings[MULTITASK] == {"cpu_s": 8.0, "job": job}
    assert timings[MULTITASK_CANDIDATES] == {
        "each": {"multitask-s0": earlier["each"]["multitask-s0"], "multitask-s1": job}
    }
    assert timings["experts"] == {"wall_s": 1.0}  # the other steps' times untouched

    (tmp_path / TIMINGS_JSON).write_text("{}")
    still_training = {"multitask-s3": FakeJob("multitask-s3", False)}
    keep_finished_jobs(tmp_path, {}, still_training, MULTITASK_CANDIDATES, {})
    assert json.loads((tmp_path / TIMINGS_JSON).read_text()) == {}  # nothing finished


def test_a_jobs_record_adds_the_time_of_the_calls_before_its_last():
    fresh = JobResult("biology", {"steps": 9, "resumed_from_step": 0, "kept_step": 9}, 5.0, 4.0)
    assert job_record(fresh) == {"wall_s": 5.0, "cpu_s": 4.0, "kept_step": 9}
    earlier = {"wall_s": 30.0, "cpu_s": 20.0, "timed_from_step": 0}
    value = {"steps": 9, "resumed_from_step": 6, "kept_step": 9, "earlier": earlier}
    record = job_record(JobResult("biology", value, 5.0, 4.0))
    assert (record["wall_s"], record["cpu_s"], record["timed_from_step"]) == (35.0, 24.0, 0)
    assert (record["steps"], record["resumed_from_step"]) == (9, 6)
    earlier["timed_from_step"] = 3  # its first call was timed by no checkpoint
    assert job_record(JobResult("biology", value, 5.0, 4.0))["timed_from_step"] == 3
    del value["earlier"]  # a job that kept no clock: timed from where it resumed
    assert job_record(JobResult("biology", value, 5.0, 4.0))["timed_from_step"] == 6


def test_a_finished_job_keeps_its_record_beside_its_adapter(tmp_path):
    from loramix.science.retrain_jobs import JOB_TIME_JSON, earlier_time, finished_job, run_id
    from loramix.training.clock import JobClock, JobTime

    folder = tmp_path / "run" / "experts" / "biology"
    folder.mkdir(parents=True)
    clock = JobClock(JobTime(wall_s=100.0, cpu_s=60.0))  # two earlier calls' time
    value = {"steps": 10, "resumed_from_step": 4, "kept_step": 10, **earlier_time(clock)}
    assert finished_job(folder, clock, value) is value
    kept = json.loads((folder / JOB_TIME_JSON).read_text())
    assert kept["run"] == str((tmp_path / "run").resolve())
    assert kept["run_id"] == run_id(tmp_path / "run")  # made on first use, then the same
    record = kept["record"]
    assert record["wall_s"] >= 100.0 and record["cpu_s"] >= 60.0  # earlier calls + this one
    assert record["steps"] == 10 and record["resumed_from_step"] == 4
    assert record["timed_from_step"] == 0 and record["kept_step"] == 10


def test_finished_jobs_missing_from_timings_are_recovered_from_their_folders(tmp_path):
    from loramix.science.retrain_jobs import JOB_TIME_JSON, recover_job_times, run_id

    out = tmp_path / "run"
    paths = RetrainPaths(out)
    out.mkdir()

    def finished(folder: Path, run: Path, cpu_s: float) -> Path:
        folder.mkdir(parents=True)
        record = {"wall_s": 2 * cpu_s, "cpu_s": cpu_s}
        kept = {"run_id": run_id(run), "run": str(run.resolve()), "record": record}
        (folder / JOB_TIME_JSON).write_text(json.dumps(kept))
        return folder

    biology = finished(paths.expert("biology"), out, 5.0)
    proteins = finished(paths.expert("proteins"), out, 7.0)
    (tmp_path / "other-run").mkdir()
    s4000 = finished(paths.expert("multitask-s4000"), tmp_path / "other-run", 9.0)  # linked
    multitask = finished(paths.multitask, out, 11.0)
    gate = paths.gate("a")
    gate.mkdir(parents=True)  # no record of its own: stays missing
    recorded = {"experts": {"wall_s": 1.0, "each": {"proteins": {"wall_s": 3, "cpu_s": 3}}}}
    groups = {"experts": [biology, proteins], MULTITASK_CANDIDATES: [s4000], "gates": [gate]}

    recovered = recover_job_times(out, recorded, groups, multitask)
    assert recovered == ["experts/biology", f"{MULTITASK_CANDIDATES}/multitask-s4000", MULTITASK]
    assert recorded["experts"]["wall_s"] == 1.0  # the step's own record is kept
    assert recorded["experts"]["each"]["biology"] == {"wall_s": 10.0, "cpu_s": 5.0}
    assert recorded["experts"]["each"]["proteins"]["cpu_s"] == 3  # timings.json wins
    s4000_record = recorded[MULTITASK_CANDIDATES]["each"]["multitask-s4000"]
    assert s4000_record["reused_from"] == str((tmp_path / "other-run").resolve())
    assert recorded[MULTITASK] == {"cpu_s": 11.0, "job": {"wall_s": 22.0, "cpu_s": 11.0}}
    assert "gates" not in recorded
    assert json.loads((out / TIMINGS_JSON).read_text()) == recorded
    assert recover_job_times(out, recorded, groups, multitask) == []  # nothing more
    moved = tmp_path / "moved"
    out.rename(moved)  # a run folder that moved keeps its id: its jobs are still its own
    del recorded["experts"]["each"]["biology"]
    assert recover_job_times(moved, recorded, {"experts": [moved / "experts" / "biology"]})
    assert "reused_from" not in recorded["experts"]["each"]["biology"]
