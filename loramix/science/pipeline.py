"""Retrain the science case study from scratch: data, experts, gate, evaluation, bundle.

`retrain(out_dir, seed)` runs every step with fixed seeds. Each step skips itself when its
output already exists, so an interrupted retrain resumes where it stopped (a half-trained
expert or gate continues from its last checkpoint), and each step's time is logged and kept
in `OUT/timings.json`:

    data     OUT/data/{domain}_{train,test}.jsonl, composite_test.jsonl, mixed_test.jsonl
    experts  OUT/experts/<domain>/           one rank-8 LoRA per domain (`train_expert`),
                                             several side by side in worker processes
    gate     OUT/xlora/                      the gate over the frozen experts, trained on a
                                             mix of the domains' training sets (`train_gate`)
    eval     OUT/eval/eval.{json,md}         base, each expert, uniform, X-LoRA on every test
             OUT/eval/*.png                  set (`loramix.evaluation.runner`), targets checked; the
                                             scalings heatmaps and expert usage (`plots`)
    export   BUNDLE (models/science-xlora)   the X-LoRA folder in float16 with the eval files
                                             (`loramix.science.bundle`)

`OUT/run.json` records the seed and settings; a later call with others is refused, so that
no step of one run is silently reused by another.

The bundle is always re-exported (it is cheap), so it is the output of the run in `OUT`.
`export_bundle` (`loramix.science.bundle`) converts every weight to float16 and refuses a
bundle above `max_bytes`;
`XLoraModel.from_pretrained` upcasts the weights to the base model's dtype when loading.

Prompts and answers are plain text (no chat template): the science answers are short and
the chat template's system prompt would double every sequence and the CPU time with it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loramix.atomic import write_text_atomic
from loramix.checks import is_int, is_number, raise_problems
from loramix.config import CONFIG_NAME, XLoraConfig
from loramix.science.bundle import DEFAULT_BUNDLE, MAX_BUNDLE_BYTES, export_bundle
from loramix.science.registry import COMPOSITE, DOMAINS
from loramix.training.trainer import CHECKPOINTS, TrainingConfig, last_checkpoint

logger = logging.getLogger(__name__)

TIMINGS_JSON = "timings.json"
RUN_JSON = "run.json"  # the seed and settings of a run folder
MIXED = "mixed"
_ADAPTER_CONFIG = "adapter_config.json"
_BUNDLED_REPORTS = ("eval.json", "eval.md")
_TRAIN_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class RetrainSettings:
    """Everything `retrain` does besides the seed and the folders.

    The defaults are the bundled model's settings, sized for a small CPU (step times in
    BENCHMARKS.md, "Science retrain").

    Attributes:
        base: "smollm2" or a local transformers folder.
        domains: The expert domains, a subset of `loramix.science.DOMAINS`.
        n_train: Training examples per domain.
        n_test: Test examples per domain (and in the mixed and composite sets).
        rank: LoRA rank of every expert.
        alpha: LoRA alpha of every expert.
        targets: Adapted linear modules of every expert.
        expert_steps: Optimizer steps per expert.
        expert_lr: Peak learning rate of the experts.
        gate_steps: Optimizer steps of the gate.
        gate_lr: Peak learning rate of the gate.
        gate_depth: Linear layers in the gate (`xlora_depth`).
        gate_size: Width of the gate's hidden layers (`xlora_size`).
        gate_weights: Sampling weight of a domain's training file in the gate's data mix
            (`FILE:WEIGHT`); domains not named weigh 1. The default 1.5 on chemistry was
            chosen after seeing held-out results (one run; see README): with equal weights
            X-LoRA missed the 10% line on chemistry.
        layerwise: One set of scalings per adapted module (`layerwise_scalings`).
        lr_scheduler: Learning-rate schedule after warmup, experts and gate (see
            `TrainingConfig`); "linear" keeps the rate higher for longer than "cosine", which
            the experts need: their held-out loss drops suddenly after a few hundred steps.
        batch_size: Examples per optimizer step (experts and gate).
        max_length: Tokens per training example (the science examples have under 40).
        save_steps: Steps between checkpoints, from which an interrupted step resumes.
        eval_limit: Examples per test set in the evaluation; None uses all.
        max_new_tokens: Greedy tokens per answer in the evaluation.
        train_dtype: Dtype of the frozen base model while experts and gate train ("bfloat16"
            is faster than "float32" on CPUs with AVX512-BF16; the LoRA weights and the gate
            always train in float32). The evaluation runs in float32.
        threads: torch CPU threads; None leaves torch's default.
        expert_workers: Experts trained side by side, each in its own process with
            `threads // expert_workers` threads (see `loramix.training.jobs`: on a small CPU
            this finishes sooner than one after the other); None gives one per CPU core; 1
            trains them one after the other in this process.
    """

    base: str = "smollm2"
    domains: tuple[str, ...] = DOMAINS
    n_train: int = 1000
    n_test: int = 40
    rank: int = 8
    alpha: float = 16
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")
    expert_steps: int = 500
    expert_lr: float = 3e-3
    gate_steps: int = 300
    gate_lr: float = 3e-3
    gate_depth: int = 2
    gate_size: int = 128
    gate_weights: dict[str, float] = field(default_factory=lambda: {"chemistry": 1.5})
    layerwise: bool = True
    lr_scheduler: str = "linear"
    batch_size: int = 8
    max_length: int = 64
    save_steps: int = 50
    eval_limit: int | None = None
    max_new_tokens: int = 16
    train_dtype: str = "bfloat16"
    threads: int | None = None
    expert_workers: int | None = None

    def __post_init__(self) -> None:
        problems = []
        unknown = [d for d in self.domains if d not in DOMAINS]
        if isinstance(self.domains, str) or not self.domains or unknown:
            problems.append(f"domains={self.domains!r}: choose one or more of {list(DOMAINS)}.")
        for name in (
            "n_train",
            "n_test",
            "rank",
            "expert_steps",
            "gate_steps",
            "gate_depth",
            "gate_size",
            "batch_size",
            "max_length",
            "save_steps",
            "max_new_tokens",
        ):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                problems.append(f"{name}={value!r}: use a whole number >= 1.")
        for name in ("eval_limit", "threads", "expert_workers"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                problems.append(f"{name}={value!r}: use a whole number >= 1, or None.")
        for name in ("alpha", "expert_lr", "gate_lr"):
            if not getattr(self, name) > 0:
                problems.append(f"{name}={getattr(self, name)!r}: use a positive number.")
        for domain, weight in self.gate_weights.items():
            if domain not in DOMAINS:  # a weight of a domain left out is not used
                problems.append(f"gate_weights[{domain!r}]: not one of {list(DOMAINS)}.")
            if not is_number(weight) or not weight > 0:
                problems.append(f"gate_weights[{domain!r}]={weight!r}: use a positive number.")
        if self.train_dtype not in _TRAIN_DTYPES:
            problems.append(f"train_dtype={self.train_dtype!r}: use one of {_TRAIN_DTYPES}.")
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
    def eval(self) -> Path:
        return self.out / "eval"

    def expert(self, domain: str) -> Path:
        return self.experts / domain

    def train_file(self, domain: str) -> Path:
        return self.data / f"{domain}_train.jsonl"

    def test_sets(self, domains: Sequence[str]) -> dict[str, Path]:
        """Test set name -> file: every domain, then the composite and the mixed set."""
        sets = {domain: self.data / f"{domain}_test.jsonl" for domain in domains}
        sets[COMPOSITE] = self.data / f"{COMPOSITE}_test.jsonl"
        sets[MIXED] = self.data / f"{MIXED}_test.jsonl"
        return sets


def retrain(
    out_dir: str | os.PathLike[str],
    seed: int = 0,
    settings: RetrainSettings | None = None,
    *,
    bundle_dir: str | os.PathLike[str] | None = DEFAULT_BUNDLE,
    max_bundle_bytes: int = MAX_BUNDLE_BYTES,
) -> dict[str, float | None]:
    """Run (or resume) every step of the retrain; see the module docstring.

    Args:
        out_dir: The run's folder (created if missing); outputs already there are kept.
        seed: Seed of the data, every expert and the gate.
        settings: Sizes and hyperparameters; the bundled model's settings if None.
        bundle_dir: Where to export the float16 bundle (relative to the working
            directory, see `loramix.science.bundle`); None skips the export.
        max_bundle_bytes: The export refuses a bundle larger than this.

    Returns:
        Step name -> seconds it took in this call, or None for a step that was skipped.

    Raises:
        ValueError: On invalid settings, or an export above `max_bundle_bytes`.
    """
    settings = settings or RetrainSettings()
    paths = RetrainPaths(Path(out_dir))
    paths.out.mkdir(parents=True, exist_ok=True)
    _check_run_settings(paths.out, seed, settings)
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    timings: dict[str, float | None] = {}
    recorded = read_json(paths.out / TIMINGS_JSON)  # step -> {"wall_s", "cpu_s"}, all calls

    def step(name: str, done: bool, action: Callable[[], Any]) -> None:
        if done:
            logger.info("step %s: already done, skipped", name)
            timings[name] = None
            return
        logger.info("step %s: starting", name)
        start, cpu_start = time.perf_counter(), time.process_time()
        result = action()
        details = result if isinstance(result, dict) else {}  # e.g. its workers' CPU time
        seconds = round(time.perf_counter() - start, 2)
        timings[name] = seconds
        cpu_s = round(time.process_time() - cpu_start, 1)
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
    pending = [d for d in settings.domains if not _complete(paths.expert(d), _ADAPTER_CONFIG)]
    step(
        "experts",
        not pending,
        lambda: _train_experts(paths, pending, seed, settings, recorded.get("experts", {})),
    )
    step("gate", _complete(paths.xlora, CONFIG_NAME), lambda: _train_gate(paths, seed, settings))
    step(
        "eval",
        (paths.eval / "eval.json").is_file() and (paths.eval / "expert_usage.png").is_file(),
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
                provenance=_provenance(paths, seed, settings, recorded),
                max_bytes=max_bundle_bytes,
            ),
        )
    spent = sum(s for s in timings.values() if s is not None)
    total = sum(r["wall_s"] for name, r in recorded.items() if name != "export")
    logger.info("retrain: %.1f s in this call; %.1f s for all steps of the run", spent, total)
    return timings


# ------------------------------------------------------------------------------ steps


def _write_data(paths: RetrainPaths, seed: int, settings: RetrainSettings) -> None:
    from loramix.science.datasets import write_datasets

    # manifest.json is written last by write_datasets: its presence marks complete data
    write_datasets(
        paths.data,
        seed=seed,
        n_train=settings.n_train,
        n_test=settings.n_test,
        domains=settings.domains,
    )


def resume_flags(out: Path) -> dict[str, bool]:
    """Resume from a checkpoint if one exists; otherwise start over (replacing leftovers)."""
    resume = last_checkpoint(out / CHECKPOINTS) is not None
    return {"resume": resume, "overwrite": not resume}


def _train_experts(
    paths: RetrainPaths,
    domains: Sequence[str],
    seed: int,
    settings: RetrainSettings,
    earlier: dict[str, Any],
) -> dict[str, Any]:
    """Trains the experts of `domains`, up to `settings.expert_workers` side by side.

    Args:
        earlier: The experts step's record in timings.json, if an earlier call trained
            some of the experts.

    Returns:
        The step's record besides its wall time: CPU time of all experts (the workers'
        included), workers, threads per worker, and each expert's own times.
    """
    from loramix.training.jobs import run_jobs

    workers = min(settings.expert_workers or os.cpu_count() or 1, len(domains))
    threads = max(1, (settings.threads or torch.get_num_threads()) // workers)
    each = dict(earlier.get("each", {}))
    logger.info(
        "training %d expert(s), %d at a time with %d thread(s) each", len(domains), workers, threads
    )
    jobs = {domain: (paths, domain, seed, settings) for domain in domains}
    for done in run_jobs(_train_expert, jobs, workers=workers, threads=threads):
        each[done.name] = {"wall_s": round(done.wall_s, 2), "cpu_s": round(done.cpu_s, 1)}
        logger.info("expert %s: done in %.1f s", done.name, done.wall_s)
    cpu_s = round(sum(each[d]["cpu_s"] for d in domains), 1)
    return {"cpu_s": cpu_s, "workers": workers, "threads": threads, "each": each}


def training_config(
    settings: RetrainSettings, seed: int, *, lr: float, steps: int
) -> TrainingConfig:
    """The one `TrainingConfig` of the run; experts and gate differ in `lr` and `steps` only."""
    return TrainingConfig(
        lr=lr,
        max_steps=steps,
        batch_size=settings.batch_size,
        seed=seed,
        max_length=settings.max_length,
        chat=False,
        eval_fraction=0.0,
        save_steps=settings.save_steps,
        save_total_limit=1,
        warmup=0.05,
        lr_scheduler=settings.lr_scheduler,
        logging_steps=25,
        progress=False,
    )


def _train_expert(paths: RetrainPaths, domain: str, seed: int, settings: RetrainSettings) -> None:
    from loramix.training.expert import LoraSettings, train_expert

    out = paths.expert(domain)
    train_expert(
        settings.base,
        [paths.train_file(domain)],
        out,
        LoraSettings(rank=settings.rank, alpha=settings.alpha, targets=settings.targets),
        training_config(settings, seed, lr=settings.expert_lr, steps=settings.expert_steps),
        dtype=getattr(torch, settings.train_dtype),
        **resume_flags(out),
    )
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)  # the adapter is complete


def _train_gate(paths: RetrainPaths, seed: int, settings: RetrainSettings) -> None:
    from loramix.training.gate import train_gate

    xlora = XLoraConfig(
        adapters={domain: str(paths.expert(domain)) for domain in settings.domains},
        layerwise_scalings=settings.layerwise,
        xlora_depth=settings.gate_depth,
        xlora_size=settings.gate_size,
        xlora_dropout_p=0.0,
    )
    train_gate(
        settings.base,
        xlora,
        [
            f"{paths.train_file(domain)}:{settings.gate_weights.get(domain, 1)}"
            for domain in settings.domains
        ],
        paths.xlora,
        training_config(settings, seed, lr=settings.gate_lr, steps=settings.gate_steps),
        dtype=getattr(torch, settings.train_dtype),
        **resume_flags(paths.xlora),
    )
    shutil.rmtree(paths.xlora / CHECKPOINTS, ignore_errors=True)


def evaluate_run(paths: RetrainPaths, settings: RetrainSettings) -> None:
    """Evaluate the run's X-LoRA model and draw its heatmaps into `paths.eval`."""
    from loramix.evaluation.plots import write_eval_plots
    from loramix.evaluation.runner import evaluate as evaluate_model
    from loramix.evaluation.runner import load_test_set
    from loramix.model import XLoraModel
    from loramix.science.targets import check_targets, science_verifier
    from loramix.smollm2 import load_base_model

    base, tokenizer = load_base_model(settings.base)
    model = XLoraModel.from_pretrained(base, paths.xlora)
    test_sets = paths.test_sets(settings.domains)
    report = evaluate_model(
        model,
        tokenizer,
        {name: str(path) for name, path in test_sets.items()},
        chat=False,
        verifier=science_verifier,
        limit=settings.eval_limit,
        max_new_tokens=settings.max_new_tokens,
    )
    checks = check_targets(report, {domain: domain for domain in settings.domains})
    report.write(paths.eval, checks)
    logger.info("evaluation:\n%s", report.table())
    for check in checks:
        logger.info("target %s", check.line())
    samples = {
        name: load_test_set(path, tokenizer, chat=False, limit=1)[0].input_ids
        for name, path in test_sets.items()
        if name != MIXED
    }
    write_eval_plots(model, tokenizer, samples, paths.eval, usage=report.usage)


