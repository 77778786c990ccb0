"""Retrain the science case study from scratch: data, experts, baseline, gate, evaluation.

`retrain(out_dir, seed)` runs every step with fixed seeds. Each step skips itself when its
output already exists, so an interrupted retrain resumes where it stopped (a half-trained
expert or gate continues from its last checkpoint), and each step's time is logged and kept
in `OUT/timings.json`:

    data     OUT/data/{domain}_{train,dev,test}.jsonl, composite_{dev,test}.jsonl,
             mixed_{dev,test}.jsonl
    experts  OUT/experts/<domain>/           one rank-r LoRA per domain (`train_expert`),
                                             side by side in worker processes
    gates    OUT/gates/<candidate>/          one gate per `GateCandidate` over the frozen
                                             experts (`train_gate`)
    select   OUT/selection.json, OUT/xlora/  the candidate with the lowest mean dev NLL
                                             (`loramix.science.selection`: dev files only;
                                             OUT/dev_scores.json keeps the scores); again,
                                             and the report too, when a gate was trained
    multitask OUT/experts/multitask/         the multitask LoRA: one LoRA on the union of
                                             the training files, rank E * r on the same
                                             modules (as many trainable parameters as the E
                                             experts together) for E * expert_steps steps
                                             (as many training examples). The longest job:
                                             it starts with the experts, in a worker of its
                                             own, and this step waits for it
    eval-early OUT/eval/parts/*.json         while the multitask LoRA trains in the
                                             background: the parts of the report that do
                                             not need it
    multitask-candidates                     with `multitask_candidates` only: the other
             OUT/experts/multitask-<name>/   schedules of the multitask LoRA (`s4000`),
                                             each in a worker of its own from the start,
                                             like the multitask LoRA (or on every worker
                                             here, when nothing else is left to train)
    multitask-select                         the multitask LoRA with the lowest mean dev NLL
             OUT/multitask_selection.json    (`loramix.science.multitask_choice`), the one
                                             the report scores
    eval     OUT/eval/eval.{json,md}, *.png  the final report (the parts still missing):
                                             with eval-early, the only step that opens the
                                             test files (`loramix.science.final_eval`)
    export   BUNDLE (the CLI: OUT/bundle-v2) the X-LoRA folder in float16 with the eval files
                                             (`loramix.science.bundle`)

`OUT/run.json` records the seed and settings; a later call with others is refused, so that
no step of one run is silently reused by another. To try other settings on the finished
steps that they leave valid, start a new folder from the run: `--reuse RUN`
(`loramix.science.reuse`).

The bundle is always re-exported (it is cheap), so it is the output of the run in `OUT`.
`export_bundle` (`loramix.science.bundle`) converts every weight to float16 and refuses a
bundle above `max_bytes`;
`XLoraModel.from_pretrained` upcasts the weights to the base model's dtype when loading.

Prompts and answers are plain text (no chat template): the science answers are short and
the chat template's system prompt would double every sequence and the CPU time with it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loramix.atomic import write_text_atomic
from loramix.checks import is_int, is_number, raise_problems
from loramix.config import CONFIG_NAME
from loramix.science import composite
from loramix.science.bundle import MAX_BUNDLE_BYTES, export_bundle
from loramix.science.final_eval import report_is_current
from loramix.science.gate_jobs import train_gates
from loramix.science.lora_jobs import (  # noqa: F401  (MULTITASK_JSON: re-exported)
    MULTITASK,
    MULTITASK_JSON,
    resume_flags,
    train_lora_job,
    train_loras,
    training_config,
)
from loramix.science.multitask_choice import (
    candidate_folder,
    candidate_problems,
    select_multitask,
    selection_is_current,
)
from loramix.science.registry import COMPOSITE, DOMAINS
from loramix.science.retrain_jobs import (  # noqa: F401  (RUN_JSON, TIMINGS_JSON, read_json: re-exported)
    RUN_JSON,
    TIMINGS_JSON,
    check_run_settings,
    cpu_seconds,
    finish_candidates,
    finish_multitask,
    job_record,
    keep_finished_jobs,
    keep_partial_timings,
    provenance,
    read_json,
    recover_job_times,
    resumed_step,
    share_threads,
    start_multitask,
    worker_plan,
)
from loramix.science.selection import DEFAULT_CANDIDATES, GateCandidate, select_gate

logger = logging.getLogger(__name__)

SELECTION_JSON = "selection.json"
MULTITASK_CANDIDATES = "multitask-candidates"  # the step training the other schedules
MIXED = "mixed"
_ADAPTER_CONFIG = "adapter_config.json"
_BUNDLED_REPORTS = ("eval.json", "eval.md")
TRAIN_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class RetrainSettings:
    """Everything `retrain` does besides the seed and the folders.

    The defaults are the published v2 run's (README, "Version 2"), which also trained the
    4000-step multitask schedule (`multitask_candidates=("s4000",)`, as `make retrain`
    does): experts and the multitask LoRA up to 1000 and 8000 steps, each kept at its best
    checkpoint on dev (`keep_best`), gate candidates of 1200 steps layer-wise and 600
    shared; about 6 h 20 min of work on a 2-core CPU, over its 2-hour budget. A run of
    `expert_steps=500, keep_best=False` took about 3 h 20 min. The
    4-expert v1 model (`models/science-xlora-v1`) was made with v1 settings recorded in its
    `retrain.json`.

    Attributes:
        base: "smollm2" or a local transformers folder.
        domains: The expert domains, a subset of `loramix.science.DOMAINS` (on the command
            line, separated by spaces or commas).
        n_train: Training examples per domain.
        n_test: Test examples per domain (and in the mixed and composite sets).
        n_dev: Dev examples per domain (and in the mixed and composite dev sets).
        rank: LoRA rank of every expert.
        alpha: LoRA alpha of every expert.
        targets: Adapted linear modules of every expert.
        expert_steps: Optimizer steps per expert, at most (see `keep_best`). At 250 steps the
            biology expert stops before the sudden drop of its training loss (about steps
            300 to 500 at seed 0); at 500 it can stop in the middle of it (its dev NLL: 0.53
            at 500 steps, 0.22 at 1000); 1000 steps with the best checkpoint on dev lets each
            domain take what it needs.
        expert_lr: Peak learning rate of the experts.
        multitask_lr: Peak learning rate of the multitask LoRA. Lower than the experts':
            at rank 64 on SmolLM2 the experts' 3e-3 makes its training loss diverge once
            warmup passes about 2e-3 (grad norm 1.6 -> 38, loss 1.97 -> 4.46 between steps
            50 and 125), after a smooth start below 1.5e-3; 1e-3 keeps a margin (seen in
            the training loss only: nothing here reads dev or test files).
        multitask: Also train the multitask LoRA baseline (rank and steps times the number
            of domains, alpha too so that alpha / rank is the experts').
        multitask_candidates: Other schedules of the multitask LoRA to choose from on dev,
            spelled `s<steps>` (trained to its end) or `s<steps>-best` (kept at its best
            checkpoint on dev), e.g. `s4000`; the run's own is always one of them, and the
            report scores the one with the lowest mean dev NLL
            (`loramix.science.multitask_choice`). Empty: the run's own, unchosen.
        keep_best: Each expert ends at its checkpoint with the lowest loss on its domain's
            dev file, the run's own multitask LoRA at its best on all the dev files, measured
            10 times during training (`loramix.science.lora_jobs`): their steps are chosen on
            dev, up to `expert_steps` (times the number of domains for the multitask LoRA).
            A multitask candidate's name says this for itself (`s4000-best`).
        gate_candidates: The gate settings tried; the one with the lowest mean dev NLL is
            kept (`loramix.science.selection`). Nothing about the gate is chosen on test.
        gate_size: Width of the gate's hidden layers (`xlora_size`).
        layerwise: One set of scalings per adapted module (`layerwise_scalings`).
        lr_scheduler: Learning-rate schedule after warmup, experts and gate (see
            `TrainingConfig`); "linear" keeps the rate higher for longer than "cosine", which
            the experts need: their held-out loss drops suddenly after a few hundred steps.
        batch_size: Examples per optimizer step (experts and gate).
        max_length: Tokens per training example (the longest science examples, reasoning
            puzzles, have under 90).
        save_steps: Steps between checkpoints, from which an interrupted step resumes (with
            `keep_best`, the experts and the multitask LoRA also save one at each of their dev
            measurements: every tenth of their steps, if that is longer).
        eval_limit: Examples per test set in the evaluation; None uses all.
        max_new_tokens: Greedy tokens per answer in the evaluation.
        train_dtype: Dtype of the frozen base model while experts and gate train ("bfloat16"
            takes about 0.8x the time of "float32" per expert step on a CPU with
            AVX512-BF16: BENCHMARKS.md, `benchmarks/train_dtype.py`; the LoRA weights and the
            gate always train in float32). The evaluation runs in float32.
        threads: torch CPU threads; None leaves torch's default.
        workers: Jobs run side by side, each in its own process with `threads // workers`
            threads (see `loramix.training.jobs`: on a small CPU this finishes sooner than
            one after the other): the experts and the multitask LoRA, the gate candidates,
            their dev scores, and the parts of the final evaluation. None gives one per CPU
            core; 1 runs every job one after the other here.
    """

    base: str = "smollm2"
    domains: tuple[str, ...] = DOMAINS
    n_train: int = 1000
    n_test: int = 100
    n_dev: int = 100
    rank: int = 8
    alpha: float = 16
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")
    expert_steps: int = 1000
    expert_lr: float = 3e-3
    multitask_lr: float = 1e-3
    multitask: bool = True
    multitask_candidates: tuple[str, ...] = ()
    keep_best: bool = True
    gate_candidates: tuple[GateCandidate, ...] = DEFAULT_CANDIDATES
    gate_size: int = 128
    layerwise: bool = True
    lr_scheduler: str = "linear"
    batch_size: int = 8
    max_length: int = 96
    save_steps: int = 50
    eval_limit: int | None = None
    max_new_tokens: int = 16
    train_dtype: str = "bfloat16"
    threads: int | None = None
    workers: int | None = None

    def __post_init__(self) -> None:
        problems = []
        unknown = [d for d in self.domains if d not in DOMAINS]
        if isinstance(self.domains, str) or not self.domains or unknown:
            problems.append(f"domains={self.domains!r}: choose one or more of {list(DOMAINS)}.")
        for name in (
            "n_train",
            "n_test",
            "n_dev",
            "rank",
            "expert_steps",
            "gate_size",
            "batch_size",
            "max_length",
            "save_steps",
            "max_new_tokens",
        ):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                problems.append(f"{name}={value!r}: use a whole number >= 1.")
        for name in ("eval_limit", "threads", "workers"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                problems.append(f"{name}={value!r}: use a whole number >= 1, or None.")
        for name in ("alpha", "expert_lr", "multitask_lr"):
            if not is_number(getattr(self, name)) or not getattr(self, name) > 0:
                problems.append(f"{name}={getattr(self, name)!r}: use a positive number.")
        names = [c.name for c in self.gate_candidates]
        if not names or len(set(names)) != len(names):
            problems.append(f"gate_candidates: give one or more, with distinct names ({names}).")
        for candidate in self.gate_candidates:
            problems += candidate.problems(self.domains)
        problems += candidate_problems(self)
        if self.train_dtype not in TRAIN_DTYPES:
            problems.append(f"train_dtype={self.train_dtype!r}: use one of {TRAIN_DTYPES}.")
        if isinstance(self.targets, str) or not self.targets:
            problems.append(f"targets={self.targets!r}: give module names, e.g. ('q_proj',).")
        raise_problems("Invalid RetrainSettings", problems)


@dataclass(frozen=True)
class RetrainPaths:
    """The folders of one retrain run inside `OUT`."""

    out: Path

    @property
    def data(self) -> Path:
        return self.out / "data"

    @property
    def experts(self) -> Path:
        return self.out / "experts"

    @property
    def xlora(self) -> Path:
        return self.out / "xlora"

    @property
    def multitask(self) -> Path:
        return self.experts / MULTITASK

    def gate(self, candidate: str) -> Path:
        return self.out / "gates" / candidate

    @property
    def eval(self) -> Path:
        return self.out / "eval"

    def expert(self, domain: str) -> Path:
        return self.experts / domain

    def train_file(self, domain: str) -> Path:
        return self.data / f"{domain}_train.jsonl"

    def dev_file(self, domain: str) -> Path:
        return self.data / f"{domain}_dev.jsonl"

    def test_sets(self, domains: Sequence[str]) -> dict[str, Path]:
        """Test set name -> file: every domain, the composite set (if any), the mixed set."""
        return self._split(domains, "test")

    def dev_sets(self, domains: Sequence[str]) -> dict[str, Path]:
        """Dev set name -> file, as `test_sets` for the dev split."""
        return self._split(domains, "dev")

    def _split(self, domains: Sequence[str], split: str) -> dict[str, Path]:
        sets = {domain: self.data / f"{domain}_{split}.jsonl" for domain in domains}
        if composite.tasks_for(domains):
            sets[COMPOSITE] = self.data / f"{COMPOSITE}_{split}.jsonl"
        sets[MIXED] = self.data / f"{MIXED}_{split}.jsonl"
        return sets


RUN_BUNDLE = "bundle-v2"
"""The command line's export folder inside the run's folder (`--bundle` to choose another)."""


def retrain(
    out_dir: str | os.PathLike[str],
    seed: int = 0,
    settings: RetrainSettings | None = None,
    *,
    bundle_dir: str | os.PathLike[str] | None = None,
    max_bundle_bytes: int = MAX_BUNDLE_BYTES,
) -> dict[str, float | None]:
    """Run (or resume) every step of the retrain; see the module docstring.

    Args:
        out_dir: The run's folder (created if missing); outputs already there are kept.
        seed: Seed of the data, every expert and the gate.
        settings: Sizes and hyperparameters; `RetrainSettings()` if None.
        bundle_dir: Where to export the float16 bundle (relative to the working
            directory, see `loramix.science.bundle`); None (the default) skips the export,
            so that no call replaces the bundled model (`DEFAULT_BUNDLE`) unless it names it.
        max_bundle_bytes: The export refuses a bundle larger than this.

    Returns:
        Step name -> seconds it took in this call, or None for a step that was skipped.

    Raises:
        ValueError: On invalid settings, or an export above `max_bundle_bytes`.
    """
    settings = settings or RetrainSettings()
    paths = RetrainPaths(Path(out_dir))
    paths.out.mkdir(parents=True, exist_ok=True)
    check_run_settings(paths.out, seed, settings)
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    timings: dict[str, float | None] = {}
    recorded = read_json(paths.out / TIMINGS_JSON)  # step -> {"wall_s", "cpu_s"}, all calls
    _recover_finished_times(paths, settings, recorded)

    def step(name: str, done: bool, action: Callable[[], Any]) -> None:
        if done:
            logger.info("step %s: already done, skipped", name)
            timings[name] = None
            return
        logger.info("step %s: starting", name)
        start, cpu_start = time.perf_counter(), cpu_seconds()
        result = action()
        details = result if isinstance(result, dict) else {}  # e.g. its jobs' CPU time
        seconds = round(time.perf_counter() - start, 2)
        timings[name] = seconds
        cpu_s = round(cpu_seconds() - cpu_start, 1)
        recorded[name] = {"wall_s": seconds, "cpu_s": cpu_s, **details}
        write_text_atomic(paths.out / TIMINGS_JSON, json.dumps(recorded, indent=2) + "\n")
        logger.info(
            "step %s: done in %.1f s (%.0f s of CPU time)", name, seconds, recorded[name]["cpu_s"]
        )

    step(
        "data",
        (paths.data / "manifest.json").is_file(),
        lambda: _write_data(paths, seed, settings),
    )
    # The multitask LoRA, the longest job, trains in a worker of its own beside the experts,
    # gates and selection (which do not need it); the multitask step waits for it.
    pending = [d for d in settings.domains if not _complete(paths.expert(d), _ADAPTER_CONFIG)]
    gates = [c for c in settings.gate_candidates if not _complete(paths.gate(c.name), CONFIG_NAME)]
    selected = (  # a gate trained in this call, or another list of candidates: select again
        not gates
        and _complete(paths.xlora, CONFIG_NAME)
        and set(read_json(paths.out / SELECTION_JSON).get("candidates", {}))
        == {c.name for c in settings.gate_candidates}
    )
    own = settings.multitask and not _complete(paths.multitask, _ADAPTER_CONFIG)
    more = [  # other schedules of the baseline, to choose from on dev
        candidate_folder(name)
        for name in settings.multitask_candidates
        if not _complete(paths.expert(candidate_folder(name)), _ADAPTER_CONFIG)
    ]
    # The candidates train in workers of their own from the start too: after everything
    # else, one job would leave a core nearly idle (BENCHMARKS.md: two experts side by side
    # finished 1.74x sooner than one after the other on two threads). Alone, one multitask
    # LoRA trains here, with every thread.
    only_loras = not pending and not gates and selected  # nothing else left to train
    alone = only_loras and own + len(more) < 2
    # Left alone, the multitask LoRAs share every CPU; otherwise each takes a worker's share.
    threads = share_threads(settings, own + len(more)) if only_loras else None
    multitask = None
    candidates: dict[str, Any] = {}  # folder -> its BackgroundJob
    earlier = recorded.get(MULTITASK_CANDIDATES, {})
    threads_before = torch.get_num_threads()
    try:
        if own:
            args = (paths, MULTITASK, seed, settings)
            multitask = start_multitask(
                train_lora_job, args, settings, alone=alone, threads=threads
            )
        if more and not alone and worker_plan(settings, 2)[0] >= 2:
            for name in more:
                args = (paths, name, seed, settings)
                candidates[name] = start_multitask(
                    train_lora_job, args, settings, alone=False, name=name, threads=threads
                )
        background = [j for j in (multitask, *candidates.values()) if j and not j.here]
        if background:
            torch.set_num_threads(worker_plan(settings, 2)[1])  # the CPUs left to share
        busy = len(background)
        step(
            "experts",
            not pending,
            lambda: train_loras(
                "experts", paths, pending, seed, settings, recorded.get("experts", {}), busy=busy
            ),
        )
        # The gates and the selection take every worker even while the multitask LoRAs
        # train: the experts take about as long, so they have little left, and a worker held
        # back for them would idle for the rest of the step once they end.
        step(
            "gates",
            not gates,
            lambda: train_gates(paths, gates, seed, settings, recorded.get("gates", {})),
        )
        step("select", selected, lambda: select_gate(paths, settings))
        running = sum(not job.finished() for job in background)
        if running:
            # The parts of the report that do not need the multitask LoRAs take the workers
            # they leave free (they are saved, and the eval step below keeps them).
            step("eval-early", False, lambda: evaluate_early(paths, settings, busy=running))
        if settings.multitask:
            step(MULTITASK, multitask is None, lambda: finish_multitask(multitask))
        if candidates:
            step(
                MULTITASK_CANDIDATES,
                False,
                lambda: finish_candidates(paths.out, MULTITASK_CANDIDATES, candidates, earlier),
            )
    except BaseException:
        # The multitask LoRAs that finished meanwhile are done for the next call, which skips
        # their steps: keep their times now, or they would be lost with their workers.
        keep_finished_jobs(
            paths.out,
            {} if MULTITASK in timings or multitask is None else {MULTITASK: multitask},
            {} if MULTITASK_CANDIDATES in timings else candidates,
            MULTITASK_CANDIDATES,
            earlier,
        )
        raise
    finally:
        for job in (multitask, *candidates.values()):
            if job is not None:
                job.stop()  # only still running if a step above failed
        torch.set_num_threads(threads_before)
    if settings.multitask_candidates:  # other schedules of the baseline, chosen on dev
        if not candidates:  # they train now, on every worker
            step(
                MULTITASK_CANDIDATES,
                not more,
                lambda: train_loras(MULTITASK_CANDIDATES, paths, more, seed, settings, earlier),
            )
        step(
            "multitask-select",
            selection_is_current(paths, settings),
            lambda: select_multitask(paths, settings),
        )
    step(
        "eval",
        report_is_current(paths, settings),  # same models, test files and code
        lambda: evaluate_run(paths, settings),
    )
    if bundle_dir is not None:
        step(
            "export",
            False,
            lambda: export_bundle(
                paths.xlora,
                bundle_dir,
                reports=[paths.eval / name for name in _BUNDLED_REPORTS],
                provenance=provenance(paths, seed, settings, recorded, bundle_dir),
                max_bytes=max_bundle_bytes,
            ),
        )
    spent = sum(s for s in timings.values() if s is not None)
    total = sum(r.get("wall_s", 0) for name, r in recorded.items() if name != "export")
    logger.info("retrain: %.1f s in this call; %.1f s for all steps of the run", spent, total)
    return timings


# ------------------------------------------------------------------------------ steps


def _recover_finished_times(
    paths: RetrainPaths, settings: RetrainSettings, recorded: dict[str, Any]
) -> None:
    """Add to `recorded` (timings.json) the times of the finished jobs it lacks: those whose
    call was killed after the job ended but before it kept the time (`recover_job_times`)."""

    def finished(folders: list[Path], config: str = _ADAPTER_CONFIG) -> list[Path]:
        return [folder for folder in folders if _complete(folder, config)]

    candidates = [paths.expert(candidate_folder(n)) for n in settings.multitask_candidates]
    recover_job_times(
        paths.out,
        recorded,
        {
            "experts": finished([paths.expert(d) for d in settings.domains]),
            MULTITASK_CANDIDATES: finished(candidates),
            "gates": finished([paths.gate(c.name) for c in settings.gate_candidates], CONFIG_NAME),
        },
        paths.multitask if settings.multitask and finished([paths.multitask]) else None,
    )


def _write_data(paths: RetrainPaths, seed: int, settings: RetrainSettings) -> None:
    from loramix.science.datasets import write_datasets

    # manifest.json is written last by write_datasets: its presence marks complete data
    write_datasets(
        paths.data,
        seed=seed,
        n_train=settings.n_train,
        n_test=settings.n_test,
        n_dev=settings.n_dev,
        domains=settings.domains,
    )


def evaluate_run(paths: RetrainPaths, settings: RetrainSettings) -> dict[str, Any]:
    """The final report (`loramix.science.final_eval`): with `evaluate_early`, the only step
    that reads test files."""
    from loramix.science.final_eval import evaluate_run as final_report

    return final_report(paths, settings)


def evaluate_early(paths: RetrainPaths, settings: RetrainSettings, busy: int = 1) -> dict[str, Any]:
    """Score the parts of the final report that do not need the multitask LoRA, beside it
    (and its candidates: `busy` background jobs in all)."""
    from loramix.science.final_eval import evaluation_parts, score_parts

    names = [name for name in evaluation_parts(settings) if name != MULTITASK]
    return score_parts(paths, settings, names, busy=busy)


# ---------------------------------------------------------------------------- helpers


def _complete(folder: Path, marker: str) -> bool:
    return (folder / marker).is_file()
