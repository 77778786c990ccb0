"""Tests of loramix.training.jobs: jobs in this process or in spawned workers with threads."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from loramix.training.jobs import BackgroundJob, JobError, run_jobs


def describe(value: int) -> tuple[int, int, int]:
    """What a job sees: its argument squared, its process and its torch threads."""
    return value * value, os.getpid(), torch.get_num_threads()


def import_peft(value: int) -> int:
    import peft  # noqa: F401  (imports torchao and bitsandbytes when they are installed)

    return value


def type_name(kind: type) -> str:
    return kind.__name__


def fail_on(value: int) -> int:
    if value == 2:
        raise ValueError("two is not allowed")
    return value


def test_one_worker_runs_every_job_here_in_order():
    done = list(run_jobs(describe, {"a": (3,), "b": (4,)}, workers=1, threads=1))
    assert [d.name for d in done] == ["a", "b"]
    assert [d.value[0] for d in done] == [9, 16]
    assert {d.value[1] for d in done} == {os.getpid()}
    assert all(d.wall_s >= 0 and d.cpu_s >= 0 for d in done)


def test_workers_are_other_processes_with_the_threads_asked_for():
    jobs = {f"job{i}": (i,) for i in range(3)}
    done = {d.name: d.value for d in run_jobs(describe, jobs, workers=2, threads=1)}
    assert {name: value[0] for name, value in done.items()} == {"job0": 0, "job1": 1, "job2": 4}
    pids = {value[1] for value in done.values()}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    assert {value[2] for value in done.values()} == {1}


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failing_job_is_named_with_its_error(workers):
    with pytest.raises(JobError, match="job 'second' failed: two is not allowed") as caught:
        list(run_jobs(fail_on, {"first": (1,), "second": (2,)}, workers=workers, threads=1))
    assert isinstance(caught.value.__cause__, ValueError)


@pytest.mark.parametrize("field, value", [("workers", 0), ("threads", 1.5)])
def test_bad_counts_are_refused(field, value):
    counts = {"workers": 1, "threads": 1, field: value}
    with pytest.raises(ValueError, match=f"{field}={value!r}: use a whole number >= 1"):
        list(run_jobs(describe, {"a": (1,)}, **counts))


def test_workers_print_no_import_notices_of_optional_backends(capfd):
    jobs = {"a": (1,), "b": (2,)}
    done = {d.name: d.value for d in run_jobs(import_peft, jobs, workers=2, threads=1)}
    assert done == {"a": 1, "b": 2}
    from peft import LoraConfig  # an argument whose unpickling imports peft in the worker

    assert BackgroundJob("c", type_name, (LoraConfig,), threads=1).wait().value == "LoraConfig"
    err = capfd.readouterr().err
    assert "Failed to load" not in err and "register_constant" not in err


@pytest.mark.parametrize("here", [False, True])
def test_a_background_job_runs_beside_this_process(here):
    job = BackgroundJob("square", describe, (5,), threads=1, here=here)
    done = job.wait()
    assert done.name == "square" and done.value[0] == 25 and done.wall_s >= 0
    assert (done.value[1] == os.getpid()) == here
    if not here:
        assert done.value[2] == 1  # the threads asked for
    job.stop()  # nothing left to stop


@pytest.mark.parametrize("here", [False, True])
def test_a_failing_background_job_is_named_with_its_error(here):
    job = BackgroundJob("second", fail_on, (2,), threads=1, here=here)
    with pytest.raises(JobError, match="'second' failed: .*two is not allowed"):
        job.wait()


def test_a_background_job_can_be_stopped():
    job = BackgroundJob("sleeper", time.sleep, (60,), threads=1)
    start = time.perf_counter()
    job.stop()
    assert time.perf_counter() - start < 30
    job.stop()  # twice is fine


def test_a_background_job_ends_when_its_parent_is_killed(tmp_path):
    import signal
    import subprocess
    import sys

    marker = tmp_path / "child.pid"
    code = (
        f"import os, time, sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from loramix.training.jobs import BackgroundJob\n"
        "import test_training_jobs as t\n"
        f"job = BackgroundJob('sleeper', t.write_pid_and_sleep, ({str(marker)!r},), threads=1)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    child = int(marker.read_text())
    parent.send_signal(signal.SIGKILL)  # no clean-up runs in the parent
    parent.wait()
    deadline = time.monotonic() + 20
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(child)


def write_pid_and_sleep(path: str) -> None:
    Path(path).write_text(str(os.getpid()))
    time.sleep(120)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie has ended
        return stat.read().split(")")[-1].split()[0] != "Z"


def test_waiting_twice_gives_the_result_without_running_again():
    job = BackgroundJob("pid", describe, (2,), threads=1, here=True)
    assert job.wait() is job.wait()


@pytest.mark.parametrize("here", [False, True])
def test_finished_says_whether_the_job_has_ended(here):
    job = BackgroundJob("square", describe, (5,), threads=1, here=here)
    if not here:
        deadline = time.perf_counter() + 60
        while not job.finished() and time.perf_counter() < deadline:
            time.sleep(0.05)
    assert job.finished() is not here  # a job run here starts when waited for
    job.wait()
    assert job.finished()


def test_a_running_background_job_is_not_finished():
    job = BackgroundJob("sleeper", time.sleep, (60,), threads=1)
    try:
        assert not job.finished()
    finally:
        job.stop()
