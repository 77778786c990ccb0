"""Shared training plumbing of `loramix.training.expert` and `loramix.training.gate` (Trainer).

What both trainers need beyond their model:

* `TrainingConfig`: validated hyperparameters (schedule, batch, checkpoints, data options).
* `last_checkpoint`: the checkpoint to resume from (`loramix.training.outputs` checks the
  output folder and the resumed run's settings).
* `run_trainer`: runs `Trainer` with gradient accumulation, an LR schedule with warmup,
  held-out loss every `eval_steps`, checkpoints in `OUT/checkpoints` every `save_steps`, and a
  progress bar.
* `publish`: writes the final files into `OUT` so that an interrupted run never leaves a
  half-written result: they are saved into a temporary folder inside `OUT`, then moved into
  place one by one with the *marker* file (e.g. `adapter_config.json`) removed first and moved
  last. Whenever the marker exists, every file beside it comes from the same complete save.

Output folder layout:

    OUT/adapter_config.json, OUT/adapter_model.safetensors, ...   the result (after the run)
    OUT/checkpoints/checkpoint-<step>/                            Trainer checkpoints
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging as hf_logging

from loramix.checks import is_int, raise_problems
from loramix.errors import TrainingInterrupted
from loramix.smollm2 import DEVICES
from loramix.training.data import Example, PadCollator
from loramix.training.loss import CompletionLossTrainer

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
"""Name of the checkpoint folder inside the output folder."""

_COMPLETE = "trainer_state.json"  # Trainer writes it last into a checkpoint
PUBLISH_PREFIX = ".publish-"  # temporary folders of `publish`
REPORTERS = ("none", "tensorboard", "wandb")
"""Where Trainer can send its logs besides the console (`TrainingConfig.report_to`)."""
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts")


@dataclass(frozen=True)
class TrainingConfig:
    """Hyperparameters shared by the expert and gate trainers.

    Attributes:
        lr: Peak learning rate.
        epochs: Passes over the (mixed) training data; ignored if `max_steps` is set.
        max_steps: Optimizer steps to run; overrides `epochs`.
        batch_size: Examples per forward pass.
        grad_accum: Forward passes per optimizer step (effective batch = batch_size x this).
        seed: Seed of initialization, data split, mixture and shuffling.
        max_length: Examples are truncated to this many tokens.
        chat: Render prompt/completion pairs with the tokenizer's chat template.
        eval_fraction: Share of each data file held out for the eval loss; 0 for none.
        save_steps: Optimizer steps between checkpoints, the points an interrupted run
            resumes from (one is also saved at the end).
        eval_steps: Optimizer steps between eval-loss measurements; `save_steps` if None.
        save_total_limit: Checkpoints kept (oldest deleted first); None keeps all.
        warmup: Linear warmup: a fraction of all steps if < 1, else a number of steps.
        lr_scheduler: Schedule after warmup: one of "linear", "cosine", "constant",
            "constant_with_warmup", "cosine_with_restarts".
        weight_decay: AdamW weight decay.
        logging_steps: Optimizer steps between logged training losses.
        progress: Show progress bars (training, and loading and saving the weights).
        gradient_checkpointing: Recompute each layer's activations in the backward pass
            instead of keeping them: less memory for about one more forward pass of time.
        device: Where to train: "auto" (a GPU if there is one, else the CPU), "cpu", "cuda"
            or "mps".
        report_to: Where Trainer also sends its logs: "none", "tensorboard" (event files in
            OUT/checkpoints/runs) or "wandb" (Weights & Biases); the package must be installed.
        keep_best: End with the weights of the checkpoint whose held-out loss was lowest
            (early stopping, chosen on the held-out data) instead of the last step's; needs
            held-out data (`eval_fraction` or the trainers' `eval_data`). Every measurement
            then also saves a checkpoint (the candidates), besides those every `save_steps`
            (so measurements far apart do not make an interruption lose more steps); the
            best one is never rotated away. At the end, a `save_total_limit` of 1 keeps only
            the best checkpoint, so raising `max_steps` on a finished run continues from
            there.
    """

    lr: float = 2e-4
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    seed: int = 0
    max_length: int = 512
    chat: bool = False
    eval_fraction: float = 0.05
    save_steps: int = 100
    eval_steps: int | None = None
    save_total_limit: int | None = 2
    warmup: float = 0.03
    lr_scheduler: str = "cosine"
    weight_decay: float = 0.0
    logging_steps: int = 10
    progress: bool = True
    gradient_checkpointing: bool = False
    device: str = "auto"
    report_to: str = "none"
    keep_best: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.device not in DEVICES:
            problems.append(f"device={self.device!r}: use one of {', '.join(DEVICES)}.")
        if self.report_to not in REPORTERS:
            problems.append(f"report_to={self.report_to!r}: use one of {', '.join(REPORTERS)}.")
        elif self.report_to != "none" and importlib.util.find_spec(self.report_to) is None:
            problems.append(
                f"report_to={self.report_to!r}: the {self.report_to} package is not installed; "
                f"install it (pip install {self.report_to}) or use report_to='none'."
            )
        if not (math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"lr={self.lr}: use a positive learning rate, e.g. 2e-4.")
        if not (math.isfinite(self.epochs) and self.epochs > 0):
            problems.append(f"epochs={self.epochs}: use a positive number, e.g. 1 or 3.")
        positive = {
            "max_steps": self.max_steps,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "save_steps": self.save_steps,
            "eval_steps": self.eval_steps,
            "save_total_limit": self.save_total_limit,
            "logging_steps": self.logging_steps,
        }
        optional = {"max_steps", "eval_steps", "save_total_limit"}
        for name, value in positive.items():
            if value is None and name in optional:
                continue
            if not is_int(value) or value < 1:
                fix = "or None " if name in optional else ""
                problems.append(f"{name}={value!r}: use a whole number >= 1 {fix}".rstrip() + ".")
        if not isinstance(self.max_length, int) or self.max_length < 2:
            problems.append(f"max_length={self.max_length!r}: use at least 2 (typically 512+).")
        if not 0 <= self.eval_fraction < 1:
            problems.append(f"eval_fraction={self.eval_fraction}: use a fraction in [0, 1).")
        if not (self.warmup >= 0 and (self.warmup < 1 or float(self.warmup).is_integer())):
            problems.append(
                f"warmup={self.warmup}: use a fraction of all steps in [0, 1) or a whole "
                "number of steps."
            )
        if self.lr_scheduler not in SCHEDULERS:
            problems.append(f"lr_scheduler={self.lr_scheduler!r}: use one of {SCHEDULERS}.")
        if not isinstance(self.gradient_checkpointing, bool):
            problems.append(
                f"gradient_checkpointing={self.gradient_checkpointing!r}: use True or False."
            )
        if not self.weight_decay >= 0:
            problems.append(f"weight_decay={self.weight_decay}: use a number >= 0.")
        if not isinstance(self.keep_best, bool):
            problems.append(f"keep_best={self.keep_best!r}: use True or False.")
        raise_problems("Invalid TrainingConfig", problems)

    def data_options(self) -> dict[str, Any]:
        """The keyword arguments of `loramix.training.data.load_training_data` set here."""
        return {
            "max_length": self.max_length,
            "chat": self.chat,
            "eval_fraction": self.eval_fraction,
            "seed": self.seed,
        }

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """Names of the fields, e.g. to pick them out of keyword arguments."""
        return tuple(f.name for f in fields(cls))


def checkpoint_step(checkpoint: Path) -> int:
    """The optimizer step of a `checkpoint-STEP` folder."""
    return int(checkpoint.name.removeprefix(f"{PREFIX_CHECKPOINT_DIR}-"))


def last_checkpoint(checkpoints: Path) -> Path | None:
    """The complete checkpoint with the highest step in `checkpoints`, or None.

    A checkpoint is complete once Trainer has written its `trainer_state.json` (its last
    file); folders left half-written by an interruption are skipped with a warning.
    """
    if not checkpoints.is_dir():
        return None
    found = []
    for path in checkpoints.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        step = path.name.removeprefix(f"{PREFIX_CHECKPOINT_DIR}-")
        if path.is_dir() and step.isdigit():
            if (path / _COMPLETE).is_file():
                found.append((int(step), path))
            else:
                logger.warning("skipping %s: incomplete (interrupted while saving)", path)
    return max(found)[1] if found else None


@contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """transformers' and huggingface_hub's progress bars on or off inside the block.

    They cover what happens outside the Trainer's own bar (which `disable_tqdm` controls):
    loading the weights, writing them. The previous setting is restored afterwards.
    """
    before = hf_logging.is_progress_bar_enabled()
    if enabled == before:
        yield
        return
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if before else hf_logging.disable_progress_bar)()


def cpu_data_parallel() -> bool:
    """Whether this process is one of several (torchrun) on a machine without accelerator.

    transformers sets up data parallelism on CPUs only when told to use the CPU; without it,
    each process would silently train on its own. `training_arguments` then asks for the
    CPU and the gloo backend.
    """
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    has_accelerator = accelerator.is_available() if accelerator else torch.cuda.is_available()
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not has_accelerator


def training_arguments(
    config: TrainingConfig, output_dir: Path, has_eval: bool
) -> TrainingArguments:
    """Translate a `TrainingConfig` into transformers' `TrainingArguments`.

    With `keep_best` and held-out data, Trainer saves at every measurement (it needs a
    checkpoint there to load the best one); `ResumePoints` adds the saves every
    `config.save_steps` in between.
    """
    eval_steps = config.eval_steps or config.save_steps
    best_candidates = config.keep_best and has_eval
    on_cpus = cpu_data_parallel()
    # The Trainer turns it on through the model's own method (XLoraModel's checks the kwargs);
    # transformers releases before 5.x's rename only know the older field name.
    names = {field.name for field in fields(TrainingArguments)}
    checkpointing = "activation_checkpointing"
    if checkpointing not in names:
        checkpointing = "gradient_checkpointing"
    return TrainingArguments(
        **{checkpointing: config.gradient_checkpointing},
        output_dir=str(output_dir),
        learning_rate=config.lr,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps if config.max_steps is not None else -1,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup if config.warmup < 1 else int(config.warmup),
        weight_decay=config.weight_decay,
        seed=config.seed,
        data_seed=config.seed,
        save_strategy="steps",
        save_steps=eval_steps if best_candidates else config.save_steps,
        save_total_limit=config.save_total_limit,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=eval_steps if has_eval else None,
        load_best_model_at_end=config.keep_best,
        metric_for_best_model="eval_loss" if config.keep_best else None,
        greater_is_better=False if config.keep_best else None,
        prediction_loss_only=True,  # never gather (B, T, vocab) logits during evaluation
        logging_strategy="steps",
        logging_steps=config.logging_steps,
        disable_tqdm=not config.progress,
        report_to=config.report_to,
        remove_unused_columns=False,  # the collator already yields exactly the model's inputs
        label_names=["labels"],
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=on_cpus or config.device == "cpu",
        ddp_backend="gloo" if on_cpus else None,
    )


def run_trainer(
    model: nn.Module,
    train: Dataset[Example],
    held_out: Dataset[Example] | None,
    *,
    collator: PadCollator,
    config: TrainingConfig,
    out: Path,
    resume_from: Path | None = None,
    callbacks: Sequence[TrainerCallback] = (),
    trainer_class: Callable[..., Trainer] = CompletionLossTrainer,
) -> Trainer:
    """Train `model` (only its parameters with requires_grad) with transformers' Trainer.

    Args:
        model: Takes input_ids, attention_mask and labels and returns an output with `.loss`.
        train: Training examples.
        held_out: Examples for the eval loss, or None.
        collator: Pads examples into batches.
        config: Hyperparameters.
        out: The output folder; checkpoints go to `out/checkpoints`.
        resume_from: A checkpoint to continue from (see `loramix.training.outputs`).
        callbacks: Extra `TrainerCallback`s (e.g. to log elsewhere, or to stop early).
        trainer_class: `Trainer` or a subclass (or a factory taking Trainer's keyword
            arguments), e.g. one that saves only some weights in checkpoints. The default
            computes the loss from the labelled positions' logits only
            (`loramix.training.loss`).

    Returns:
        The Trainer after training; `trainer.state.log_history` holds the losses.

    Raises:
        TrainingInterrupted: On Ctrl-C (a `KeyboardInterrupt` that names the step reached
            and the newest complete checkpoint).
        ValueError: If `resume_from` is past the steps `config` asks for.
        RuntimeError: With `keep_best`, if the best checkpoint's folder is gone.
    """
    if held_out is not None and len(held_out) == 0:  # type: ignore[arg-type]
        held_out = None
    check_held_out(config, held_out)
    args = training_arguments(config, out / CHECKPOINTS, has_eval=held_out is not None)
    if args.save_steps != config.save_steps:  # keep_best saves at its measurements
        callbacks = [*callbacks, ResumePoints(config.save_steps)]
    trainer = trainer_class(
        model=model,
        args=args,
        data_collator=collator,
        train_dataset=train,
        eval_dataset=held_out,
        callbacks=list(callbacks),
    )
    if not config.progress:  # Trainer would print() its logs; send them to logging instead
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(LogCallback())
    try:
        with progress_bars(config.progress), _without_mtime_notice():
            ended = state_at_the_end(trainer, resume_from)
            if ended is not None:
                _end_without_steps(trainer, ended, resume_from, config, out)  # type: ignore[arg-type]
                result = None
            else:
                resume = str(resume_from) if resume_from else None
                result = trainer.train(resume_from_checkpoint=resume)
    except KeyboardInterrupt:
        checkpoint = last_checkpoint(out / CHECKPOINTS)
        raise TrainingInterrupted(trainer.state.global_step, checkpoint, out) from None
    best_step = trainer.state.best_global_step if config.keep_best else None
    if best_step is not None and trainer.state.best_model_checkpoint is None:
        best = out / CHECKPOINTS / f"{PREFIX_CHECKPOINT_DIR}-{best_step}"  # deleted meanwhile
        raise RuntimeError(
            f"keep_best: the best checkpoint, {best}, is missing, so the weights at the end "
            f"are step {trainer.state.global_step}'s, not the best step's; nothing was "
            f"published. Delete {out} (or pass --overwrite) and train again to keep the best."
        )
    if not trainer.is_world_process_zero():  # under torchrun, report once
        return trainer
    if result is not None:
        logger.info(
            "trained %d step(s); final training loss %.4f",
            trainer.state.global_step,
            result.training_loss,
        )
    evals = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
    if evals:
        logger.info("held-out loss %.4f (first measured: %.4f)", evals[-1], evals[0])
    if best_step is not None:
        logger.info(
            "kept the weights of step %d (lowest held-out loss, %.4f)",
            best_step,
            trainer.state.best_metric,
        )
    return trainer


def state_at_the_end(trainer: Trainer, checkpoint: Path | None) -> TrainerState | None:
    """The Trainer state of `checkpoint` if it is at the run's last step already, else None.

    A run stopped after its last checkpoint was saved, and before its result was written,
    resumes from there. Trainer would train one step past the end (it checks for the end
    only after a step) unless the last step closes an epoch; `run_trainer` ends such a run
    without training instead. The last step is Trainer's own count (`max_steps`, or the
    epochs over this run's data, batches and processes).

    Raises:
        ValueError: If the checkpoint is past the run's last step (its steps were lowered).
    """
    if checkpoint is None:
        return None
    state = TrainerState.load_from_json(str(checkpoint / _COMPLETE))
    *_, last = trainer.set_initial_training_values(trainer.args, trainer.get_train_dataloader())
    if state.global_step > last:
        raise ValueError(
            f"{checkpoint} is at step {state.global_step}, past the {last} step(s) asked for: "
            f"ask for at least {state.global_step} (max_steps or epochs), or start over."
        )
    return state if state.global_step == last else None


def _end_without_steps(
    trainer: Trainer, state: TrainerState, checkpoint: Path, config: TrainingConfig, out: Path
) -> None:
    """End a run resumed at its last step as Trainer ends one: the weights of the best
    checkpoint (`keep_best`) or of `checkpoint`, and only the best checkpoint kept when
    `save_total_limit` is 1."""
    state.is_world_process_zero = trainer.is_world_process_zero()  # the file has rank 0's
    state.is_local_process_zero = trainer.is_local_process_zero()
    trainer.state = state
    weights = checkpoint
    if config.keep_best and state.best_global_step is not None:
        weights = out / CHECKPOINTS / f"{PREFIX_CHECKPOINT_DIR}-{state.best_global_step}"
        if not weights.is_dir():
            raise RuntimeError(
                f"keep_best: the best checkpoint, {weights}, is missing, so the run cannot end "
                f"with the best step's weights; nothing was published. Delete {out} (or pass "
                "--overwrite) and train again to keep the best."
            )
        state.best_model_checkpoint = str(weights)
    handler, args = trainer.callback_handler, trainer.args
    trainer.control = handler.on_train_begin(args, state, trainer.control)
    trainer._load_from_checkpoint(str(weights))  # the loader Trainer's resume uses
    if state.is_world_process_zero:
        logger.info(
            "%s is at the last step (%d): nothing left to train; ending with the weights of %s",
            checkpoint,
            state.global_step,
            weights.name,
        )
    if config.keep_best and config.save_total_limit == 1 and weights != checkpoint:
        trainer.accelerator.wait_for_everyone()  # every process has loaded its weights
        if args.should_save:
            for other in (out / CHECKPOINTS).glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
                if other.is_dir() and other.name != weights.name:
                    shutil.rmtree(other, ignore_errors=True)
    trainer.control = handler.on_train_end(args, state, trainer.control)


def check_held_out(config: TrainingConfig, held_out: Dataset[Example] | None) -> None:
    """Refuse `keep_best` without held-out examples (call it before anything is written).

    Raises:
        ValueError: Saying how to give held-out data.
    """
    if config.keep_best and not held_out:
        raise ValueError(
            "keep_best chooses the checkpoint by its held-out loss, but there is no held-out "
            "data: set eval_fraction above 0 or give eval_data (e.g. a dev split)."
        )


class _DropMessage(logging.Filter):
    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


@contextmanager
def _without_mtime_notice() -> Iterator[None]:
    """Drop transformers' "mtime may not be reliable" notice for the length of the block.

    Trainer orders checkpoints by modification time, and says so when two are under a second
    apart (as on a small model) before it falls back to their step numbers, which is what
    loramix relies on (`last_checkpoint`). Nothing for the user to act on.
    """
    drop = _DropMessage("mtime may not be reliable")
    source = logging.getLogger("transformers.trainer_utils")
    source.addFilter(drop)
    try:
        yield
    finally:
        source.removeFilter(drop)


class ResumePoints(TrainerCallback):
    """Save a checkpoint every `every` optimizer steps, besides Trainer's own saves.

    With `keep_best`, Trainer saves where it measures the held-out loss (a tenth of the run
    apart in the science retrain); these saves in between are where an interrupted run
    resumes from. Saving reads the random states and changes none, so the run's steps are
    the same either way, and Trainer's rotation keeps the best checkpoint.
    """

    def __init__(self, every: int) -> None:
        self.every = every

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step % self.every == 0:
            control.should_save = True
        return control


class LogCallback(TrainerCallback):
    """Send Trainer's periodic logs (loss, learning rate, eval loss) to this module's logger."""

    def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
        if logs and state.is_world_process_zero:
            shown = {k: f"{v:.4g}" if isinstance(v, float) else v for k, v in logs.items()}
            shown.pop("total_flos", None)
            logger.info("step %d: %s", state.global_step, shown)


def publish(out: Path, write: Callable[[Path], None], *, marker: str) -> list[Path]:
    """Write result files into `out` without ever leaving a half-written result there.

    `write(tmp)` saves the files into a fresh temporary folder inside `out`; they are then
    moved into `out` (same file system, so each move is an atomic rename), the marker last,
    after the old marker was removed first.

    Args:
        out: The output folder.
        write: Saves the result files into the folder it is given.
        marker: The file whose presence says the result is complete (e.g.
            "adapter_config.json"); `write` must create it.

    Returns:
        The paths of the published files.

    Raises:
        ValueError: If `write` did not create the marker (nothing in `out` is changed).
    """
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=PUBLISH_PREFIX, dir=out))
    try:
        write(tmp)
        names = sorted(p.name for p in tmp.iterdir())
        if marker not in names:
            raise ValueError(f"The save wrote no {marker} (wrote {names}); nothing was published.")
        (out / marker).unlink(missing_ok=True)
        for name in [n for n in names if n != marker] + [marker]:
            if (out / name).is_dir():
                shutil.rmtree(out / name)
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [out / name for name in names]
