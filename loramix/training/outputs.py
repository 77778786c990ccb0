"""The output folder of a training run: whose it is, what may be replaced, what may be resumed.

A run of `loramix train-expert` or `loramix train-gate` marks its folder with
`training_args.json` (see `loramix.records`) as soon as it starts: the command, `"status":
"running"` and the `run` settings that a resumed run must share (base model, experts, data
files with their SHA-256, X-LoRA / LoRA options, the training settings that change the result,
dtype, prompt rendering). The finished run rewrites it with `"status": "finished"`, its step
count and losses.

Two phases, so that a failed run leaves nothing behind:

1. `check_output` (before anything is loaded, writes nothing): refuses a folder with foreign
   content (a PEFT adapter, an X-LoRA from another command, someone's files) whatever the
   flags; refuses an earlier run of the same command unless `resume` or `overwrite`; finds the
   checkpoint to resume from.
2. `start_output` (after the data, the base model and the experts were loaded and checked):
   refuses to resume a run whose settings differ (naming each), says when a finished run has
   nothing left to do, deletes the earlier run for `overwrite` (only its own files and the
   `eval.json`/`eval.md` reports of its result), creates the folder and writes the running
   record.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loramix.atomic import write_text_atomic
from loramix.records import (
    REPORT_JSON,
    REPORT_MD,
    TRAINING_RECORD_NAME,
    is_eval_report,
    read_training_record,
)
from loramix.training.trainer import CHECKPOINTS, PUBLISH_PREFIX, TrainingConfig, last_checkpoint

logger = logging.getLogger(__name__)

RESUMABLE_CHANGES = (
    "max_steps",
    "epochs",
    "progress",
    "save_steps",
    "eval_steps",
    "save_total_limit",
    "logging_steps",
    "gradient_checkpointing",
)
"""Training settings that may differ when a run is resumed (they do not change its steps)."""

EARLIER_REPORTS = (REPORT_JSON, REPORT_MD)
"""`loramix eval --out` reports that may sit beside a result: they describe the earlier run's
result, so overwrite deletes them with it (only when `eval.json` is such a report: a user's
own files of those names stay)."""


@dataclass
class OutputPlan:
    """What `check_output` found; `start_output` acts on it.

    Attributes:
        out: The output folder.
        command: "train-expert" or "train-gate".
        record: The earlier run's `training_args.json`, or None.
        resume_from: The checkpoint to resume from, or None.
        replaced: Files of the earlier run to delete (overwrite).
    """

    out: Path
    command: str
    record: dict[str, Any] | None = None
    resume_from: Path | None = None
    replaced: list[Path] = field(default_factory=list)


def check_output(
    out: Path, *, command: str, resume: bool, overwrite: bool, final_files: Sequence[str]
) -> OutputPlan:
    """Check the output folder before anything is loaded; writes nothing.

    Args:
        out: The output folder (it need not exist).
        command: The command that writes it ("train-expert", "train-gate").
        resume: Continue from the newest complete checkpoint.
        overwrite: Replace an earlier run of the same command (only its files, and the
            `eval.json` and `eval.md` that reported on its result).
        final_files: Names of the result files the command publishes into `out`.

    Raises:
        ValueError: If both flags are set; if `out` is a file; if it holds content that is not
            an earlier run of `command` (whatever the flags); if it holds such a run and
            neither flag is set; if `resume` finds no checkpoint.
    """
    if resume and overwrite:
        raise ValueError("Pass either resume (continue a run) or overwrite (start over), not both.")
    if out.exists() and not out.is_dir():
        raise ValueError(f"Output {out} is a file; pass a folder path.")
    plan = OutputPlan(out, command)
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    entries = [name for name in entries if not name.startswith(PUBLISH_PREFIX)]
    if not entries:
        if resume:
            raise ValueError(f"Nothing to resume in {out}. Run without resume to start training.")
        return plan
    plan.record = read_training_record(out)
    owner = record_command(plan.record)
    if owner != command:
        what = f"the output of `loramix {owner}`" if owner else _describe(out, entries)
        raise ValueError(
            f"{out} holds {what}, not an earlier run of `loramix {command}`; refusing to write "
            f"there whatever the flags (--overwrite replaces only a run of `loramix {command}`). "
            "Choose a new or empty output folder."
        )
    if resume:
        plan.resume_from = last_checkpoint(out / CHECKPOINTS)
        if plan.resume_from is None:
            raise ValueError(
                f"Nothing to resume: {out / CHECKPOINTS} holds no complete checkpoint. Start over "
                "with overwrite (--overwrite) or choose another output folder."
            )
        return plan
    reports = EARLIER_REPORTS if is_eval_report(out) else ()  # not a user's own files
    earlier = [
        name
        for name in [*final_files, *reports, CHECKPOINTS, TRAINING_RECORD_NAME]
        if name in entries
    ]
    if not overwrite:
        raise ValueError(
            f"{out} already holds an earlier run of `loramix {command}` ({', '.join(earlier)}). "
            "Resume it (resume=True, --resume), start over and replace it (overwrite=True, "
            "--overwrite), or choose another output folder."
        )
    plan.replaced = [out / name for name in dict.fromkeys(earlier)]
    return plan


def start_output(
    plan: OutputPlan, run: dict[str, Any], config: TrainingConfig, *, write: bool = True
) -> bool:
    """Act on the plan once everything was loaded and checked; True to train.

    Args:
        plan: From `check_output`.
        run: The settings a resumed run must share (see the module docstring); JSON values.
        config: The training settings (for the finished-run check).
        write: False on the other processes of a distributed run (they only check).

    Returns:
        False when the resumed run had already finished and `config` asks for no more steps
        (nothing is changed); True otherwise.

    Raises:
        ValueError: If a resumed run's settings differ from the checkpoint's run (each
            differing setting is named with both values).
    """
    record = plan.record or {}
    run = json.loads(json.dumps(run))  # as it reads back from the file (tuples are lists)
    if plan.resume_from is not None:
        recorded = record.get("run")
        if recorded is None:
            logger.warning(
                "%s: the earlier run recorded no settings (an older loramix); resuming it "
                "without checking that the experts, data and settings are the same",
                plan.out,
            )
        else:
            differing = run_differences(recorded, run)
            if differing:
                raise ValueError(
                    f"cannot resume {plan.out}: this run differs from the checkpoint's run in "
                    + "; ".join(differing)
                    + ". Resume with the same settings, start over with overwrite "
                    "(--overwrite), or choose another output folder."
                )
        if finished(record, config):
            logger.info(
                "%s: the run finished at step %s; nothing to do (raise max_steps to continue it)",
                plan.out,
                record.get("global_step"),
            )
            return False
    if not write:
        return True
    for path in plan.replaced:
        logger.info("overwrite: deleting %s", path)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    for stale in plan.out.glob(f"{PUBLISH_PREFIX}*"):  # left by a run killed while publishing
        shutil.rmtree(stale, ignore_errors=True)
    plan.out.mkdir(parents=True, exist_ok=True)
    if plan.resume_from is None:
        write_record(plan.out, {"command": plan.command, "status": "running", "run": run})
    else:
        write_record(plan.out, {**record, "command": plan.command, "status": "running"})
    return True


def finished(record: Mapping[str, Any], config: TrainingConfig) -> bool:
    """Whether a finished run's record already covers the steps `config` asks for."""
    if record.get("status") != "finished":
        return False
    step = record.get("global_step")
    if not isinstance(step, int):
        return False
    if config.max_steps is not None:
        return step >= config.max_steps
    recorded = record.get("training", {})
    return recorded.get("max_steps") is None and recorded.get("epochs", 0) >= config.epochs


