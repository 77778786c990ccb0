"""Independent jobs run side by side in worker processes, each with its own torch threads.

On a small CPU, trainings of a small model run side by side with one thread each finish
sooner than one after the other with all threads each: their matrix products are too small
to keep several threads busy (measured for SmolLM2-135M expert training: BENCHMARKS.md,
"Science retrain").

    for done in run_jobs(train_one, {"biology": ("biology",), "chemistry": ("chemistry",)},
                         workers=2, threads=1):
        print(done.name, done.wall_s)

Workers are started with the "spawn" method (a fresh interpreter, safe with torch's thread
pools), so `function` must be importable by name (a module-level function) and its
arguments picklable. With `workers=1` the jobs run one after the other in this process,
with this process's threads, which is also what tests use.

`workers_cpu_seconds()` adds up the CPU time of every job a worker of `run_jobs` finished in
this process's calls so far, so that a caller can time a step, its workers included
(`loramix.science.retrain_jobs.cpu_seconds`). A `BackgroundJob`'s time is its own result's.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import torch

from loramix.checks import is_int
from loramix.import_noise import quiet_import_noise

_LOG_FORMAT = "%(levelname)s %(processName)s %(name)s: %(message)s"


_workers_cpu_s = 0.0  # CPU seconds of the jobs `run_jobs`'s workers finished, all calls


def workers_cpu_seconds() -> float:
    """CPU seconds spent by `run_jobs`'s worker processes on the jobs they finished (jobs
    run in this process count in its own `time.process_time()` instead)."""
    return _workers_cpu_s


@dataclass(frozen=True)
class JobResult:
    """One finished job: its name, what the function returned, and its own time."""

    name: str
    value: Any
    wall_s: float
    cpu_s: float


class JobError(RuntimeError):
    """A job raised; the message names it. The original error is the `__cause__` (for a
    `BackgroundJob`: its type and message are in this message, its traceback in the log)."""


def run_jobs(
    function: Callable[..., Any],
    jobs: Mapping[str, tuple[Any, ...]],
    *,
    workers: int,
    threads: int,
) -> Iterator[JobResult]:
    """Runs `function(*args)` for every `name: args` of `jobs`; yields each as it finishes.

    Args:
        function: A module-level function (workers import it by name).
        jobs: Job name -> positional arguments (picklable).
        workers: Processes run at once; 1 runs the jobs here, one after the other.
        threads: torch CPU threads of each worker process (ignored when `workers` is 1).

    Yields:
        A `JobResult` per job, in the order they finish.

    Raises:
        JobError: When a job raises, naming it. Jobs not yet started are cancelled; the
            ones already running in other workers are left to finish first (so that what
            they write is complete).
        ValueError: If `workers` or `threads` is below 1.
    """
    for name, value in (("workers", workers), ("threads", threads)):
        if not is_int(value) or value < 1:
            raise ValueError(f"{name}={value!r}: use a whole number >= 1.")
    if workers == 1 or len(jobs) <= 1:
        for name, args in jobs.items():
            yield _run_here(name, function, args)
        return
    context = multiprocessing.get_context("spawn")
    level = logging.getLogger().getEffectiveLevel()
    with ProcessPoolExecutor(
        max_workers=min(workers, len(jobs)),
        mp_context=context,
        initializer=_start_worker,
        initargs=(threads, level),
    ) as pool:
        pending: dict[Future, str] = {
            pool.submit(_timed, function, args): name for name, args in jobs.items()
        }
        try:
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    name = pending.pop(future)
                    try:
                        value, wall_s, cpu_s = future.result()
                    except Exception as error:
                        raise JobError(f"job {name!r} failed: {error}") from error
                    _count_worker_cpu(cpu_s)
                    yield JobResult(name, value, wall_s, cpu_s)
        finally:
            for future in pending:
                future.cancel()


def _count_worker_cpu(seconds: float) -> None:
    global _workers_cpu_s
    _workers_cpu_s += seconds


def _run_here(name: str, function: Callable[..., Any], args: tuple[Any, ...]) -> JobResult:
    try:
        value, wall_s, cpu_s = _timed(function, args)
    except Exception as error:
        raise JobError(f"job {name!r} failed: {error}") from error
    return JobResult(name, value, wall_s, cpu_s)


def _timed(function: Callable[..., Any], args: tuple[Any, ...]) -> tuple[Any, float, float]:
    """`function(*args)`, its wall time and the CPU time of this process meanwhile."""
    start, cpu_start = time.perf_counter(), time.process_time()
    value = function(*args)
    return value, time.perf_counter() - start, time.process_time() - cpu_start


def _start_worker(threads: int, level: int) -> None:
    """Worker set-up: its thread count, and logging like the parent's (spawn starts bare),
    without the optional backends' import notices (`loramix.import_noise`)."""
    torch.set_num_threads(threads)
    quiet_import_noise()
    logging.basicConfig(level=level, format=_LOG_FORMAT)


