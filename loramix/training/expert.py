"""Train one LoRA expert: a plain PEFT LoRA adapter on a base model, from JSON Lines data.

The experts of an X-LoRA mixture are ordinary LoRA adapters (Hu et al. 2021,
https://arxiv.org/abs/2106.09685), each fine-tuned on one domain. This module trains one with
peft (`LoraConfig` + `get_peft_model`) and transformers' `Trainer`, and writes a standard PEFT
adapter folder (`adapter_config.json` + `adapter_model.safetensors`) that `PeftModel`,
`loramix.experts` and any PEFT tool can load.

Data reading and masking live in `loramix.training.data`, the Trainer plumbing (checkpoints, resume,
atomic publishing of the result) in `loramix.training.trainer`; this module only adds the LoRA part.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import PreTrainedModel, TrainerCallback, set_seed

from loramix.checks import is_int, raise_problems
from loramix.records import TRAINING_RECORD_NAME, base_record, prompt_record
from loramix.smollm2 import load_base_model, resolve_device
from loramix.training.data import PadCollator, load_held_out, load_training_data, pad_token_id
from loramix.training.jsonl import DataSource, existing_sources
from loramix.training.outputs import (
    check_output,
    data_settings,
    finished_record,
    start_output,
    training_settings,
    write_record,
)
from loramix.training.trainer import (
    TrainingConfig,
    check_held_out,
    progress_bars,
    publish,
    run_trainer,
)

logger = logging.getLogger(__name__)

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The seven linear projections of a Llama decoder layer (attention and MLP)."""

COMMAND = "train-expert"
ADAPTER_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "README.md",
    TRAINING_RECORD_NAME,
)
"""Files of the result; `adapter_config.json` is written last and marks it complete."""


@dataclass(frozen=True)
class LoraSettings:
    """Shape of the LoRA adapter.

    Attributes:
        rank: Rank r of the update B @ A.
        alpha: Scale numerator: the update is multiplied by alpha / rank.
        targets: Names of the linear modules to adapt (the last part of the module path,
            e.g. "q_proj").
        dropout: Dropout on the adapter's input during training.
    """

    rank: int = 8
    alpha: float = 16
    targets: tuple[str, ...] = LLAMA_TARGETS
    dropout: float = 0.05

    def __post_init__(self) -> None:
        problems = []
        if not is_int(self.rank) or self.rank < 1:
            problems.append(f"rank={self.rank!r}: use a whole number >= 1, e.g. 8.")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            problems.append(f"alpha={self.alpha!r}: use a positive number, e.g. 2 x rank.")
        if isinstance(self.targets, str) or not self.targets:
            problems.append(
                f"targets={self.targets!r}: give a non-empty sequence of module names, "
                f"e.g. {LLAMA_TARGETS}."
            )
        if not 0 <= self.dropout < 1:
            problems.append(f"dropout={self.dropout}: use a probability in [0, 1).")
        raise_problems("Invalid LoraSettings", problems)

    def peft_config(self) -> LoraConfig:
        """The equivalent peft `LoraConfig` for a causal LM."""
        return LoraConfig(
            task_type="CAUSAL_LM",
            r=self.rank,
            lora_alpha=self.alpha,
            target_modules=list(self.targets),
            lora_dropout=self.dropout,
            bias="none",
        )


