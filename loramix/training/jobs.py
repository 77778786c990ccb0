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
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import torch

from loramix.checks import is_int
from loramix.import_noise import quiet_import_noise

_LOG_FORMAT = "%(levelname)s %(processName)s %(name)s: %(message)s"


@dataclass(frozen=True)
class JobResult:
    """One finished job: its name, what the function returned, and its own time."""

    name: str
    value: Any
    wall_s: float
    cpu_s: float


class JobError(RuntimeError):
    """A job raised; the message names it, the original error is the `__cause__`."""


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
                    yield JobResult(name, value, wall_s, cpu_s)
        finally:
            for future in pending:
                future.cancel()


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