class BackgroundJob:
    """One job that runs beside the caller's work: in its own worker process, started at
    once with `threads` torch threads, or (`here=True`) in this process when `wait` is called.

        multitask = BackgroundJob("multitask", train_one, ("multitask",), threads=1)
        ...  # other work, in this process
        done = multitask.wait()  # a JobResult
        multitask.stop()  # after an error elsewhere: ends the worker (no-op once waited)
    """

    def __init__(
        self,
        name: str,
        function: Callable[..., Any],
        args: tuple[Any, ...],
        *,
        threads: int,
        here: bool = False,
    ) -> None:
        if not is_int(threads) or threads < 1:
            raise ValueError(f"threads={threads!r}: use a whole number >= 1.")
        self.name, self.function, self.args, self.here = name, function, args, here
        self._process = self._connection = None
        self._result: JobResult | None = None
        if not here:
            context = multiprocessing.get_context("spawn")
            self._connection, child = context.Pipe(duplex=False)
            level = logging.getLogger().getEffectiveLevel()
            self._process = context.Process(
                target=_background_main,
                # pickled here, unpickled after the worker's set-up: unpickling imports the
                # function's module, whose imports may log what the set-up filters out
                args=(child, pickle.dumps((function, args)), threads, level),
                name=f"BackgroundJob-{name}",
            )
            self._process.start()
            child.close()

    def wait(self) -> JobResult:
        """The job's result, once it has finished.

        Raises:
            JobError: If the job raised (or its worker died), naming it.
        """
        if self._result is not None:
            return self._result
        if self._process is None:
            self._result = _run_here(self.name, self.function, self.args)
            return self._result
        try:
            kind, payload = self._connection.recv()
        except EOFError:
            kind, payload = "error", f"its worker process ended ({self._process.exitcode})"
        self._process.join()
        self._process = None
        if kind == "error":
            raise JobError(f"job {self.name!r} failed: {payload} (its traceback is in the log)")
        self._result = JobResult(self.name, *payload)
        return self._result

    def finished(self) -> bool:
        """Whether the job has ended (so `wait` returns at once); a job that runs here has
        not, until it is waited for."""
        if self._result is not None:
            return True
        return (
            self._connection is not None and self._process is not None and self._connection.poll()
        )

    def stop(self) -> None:
        """End the worker if it is still running (what it wrote last is what it kept)."""
        if self._process is not None:
            self._process.terminate()
            self._process.join()
            self._process = None


def _background_main(connection: Any, job: bytes, threads: int, level: int) -> None:
    _start_worker(threads, level)
    _end_with_parent()
    try:
        function, args = pickle.loads(job)
        connection.send(("done", _timed(function, args)))
    except BaseException as error:  # also Ctrl-C: the parent raises a JobError naming the job
        logging.getLogger(__name__).exception("background job failed")
        connection.send(("error", f"{type(error).__name__}: {error}"))
    finally:
        connection.close()


def _end_with_parent() -> None:
    """End this worker when its parent process ends, however it ends (a parent killed
    outright runs no clean-up that would stop it), so no orphan keeps training."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="end-with-parent", daemon=True).start()