def train_expert(
    base: str | os.PathLike[str],
    data: Sequence[str | os.PathLike[str] | DataSource],
    out: str | os.PathLike[str],
    lora: LoraSettings | None = None,
    training: TrainingConfig | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    dtype: torch.dtype = torch.float32,
    callbacks: Sequence[TrainerCallback] = (),
    eval_data: Sequence[str | os.PathLike[str] | DataSource] = (),
) -> Path:
    """Train one LoRA adapter on `base` and save it as a PEFT adapter folder in `out`.

    Args:
        base: "smollm2" (the embedded SmolLM2-135M-Instruct) or a local transformers folder.
        data: JSON Lines files, as paths, "FILE:WEIGHT" strings or `DataSource`s (see
            `loramix.training.data` for the accepted line shapes and how weights mix files).
        out: Output folder: the adapter files, and checkpoints in `out/checkpoints`.
        lora: The adapter's shape; `LoraSettings()` if None.
        training: The training settings; `TrainingConfig()` if None.
        resume: Continue from the newest checkpoint in `out/checkpoints`; give the same data
            and settings as the interrupted run (max_steps may be raised).
        overwrite: Replace an earlier run in `out` instead of refusing.
        dtype: Dtype of the base weights (the adapter is trained in float32).
        callbacks: Extra transformers `TrainerCallback`s.
        eval_data: JSON Lines files (e.g. a dev split) for the held-out loss, used whole;
            the training files are then not split (`eval_fraction` is set to 0). With
            `training.keep_best`, the adapter is the checkpoint that did best on them.

    Returns:
        `out`, holding `adapter_config.json` and `adapter_model.safetensors`.

    Raises:
        ValueError: On invalid settings, malformed data (naming file and line), targets the
            model lacks, an output folder with foreign content or an earlier run, or a resumed
            run whose data or settings differ (see `loramix.training.outputs`).
        FileNotFoundError: If the base model or a data file does not exist.
    """
    lora = lora if lora is not None else LoraSettings()
    config = training if training is not None else TrainingConfig()
    out = Path(out)
    resolve_device(config.device)  # an unavailable device fails before anything loads
    sources = existing_sources(data)  # before loading anything
    eval_sources = existing_sources(eval_data) if eval_data else []
    if eval_sources:
        config = dataclasses.replace(config, eval_fraction=0.0)
    plan = check_output(
        out, command=COMMAND, resume=resume, overwrite=overwrite, final_files=ADAPTER_FILES
    )

    with progress_bars(config.progress):
        model, tokenizer = load_base_model(base, dtype=dtype)
    check_targets(model, lora.targets)
    train, held_out = load_training_data(sources, tokenizer, **config.data_options())
    if eval_sources:
        held_out = load_held_out(
            eval_sources, tokenizer, max_length=config.max_length, chat=config.chat
        )
    check_held_out(config, held_out)  # before `start_output` touches `out`
    run = {
        "base_model": base_record(model),
        "data": data_settings(sources),
        **({"eval_data": data_settings(eval_sources)} if eval_sources else {}),
        "lora": dataclasses.asdict(lora),
        "training": training_settings(config),
        "dtype": str(dtype).removeprefix("torch."),
        "prompts": prompt_record(tokenizer, config.chat),
    }
    if not start_output(plan, run, config):  # a finished run, and no more steps asked for
        return out
    set_seed(config.seed)  # the adapter's initial A matrices
    with warnings.catch_warnings():
        # peft reads transformers' deprecated `is_gradient_checkpointing` alias; nothing the
        # user or loramix can change, and harmless until transformers 6 removes it.
        warnings.filterwarnings(
            "ignore",
            message="`is_gradient_checkpointing` is deprecated",
            category=FutureWarning,
            module="transformers.modeling_utils",
        )
        peft_model = get_peft_model(model, lora.peft_config())
    trainable, total = peft_model.get_nb_trainable_parameters()
    logger.info(
        "LoRA r=%d on %s: %d trainable of %d parameters", lora.rank, lora.targets, trainable, total
    )

    trainer = run_trainer(
        peft_model,
        train,
        held_out,
        collator=PadCollator(pad_token_id(tokenizer)),
        config=config,
        out=out,
        resume_from=plan.resume_from,
        callbacks=callbacks,
    )
    # A real base name (the embedded SmolLM2's hub name, or the folder's absolute path), so
    # that peft's loaders and `loramix generate` know which base the adapter belongs to.
    base_name = run["base_model"]["name"] or os.fspath(base)
    peft_model.peft_config["default"].base_model_name_or_path = base_name
    record = finished_record(COMMAND, base, run, config, trainer.state)
    with progress_bars(config.progress):
        publish(out, partial(_save_adapter, peft_model, record), marker="adapter_config.json")
    logger.info("saved the adapter to %s", out)
    return out


def check_targets(model: PreTrainedModel, targets: Sequence[str]) -> None:
    """Raise unless every target names at least one `nn.Linear` of the model.

    Raises:
        ValueError: Naming the missing targets and the linear module names the model has.
    """
    linear = {
        name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)
    }
    missing = sorted(set(targets) - linear)
    if missing:
        raise ValueError(
            f"LoRA targets {missing} match no linear layer of {type(model).__name__}. "
            f"Its linear layers are named {sorted(linear)}; pick targets among them."
        )


def _save_adapter(model: PeftModel, record: dict, folder: Path) -> None:
    # The targets are linear layers (`check_targets`), so there are no embedding weights to
    # save; saying so keeps peft from looking the base model's name up on the model hub.
    model.save_pretrained(str(folder), save_embedding_layers=False)
    write_record(folder, record)