def run_differences(
    recorded: Mapping[str, Any], run: Mapping[str, Any], prefix: str = ""
) -> list[str]:
    """Each setting that differs, as `name: recorded -> given`."""
    differing = []
    for key in sorted(set(recorded) | set(run)):
        old, new = recorded.get(key), run.get(key)
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            differing += run_differences(old, new, f"{prefix}{key}.")
        elif old != new:
            differing.append(f"{prefix}{key}: {_short(old)} -> {_short(new)}")
    return differing


LATER_FIELDS = {"keep_best": False}
"""`TrainingConfig` fields added after runs were recorded, with their defaults: left out of
`training_settings` at the default, so that those runs still resume."""


def training_settings(config: TrainingConfig) -> dict[str, Any]:
    """The training settings a resumed run must share."""
    return {
        name: getattr(config, name)
        for name in TrainingConfig.field_names()
        if name not in RESUMABLE_CHANGES
        and not (name in LATER_FIELDS and getattr(config, name) == LATER_FIELDS[name])
    }


def file_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_digest(folder: str | os.PathLike[str]) -> str:
    """SHA-256 over a folder's top-level files (names and bytes), e.g. an adapter folder."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file()):
        digest.update(path.name.encode() + b"\0" + file_digest(path).encode())
    return digest.hexdigest()


def tree_digest(folder: str | os.PathLike[str], pattern: str = "*") -> str:
    """SHA-256 over every file under a folder whose name matches `pattern` (relative paths
    and bytes), e.g. an X-LoRA folder with the copies of its experts in `experts/<name>/`."""
    root = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob(pattern) if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(file_digest(path).encode())
    return digest.hexdigest()


def write_record(out: Path, record: Mapping[str, Any]) -> Path:
    """Writes `training_args.json` atomically."""
    return write_text_atomic(out / TRAINING_RECORD_NAME, json.dumps(record, indent=2) + "\n")


def record_command(record: Mapping[str, Any] | None) -> str | None:
    """The command that wrote a `training_args.json` (older gate records have no field)."""
    if not record:
        return None
    command = record.get("command")
    if isinstance(command, str):
        return command
    return "train-gate" if "expert_names" in record and "adapted_modules" in record else None


def _describe(out: Path, entries: list[str]) -> str:
    if "adapter_config.json" in entries:
        return "a PEFT adapter (adapter_config.json)"
    if "xlora_config.json" in entries:
        return "an X-LoRA model (xlora_config.json) not written by a loramix training command"
    if "config.json" in entries:
        return "a transformers model (config.json)"
    shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    return f"files that no loramix run wrote ({shown})"


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def data_settings(sources: Sequence[Any]) -> list[dict[str, Any]]:
    """Each data source (`loramix.training.jsonl.DataSource`) as path, weight and SHA-256."""
    return [
        {"path": str(Path(s.path).resolve()), "weight": s.weight, "sha256": file_digest(s.path)}
        for s in sources
    ]


def finished_record(
    command: str,
    base: str | os.PathLike[str],
    run: Mapping[str, Any],
    config: TrainingConfig,
    state: Any,
) -> dict[str, Any]:
    """The `training_args.json` of a finished run; `state` is the Trainer's `TrainerState`."""
    import dataclasses

    import loramix

    losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
    evals = [entry["eval_loss"] for entry in state.log_history if "eval_loss" in entry]
    return {
        "command": command,
        "status": "finished",
        "loramix_version": loramix.__version__,
        "base": os.fspath(base),
        "base_model": run["base_model"],
        "prompts": run["prompts"],
        "training": dataclasses.asdict(config),
        "global_step": state.global_step,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "first_eval_loss": evals[0] if evals else None,
        "last_eval_loss": evals[-1] if evals else None,
        # with keep_best the best checkpoint's (the last step's if none was measured)
        "kept_step": (config.keep_best and state.best_global_step) or state.global_step,
        "kept_eval_loss": state.best_metric if config.keep_best else None,
        "run": run,
    }
