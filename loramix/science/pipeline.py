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
             OUT/eval/*.png                  set (`loramix.evaluation`), targets checked; the
                                             scalings heatmaps and expert usage (`plots`)
    export   BUNDLE (models/science-xlora)   the X-LoRA folder in float16 with the eval files

`OUT/run.json` records the seed and settings; a later call with others is refused, so that
no step of one run is silently reused by another.

The bundle is always re-exported (it is cheap), so it is the output of the run in `OUT`.
`export_bundle` converts every weight to float16 and refuses a bundle above `max_bytes`;
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
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from loramix.atomic import write_text_atomic
from loramix.config import CONFIG_NAME
from loramix.records import BASE_RECORD_NAME, TRAINING_RECORD_NAME, read_training_record
from loramix.science.registry import COMPOSITE, DOMAINS
from loramix.training import CHECKPOINTS, last_checkpoint

logger = logging.getLogger(__name__)

BUNDLE_DIR = Path(__file__).resolve().parents[2] / "models" / "science-xlora"
"""Where the repository keeps the trained experts and gate (the output of `retrain`)."""

MAX_BUNDLE_BYTES = 20_000_000
"""The bundle's size limit: 20 MB (decimal) of half precision weights, configs and reports."""

RETRAIN_JSON = "retrain.json"
"""Settings, data manifest and step timings of the run that made a bundle."""

TIMINGS_JSON = "timings.json"
RUN_JSON = "run.json"  # the seed and settings of a run folder
MIXED = "mixed"
_WEIGHT_SUFFIX = ".safetensors"
_ADAPTER_CONFIG = "adapter_config.json"
_BUNDLED_REPORTS = ("eval.json", "eval.md")
_BUNDLED_RECORD = ("command", "status", "base_model", "prompts", "global_step")
"""The fields of the gate's training_args.json that the bundle keeps (no paths or timings)."""
_TRAIN_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class RetrainSettings:
    """Everything `retrain` does besides the seed and the folders.

    The defaults are the bundled model's settings, sized so that the whole retrain takes
    45 minutes on a 2-core CPU (see README).

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
            is about 1.6x faster than "float32" on CPUs with AVX512-BF16; the LoRA weights and
            the gate always train in float32). The evaluation runs in float32.
        threads: torch CPU threads; None leaves torch's default.
        expert_workers: Experts trained side by side, each in its own process with
            `threads // expert_workers` threads (see `loramix.jobs`: on 2 cores, two experts
            at one thread each finish 1.7x sooner than one after the other at two); None
            gives one per CPU core; 1 trains them one after the other in this process.
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
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
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
            if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0:
                problems.append(f"gate_weights[{domain!r}]={weight!r}: use a positive number.")
        if self.train_dtype not in _TRAIN_DTYPES:
            problems.append(f"train_dtype={self.train_dtype!r}: use one of {_TRAIN_DTYPES}.")
        if isinstance(self.targets, str) or not self.targets:
            problems.append(f"targets={self.targets!r}: give module names, e.g. ('q_proj',).")
        if problems:
            raise ValueError("Invalid RetrainSettings:\n  " + "\n  ".join(problems))


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
    bundle_dir: str | os.PathLike[str] | None = BUNDLE_DIR,
    max_bundle_bytes: int = MAX_BUNDLE_BYTES,
) -> dict[str, float | None]:
    """Run (or resume) every step of the retrain; see the module docstring.

    Args:
        out_dir: The run's folder (created if missing); outputs already there are kept.
        seed: Seed of the data, every expert and the gate.
        settings: Sizes and hyperparameters; the bundled model's settings if None.
        bundle_dir: Where to export the float16 bundle; None skips the export.
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


def _resume_flags(out: Path) -> dict[str, bool]:
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
    from loramix.jobs import run_jobs

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


def _train_expert(paths: RetrainPaths, domain: str, seed: int, settings: RetrainSettings) -> None:
    from loramix.train_expert import train_expert

    out = paths.expert(domain)
    train_expert(
        settings.base,
        [paths.train_file(domain)],
        out,
        rank=settings.rank,
        alpha=settings.alpha,
        targets=settings.targets,
        lr=settings.expert_lr,
        max_steps=settings.expert_steps,
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
        dtype=getattr(torch, settings.train_dtype),
        **_resume_flags(out),
    )
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)  # the adapter is complete


def _train_gate(paths: RetrainPaths, seed: int, settings: RetrainSettings) -> None:
    from loramix.train_gate import train_gate

    train_gate(
        settings.base,
        {domain: paths.expert(domain) for domain in settings.domains},
        [
            f"{paths.train_file(domain)}:{settings.gate_weights.get(domain, 1)}"
            for domain in settings.domains
        ],
        paths.xlora,
        layerwise_scalings=settings.layerwise,
        xlora_depth=settings.gate_depth,
        xlora_size=settings.gate_size,
        xlora_dropout_p=0.0,
        lr=settings.gate_lr,
        max_steps=settings.gate_steps,
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
        dtype=getattr(torch, settings.train_dtype),
        **_resume_flags(paths.xlora),
    )
    shutil.rmtree(paths.xlora / CHECKPOINTS, ignore_errors=True)


def evaluate_run(paths: RetrainPaths, settings: RetrainSettings) -> None:
    """Evaluate the run's X-LoRA model and draw its heatmaps into `paths.eval`."""
    from loramix.evaluation import evaluate as evaluate_model
    from loramix.evaluation import load_test_set, science_verifier
    from loramix.model import XLoraModel
    from loramix.plots import write_eval_plots
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
    checks = report.check_targets({domain: domain for domain in settings.domains})
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


# ----------------------------------------------------------------------------- export


def export_bundle(
    xlora_dir: str | os.PathLike[str],
    bundle_dir: str | os.PathLike[str],
    *,
    reports: Sequence[str | os.PathLike[str]] = (),
    provenance: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float16,
    max_bytes: int = MAX_BUNDLE_BYTES,
) -> int:
    """Copy an X-LoRA folder into `bundle_dir` with every floating weight cast to `dtype`.

    Configs are copied as they are (peft adapter configs with `target_modules` sorted, so
    that the same run gives the same bytes); `*.safetensors` files of the gate and the
    experts are rewritten with floating tensors in `dtype`; training logs and checkpoints
    are left out. `base_model.json` is copied, and of `training_args.json` only the base model
    and the prompt rendering are kept (what `generate` and `eval` default to).
    `reports` (e.g. `eval.md`) are copied beside the model, and `provenance` is written as
    `retrain.json` with a short `README.md`. The bundle is assembled in a temporary folder
    beside `bundle_dir` and swapped in only when complete and within `max_bytes`.

    Args:
        xlora_dir: A folder written by `XLoraModel.save_pretrained` (or `train_gate`).
        bundle_dir: The bundle folder; replaced as a whole.
        reports: Files to copy into the bundle (missing ones are skipped with a warning).
        provenance: JSON-able record of how the model was made.
        dtype: Dtype of the exported floating weights.
        max_bytes: Largest allowed total size of the bundle.

    Returns:
        The bundle's size in bytes.

    Raises:
        FileNotFoundError: If `xlora_dir` holds no `xlora_config.json`.
        ValueError: If the bundle would exceed `max_bytes` (the old bundle is kept).
    """
    source, target = Path(xlora_dir), Path(bundle_dir)
    if not (source / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"{source} holds no {CONFIG_NAME}: it is not an X-LoRA folder. Train the gate "
            "first (`loramix train-gate` or `loramix science retrain`)."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        files = [source / CONFIG_NAME, source / "gate.safetensors"]
        files += [source / BASE_RECORD_NAME] if (source / BASE_RECORD_NAME).is_file() else []
        files += sorted(p for p in (source / "experts").rglob("*") if p.is_file())
        for path in files:
            dest = staging / path.relative_to(source)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if path.suffix == _WEIGHT_SUFFIX:
                tensors = {
                    name: t.to(dtype) if t.is_floating_point() else t
                    for name, t in load_file(path).items()
                }
                save_file(tensors, dest, metadata={"format": "pt"})
            elif path.name == _ADAPTER_CONFIG:
                dest.write_text(_stable_adapter_config(path.read_text()))
            else:
                shutil.copyfile(path, dest)
        for report in map(Path, reports):
            if report.is_file():
                shutil.copyfile(report, staging / report.name)
            else:
                logger.warning("export: %s does not exist; not bundled", report)
        training = read_training_record(source)
        if training is not None:  # which base and prompt rendering generate / eval default to
            kept = {k: training[k] for k in _BUNDLED_RECORD if k in training}
            (staging / TRAINING_RECORD_NAME).write_text(json.dumps(kept, indent=2) + "\n")
        if provenance is not None:
            (staging / RETRAIN_JSON).write_text(json.dumps(provenance, indent=2) + "\n")
            (staging / "README.md").write_text(_bundle_readme(provenance))
        _make_readable(staging)
        size = folder_size(staging)
        if size > max_bytes:
            raise ValueError(
                f"the bundle would take {size / 1e6:.2f} MB, above the limit of "
                f"{max_bytes / 1e6:.2f} MB; lower the rank, adapt fewer modules "
                "(targets) or shrink the gate (gate_size), then retrain"
            )
        _swap_in(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("exported the bundle to %s (%.2f MB)", target, size / 1e6)
    return size


def _stable_adapter_config(text: str) -> str:
    """A peft adapter config with `target_modules` sorted.

    peft writes the set of target modules in the process's hash order, so the same training
    would otherwise give a different file in every run; sorted, a retrain reproduces the
    bundle byte for byte.
    """
    config = json.loads(text)
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def folder_size(folder: str | os.PathLike[str]) -> int:
    """Total bytes of the files under `folder`."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


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


def _bundle_readme(provenance: dict[str, Any]) -> str:
    settings = provenance.get("settings", {})
    domains = ", ".join(settings.get("domains", ()))
    return f"""# science-xlora

An X-LoRA model over SmolLM2-135M-Instruct: {len(settings.get("domains", ()))} rank-\
{settings.get("rank")} LoRA experts ({domains}) and the gate that mixes them per token and
per adapted module, all weights in float16. It is the output of `{provenance.get("command")}`
(`make retrain`); settings, data sizes and step times are in `retrain.json`, the evaluation
of base, experts, uniform average and X-LoRA on held-out data in `eval.md`.

    loramix science demo --model models/science-xlora
    loramix generate models/science-xlora --show-experts \\
        --prompt "What peptide do the DNA codons ATG GCC TTT encode?"

```python
from loramix.model import XLoraModel
from loramix.smollm2 import load_base_model

base, tokenizer = load_base_model("smollm2")
model = XLoraModel.from_pretrained(base, "models/science-xlora")  # weights upcast to float32
```

Prompts are plain text, without the chat template (as in training).
"""


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or {} if it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _make_readable(folder: Path) -> None:
    """Ordinary repository permissions (mkdtemp and safetensors create owner-only ones)."""
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _swap_in(staging: Path, target: Path) -> None:
    """Replace `target` by `staging`: the old folder is renamed aside, then deleted."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        os.replace(target, old / target.name)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