# ---------------------------------------------------------------------------- helpers


def _check_run_settings(out: Path, seed: int, settings: RetrainSettings) -> None:
    """Record the seed and settings of the run in `out`, or check them against the record.

    Raises:
        ValueError: If `out` holds a run made with another seed or other settings (which
            the skipped steps would silently mix in), naming the differences.
    """
    current = {"seed": seed, **dataclasses.asdict(settings)}
    for speed_only in ("threads", "expert_workers"):  # a run may resume with others
        current.pop(speed_only)
    current = json.loads(json.dumps(current))  # tuples as lists, as read back from JSON
    path = out / RUN_JSON
    if not path.is_file():
        write_text_atomic(path, json.dumps(current, indent=2) + "\n")
        return
    recorded = read_json(path)
    changed = sorted(
        k for k in current.keys() | recorded.keys() if current.get(k) != recorded.get(k)
    )
    if changed:
        details = ", ".join(f"{k}: {recorded.get(k)!r} -> {current.get(k)!r}" for k in changed)
        raise ValueError(
            f"{out} holds a run made with other settings ({details}); its finished steps "
            "would be reused. Pass another output folder (--out), or delete this one to "
            "start over."
        )


def _complete(folder: Path, marker: str) -> bool:
    return (folder / marker).is_file()


def _provenance(
    paths: RetrainPaths, seed: int, settings: RetrainSettings, timings: dict[str, float]
) -> dict[str, Any]:
    manifest = read_json(paths.data / "manifest.json")
    return {
        "seed": seed,
        "settings": dataclasses.asdict(settings),
        "data": {
            key: manifest.get(key) for key in ("n_train", "n_test", "n_composite", "versions")
        },
        "timings": timings,
        "command": f"loramix science retrain --seed {seed}",
    }


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or {} if it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
