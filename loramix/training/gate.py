"""Train the X-LoRA gate on JSON Lines data, with base model and experts frozen.

The paper's recipe (Buehler & Buehler 2024, https://arxiv.org/abs/2402.07148): the loss is
the causal-LM cross-entropy of the mixed pass; its gradient reaches the gate through the
scalings, so the backward pass runs through the frozen base model, but only the gate's
parameters (and the experts', with `use_trainable_adapters`) get gradients and an optimizer.

The optional balance and entropy terms on the scalings are `GateRegularizer`'s (see
`loramix.training.regularizer`).

Checkpoints (`OUT/checkpoints/checkpoint-<step>/`) hold only `trainable.safetensors` (the
gate's parameters, plus the experts' with `use_trainable_adapters`, keyed as in
`XLoraModel.named_parameters()`) with the optimizer, scheduler, RNG and trainer state; never
the frozen base model or experts.

Output folder layout:

    OUT/xlora_config.json, OUT/gate.safetensors, OUT/base_model.json, OUT/experts/<name>/...
                                   the trained model, for `XLoraModel.from_pretrained(base, OUT)`
    OUT/training_args.json         the run record (see `loramix.training.outputs`): command, status,
                                   settings, data, base model, prompt rendering, steps, losses
    OUT/scalings_log.jsonl         one line per logging step (see `ScalingsLog`)
    OUT/checkpoints/               Trainer checkpoints
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Trainer, TrainerCallback, set_seed

from loramix.atomic import write_text_atomic
from loramix.config import CONFIG_NAME, XLoraConfig
from loramix.experts import load_expert
from loramix.model import XLoraModel
from loramix.records import BASE_RECORD_NAME, base_record, prompt_record
from loramix.saving import write_folder
from loramix.smollm2 import load_base_model, resolve_device
from loramix.training.data import PadCollator, load_training_data, pad_token_id
from loramix.training.jsonl import DataSource, existing_sources
from loramix.training.loss import CompletionLossTrainer
from loramix.training.outputs import (
    check_output,
    data_settings,
    finished_record,
    folder_digest,
    start_output,
    training_settings,
)
from loramix.training.regularizer import GateRegularizer, scaling_terms
from loramix.training.trainer import (
    TrainingConfig,
    checkpoint_step,
    cpu_data_parallel,
    progress_bars,
    publish,
    run_trainer,
)

logger = logging.getLogger(__name__)

TRAINABLE_WEIGHTS_NAME = "trainable.safetensors"
"""The only weights file in a gate-training checkpoint."""

COMMAND = "train-gate"
SCALINGS_LOG_NAME = "scalings_log.jsonl"
SUMMARY_NAME = "training_args.json"
GATE_FILES = (
    CONFIG_NAME,
    "gate.safetensors",
    BASE_RECORD_NAME,
    "experts",
    SUMMARY_NAME,
    SCALINGS_LOG_NAME,
)
"""Files of the result; `xlora_config.json` is moved into place last and marks it complete."""


# ------------------------------------------------------------ gate-only state


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (the gate's, plus the experts' if trainable), on the CPU."""
    return {
        name: param.detach().contiguous().cpu()
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def load_trainable_state(model: nn.Module, path: Path) -> None:
    """Copy a `trainable_state` file into `model`'s trainable parameters, after checking it.

    Raises:
        ValueError: If the file's keys or shapes differ from the model's trainable
            parameters (sorted missing and unexpected keys, and the likely cause).
    """
    state = load_file(path, device="cpu")
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(params.keys() - state.keys()), sorted(state.keys() - params)
    wrong = sorted(k for k in params.keys() & state.keys() if params[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(
            f"{path} does not fit this model (missing keys {missing}, unexpected keys "
            f"{unexpected}, wrong shapes {wrong}). Resume with the same experts and X-LoRA "
            "options as the interrupted run, or start over with overwrite (--overwrite)."
        )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name])


# ----------------------------------------------------------------- scalings log


class ScalingsLog:
    """`OUT/scalings_log.jsonl`: mean scalings over training, one JSON line per logging step.

    A line (values rounded to 5 significant digits):

        {"step": 20, "loss": 2.31, "experts": {"bio": 0.52, "chem": 0.48},
         "layers": [[0.61, 0.39], ...]}

    `experts` is each expert's mean scaling over real tokens and adapted modules since the
    previous line; `layers` (only with `layerwise_scalings`, else every row equals `experts`)
    holds one row per adapted module, in the order of `training_args.json`'s
    `adapted_modules`. Each line is appended with one `write` call, so a crash leaves at most
    one incomplete last line, which `truncate` drops on resume.

    Args:
        path: The file.
        expert_names: The E axis.
        layerwise: Write the per-module rows.
    """

    def __init__(self, path: Path, expert_names: Sequence[str], layerwise: bool) -> None:
        self.path = path
        self.expert_names = list(expert_names)
        self.layerwise = layerwise

    def append(self, step: int, loss: float | None, usage: torch.Tensor) -> None:
        """Add the line of one logging step; `usage` is `(L, E)` mean scalings."""
        record: dict[str, Any] = {"step": step, "loss": _round(loss)}
        per_expert = usage.mean(0).tolist()  # (E,)
        record["experts"] = dict(zip(self.expert_names, map(_round, per_expert), strict=True))
        if self.layerwise:
            record["layers"] = [[_round(v) for v in row] for row in usage.tolist()]
        line = json.dumps(record, separators=(",", ":")) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def truncate(self, step: int) -> None:
        """Keep the lines up to `step` (a resumed run redoes the later ones); atomic."""
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # the incomplete last line of an interrupted run
            if record.get("step", math.inf) <= step:
                kept.append(line + "\n")
        write_text_atomic(self.path, "".join(kept))

    def read(self) -> list[dict[str, Any]]:
        """The complete lines, parsed."""
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records


# ----------------------------------------------------------------------- trainer


class GateTrainer(CompletionLossTrainer):
    """transformers' `Trainer` for an `XLoraModel` whose gate alone is trained.

    A `CompletionLossTrainer` (logits only at the labelled positions). Differences from
    `Trainer`: checkpoints hold only `trainable_state` (`_save`,
    `_load_from_checkpoint`); the optional regularizer is added to the training loss; the mean
    scalings of the training batches are gathered over all processes at every logging step
    and written to the `ScalingsLog`. Under `torchrun`, DDP is set up with
    `find_unused_parameters=False` (every gate parameter is used at every step) and
    `broadcast_buffers=False` (the frozen experts are buffers that never change; sending them
    from process 0 before every forward would only cost time).

    Args:
        *args, **kwargs: As for `Trainer`.
        regularizer: The optional loss terms; None for none.
        scalings_log: Where to write the mean scalings; None writes nothing.
    """

    def __init__(
        self,
        *args: Any,
        regularizer: GateRegularizer | None = None,
        scalings_log: ScalingsLog | None = None,
        **kwargs: Any,
    ) -> None:
        training_args = kwargs.get("args") or args[1]
        training_args.ddp_find_unused_parameters = False
        training_args.ddp_broadcast_buffers = False
        super().__init__(*args, **kwargs)
        self.regularizer = regularizer or GateRegularizer()
        self.scalings_log = scalings_log
        # Sums since the last log: (L*E) scalings, tokens, balance, entropy, micro-batches.
        self._sums: torch.Tensor | None = None

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        if model.training:
            scalings = outputs["scalings"]  # (B, T, L, E)
            mask = inputs.get("attention_mask")
            balance = entropy = None
            if self.regularizer.active:
                balance, entropy = scaling_terms(scalings, mask)
                extra = (
                    self.regularizer.balance_weight * balance
                    + self.regularizer.entropy_weight * entropy
                )
                loss = loss + extra * self._extra_scale(num_items_in_batch)
            self._accumulate(scalings.detach(), mask, balance, entropy)
        return (loss, outputs) if return_outputs else loss

    def _extra_scale(self, num_items_in_batch: torch.Tensor | int | None) -> float:
        """Factor that makes a per-batch mean term contribute its mean over accumulation.

        Mirrors `Trainer.training_step`: a loss already normalised over the accumulated batch
        is not divided by the accumulation steps afterwards, so the extra term is divided
        here. (DDP averages gradients over processes, which already gives the mean there.)
        """
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            scaled = (
                self.model_accepts_loss_kwargs and num_items_in_batch is not None
            ) or self.compute_loss_func is not None
        return 1.0 / self.current_gradient_accumulation_steps if scaled else 1.0

    def _accumulate(
        self,
        scalings: torch.Tensor,
        mask: torch.Tensor | None,
        balance: torch.Tensor | None,
        entropy: torch.Tensor | None,
    ) -> None:
        batch, tokens, n_layers, n_experts = scalings.shape
        if mask is None:
            weights = scalings.new_ones(batch, tokens, dtype=torch.float64)
        else:
            weights = mask[:, -tokens:].to(torch.float64)  # (B, T)
        usage = torch.einsum("btle,bt->le", scalings.to(torch.float64), weights)  # (L, E)
        extras = [
            weights.sum(),
            balance.detach().double() if balance is not None else weights.new_zeros(()),
            entropy.detach().double() if entropy is not None else weights.new_zeros(()),
            weights.new_ones(()),
        ]
        sums = torch.cat([usage.flatten(), torch.stack(extras)])  # (L*E + 4,)
        self._sums = sums if self._sums is None else self._sums + sums

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._sums is not None:  # a training log, on every process
            sums = self._sums.to(self.args.device)
            if self.accelerator.num_processes > 1:
                sums = self.accelerator.reduce(sums, reduction="sum")
            sums = sums.cpu()
            self._sums = None
            model = self.accelerator.unwrap_model(self.model)
            tokens, balance, entropy, batches = sums[-4:].tolist()
            usage = (sums[:-4] / max(tokens, 1.0)).view(model.n_layers, model.n_experts)
            if self.regularizer.balance_weight:
                logs["balance"] = balance / batches
            if self.regularizer.entropy_weight:
                logs["entropy"] = entropy / batches
            if self.scalings_log is not None and self.is_world_process_zero():
                self.scalings_log.append(self.state.global_step, logs["loss"], usage.float())
        super().log(logs, start_time)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        with warnings.catch_warnings():
            # torch 2.13 prefers `forward_sync_buffers`, which transformers cannot pass yet;
            # `broadcast_buffers=False` still works and is what is meant here.
            warnings.filterwarnings(
                "ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning
            )
            return super().train(*args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.args.should_save:
            return
        folder = Path(output_dir if output_dir is not None else self.args.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model)
        save_file(
            trainable_state(model), folder / TRAINABLE_WEIGHTS_NAME, metadata={"format": "pt"}
        )

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: nn.Module | None = None
    ) -> None:
        path = Path(resume_from_checkpoint) / TRAINABLE_WEIGHTS_NAME
        if not path.is_file():
            raise ValueError(
                f"{resume_from_checkpoint} holds no {TRAINABLE_WEIGHTS_NAME}: it was not written "
                "by gate training. Resume a gate-training output folder, or start over."
            )
        load_trainable_state(self.accelerator.unwrap_model(model or self.model), path)
        logger.info("restored the gate from %s", path)


# ------------------------------------------------------------------------- entry


def train_gate(
    base: str | os.PathLike[str],
    xlora: XLoraConfig,
    data: Sequence[str | os.PathLike[str] | DataSource],
    out: str | os.PathLike[str],
    training: TrainingConfig | None = None,
    regularizer: GateRegularizer | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    dtype: torch.dtype = torch.float32,
    callbacks: Sequence[TrainerCallback] = (),
) -> Path:
    """Train an X-LoRA gate over frozen experts and save the model into `out`.

    Under `torchrun --nproc_per_node N`, each process runs this same call on its share of
    every batch (data parallel; the global batch is N x batch_size x grad_accum).

    Args:
        base: "smollm2" (the embedded SmolLM2-135M-Instruct) or a local transformers folder.
        xlora: The X-LoRA settings; `xlora.adapters` (expert name -> PEFT adapter folder)
            gives the experts, in the order of the expert axis.
        data: JSON Lines files, as paths, "FILE:WEIGHT" strings or `DataSource`s (see
            `loramix.training.data`).
        out: Output folder (see the module docstring for its layout).
        training: The training settings (`batch_size` is per process); `TrainingConfig()`
            if None.
        regularizer: Optional loss terms on the scalings; none if None.
        resume: Continue from the newest checkpoint in `out/checkpoints`; give the same
            experts, data and settings as the interrupted run (max_steps may be raised).
        overwrite: Replace an earlier run in `out` instead of refusing.
        dtype: Dtype of the base model and experts (the gate is trained in float32).
        callbacks: Extra transformers `TrainerCallback`s.

    Returns:
        `out`, which `XLoraModel.from_pretrained(base_model, out)` reads.

    Raises:
        ValueError: On invalid settings, an unreadable expert, experts that do not fit the
            base model, malformed data (naming file and line), or an output folder that holds
            an earlier run or foreign content, or a resumed run whose experts, data or settings
            differ (see `loramix.training.outputs`).
        FileNotFoundError: If the base model, an expert folder or a data file does not exist.
    """
    started = time.time()
    xlora.validate()
    regularizer = regularizer if regularizer is not None else GateRegularizer()
    regularizer.check(xlora)
    if len(xlora.adapters) == 1 and xlora.enable_softmax:
        logger.warning(
            "X-LoRA over one expert (%s) with the softmax on: every scaling is 1, so the gate "
            "has nothing to choose and training cannot change the model (it stays the expert "
            "alone). Add experts, or turn the softmax off (enable_softmax=False, "
            "--no-enable-softmax) to learn how strongly to apply this expert per token.",
            next(iter(xlora.adapters)),
        )
    config = training if training is not None else TrainingConfig()
    if config.keep_best:
        raise ValueError(
            "keep_best is not available for the gate (its checkpoints hold the gate alone); "
            "choose the gate's steps on dev data instead, e.g. with several candidates "
            "(loramix.science.selection)."
        )
    out = Path(out)
    resolve_device(config.device)  # an unavailable device fails before anything loads
    sources = existing_sources(data)  # before loading anything
    plan = check_output(
        out, command=COMMAND, resume=resume, overwrite=overwrite, final_files=GATE_FILES
    )
    loaded = [load_expert(name, path) for name, path in xlora.adapters.items()]

    state = PartialState(cpu=cpu_data_parallel())  # under torchrun: joins the process group
    with progress_bars(config.progress):
        base_model, tokenizer = load_base_model(base, dtype=dtype)
    train, held_out = load_training_data(sources, tokenizer, **config.data_options())
    set_seed(config.seed)  # the gate's initial weights: the same on every process
    model = XLoraModel(base_model, xlora, loaded)
    model.gate.to(torch.float32)
    run = _run_settings(base_model, tokenizer, xlora, sources, config, regularizer, dtype)
    with state.main_process_first():  # process 0 prepares `out`, the others then find it ready
        go = start_output(plan, run, config, write=state.is_main_process)
    if not go:  # a finished run, and no more steps asked for
        return out
    resume_from = plan.resume_from
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if state.is_main_process:
        logger.info(
            "X-LoRA over %d expert(s) on %d adapted modules: %d trainable parameters",
            model.n_experts,
            model.n_layers,
            trainable,
        )

    scalings_log = ScalingsLog(
        out / SCALINGS_LOG_NAME, model.expert_names, xlora.layerwise_scalings
    )
    if state.is_main_process and resume_from is not None:
        scalings_log.truncate(checkpoint_step(resume_from))
    trainer = run_trainer(
        model,
        train,
        held_out,
        collator=PadCollator(pad_token_id(tokenizer)),
        config=config,
        out=out,
        resume_from=resume_from,
        callbacks=callbacks,
        trainer_class=partial(GateTrainer, regularizer=regularizer, scalings_log=scalings_log),
    )
    if state.is_main_process:
        summary = _summary(base, run, config, model, trainer, started)
        with progress_bars(config.progress):
            publish(out, partial(_save_model, model, summary), marker=CONFIG_NAME)
        logger.info("saved the X-LoRA model to %s", out)
    state.wait_for_everyone()
    return out


def _save_model(model: XLoraModel, summary: dict[str, Any], folder: Path) -> None:
    """`publish`'s writer: the model's folder (`loramix.saving`), then the summary beside it."""
    write_folder(model, folder)
    (folder / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")


def _summary(
    base: str | os.PathLike[str],
    run: dict[str, Any],
    config: TrainingConfig,
    model: XLoraModel,
    trainer: Trainer,
    started: float,
) -> dict[str, Any]:
    return {
        **finished_record(COMMAND, base, run, config, trainer.state),
        **{key: run[key] for key in ("xlora", "regularizer", "dtype")},
        "experts": model.xlora_config.adapters,
        "data": [{"path": s["path"], "weight": s["weight"]} for s in run["data"]],
        "world_size": trainer.args.world_size,
        "global_batch": config.batch_size * config.grad_accum * trainer.args.world_size,
        "seconds": round(time.time() - started, 1),
        "expert_names": model.expert_names,
        "adapted_modules": model.adapted_modules,
    }


def _run_settings(
    base_model: nn.Module,
    tokenizer: Any,
    xlora: XLoraConfig,
    sources: Sequence[DataSource],
    config: TrainingConfig,
    regularizer: GateRegularizer,
    dtype: torch.dtype,
) -> dict[str, Any]:
    """What a resumed run must share with the checkpoint's run (see `loramix.training.outputs`)."""
    return {
        "base_model": base_record(base_model),
        "experts": {
            name: {"path": str(Path(path).resolve()), "sha256": folder_digest(path)}
            for name, path in xlora.adapters.items()
        },
        "data": data_settings(sources),
        "xlora": {k: v for k, v in xlora.to_dict().items() if k != "adapters"},
        "training": training_settings(config),
        "regularizer": dataclasses.asdict(regularizer),
        "dtype": str(dtype).removeprefix("torch."),
        "prompts": prompt_record(tokenizer, config.chat),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else float(f"{value:.5g}")
