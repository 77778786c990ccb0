"""The causal-LM loss (training) and NLL sums (evaluation), with logits only where a label counts.

A causal LM's own loss turns every position's last hidden state into `(B, T, vocab)` logits,
upcasts them to float32 and takes the cross entropy of all of them, although only the
labelled positions count. On loramix's training data (prompt/completion pairs with the loss on
the completion) about one position in seven carries a label, and the output head with its
cross entropy is a large share of a step on a small model: SmolLM2-135M's head (576 x 49152)
does about a fifth of the forward pass's multiply-adds (timings in BENCHMARKS.md).

`CompletionLossTrainer` passes the model a boolean `(B, T)` `logits_to_keep` mask of the
positions whose next token is labelled: transformers' causal LMs then apply their head, and
whatever their architecture does after it (Gemma 2's soft cap, Granite's scaling), at those
positions only, and return `(N, vocab)` logits. The cross entropy of these is the model's own
loss, reduced the same way (mean, or sum over `num_items_in_batch`).

Where that cannot be known to hold the trainer keeps the model's own loss (the same numbers,
only slower) and logs why: a model type not listed in `LABELLED_LOGITS_MODEL_TYPES` (each one
is checked against its own loss in the architecture tests), an X-LoRA model whose experts
adapt the head (its per-token mixing needs every position), router losses added to the loss,
label smoothing or a custom loss function, DataParallel over several GPUs, sequence or
context parallelism, and evaluation (whose predictions are full logits). It also compares
both losses once, on the first batch with a label, and keeps the model's own if they differ
or if the model does not take the mask.

The evaluation (`loramix.evaluation.runner`) sums each example's NLL the same way
(`RowNlls`, `row_nlls`), under the same conditions (`labelled_logits_reason`).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer

from loramix.layer import MixedLora
from loramix.model import XLoraModel
from loramix.training.data import IGNORE_INDEX

logger = logging.getLogger(__name__)

LABELLED_LOGITS_MODEL_TYPES = frozenset(
    {
        "falcon",
        "gemma",
        "gemma2",
        "gemma3_text",
        "gpt2",
        "gpt_neox",
        "granite",
        "llama",
        "mistral",
        "mixtral",
        "olmo2",
        "opt",
        "phi",
        "phi3",
        "qwen2",
        "qwen2_moe",
        "qwen3",
        "stablelm",
        "starcoder2",
    }
)
"""transformers `model_type`s whose causal LM takes a boolean `logits_to_keep` mask and whose
loss is the plain cross entropy of its logits (each checked in the architecture tests)."""

RELATIVE_TOLERANCE = 1e-3
"""How far (relative) the first labelled batch's two losses may differ: rounding only."""


def labelled_positions(labels: torch.Tensor) -> torch.Tensor:
    """`(B, T)` labels -> `(B, T)` bool, True where the next token is labelled (position t's
    logits predict label t + 1; the last position predicts nothing)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def forward_labelled(
    model: nn.Module,
    inputs: dict[str, Any],
    num_items_in_batch: torch.Tensor | int | None = None,
) -> tuple[torch.Tensor, Any]:
    """Run `model` for the logits of the labelled positions only, and their cross entropy.

    Args:
        model: A causal LM that takes a boolean `(B, T)` `logits_to_keep`.
        inputs: The batch: `(B, T)` input_ids, attention_mask and labels (`IGNORE_INDEX`
            where no loss is taken).
        num_items_in_batch: If given, the summed loss is divided by it (the Trainer's count
            over an accumulated batch); otherwise the mean over labelled positions, as
            transformers' causal-LM loss.

    Returns:
        The float32 loss, and the model's output with it as `loss` (its `logits` are
        `(N, vocab)`, N the labelled positions in row order).

    Raises:
        ValueError: If the model did not return one row of logits per labelled position
            (it does not take a boolean `logits_to_keep`).
    """
    logits, targets, _, outputs = _labelled_logits(model, inputs)  # (N, vocab), (N,)
    if num_items_in_batch is None:
        loss = F.cross_entropy(logits.float(), targets)
    else:
        loss = F.cross_entropy(logits.float(), targets, reduction="sum")
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    outputs["loss"] = loss  # where the model's own loss would be
    return loss, outputs


def _labelled_logits(
    model: nn.Module, inputs: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
    """The model's `(N, vocab)` logits at the labelled positions, their `(N,)` targets (on the
    logits' device), the `(B, T)` mask of those positions, and the model's output."""
    labels = inputs["labels"]
    keep = labelled_positions(labels)  # (B, T)
    features = {key: value for key, value in inputs.items() if key != "labels"}
    outputs = model(**features, logits_to_keep=keep, return_dict=True)
    logits = outputs.logits  # (N, vocab)
    count = int(keep.sum())
    if logits.dim() != 2 or logits.shape[0] != count:
        raise ValueError(
            f"the model returned logits of shape {tuple(logits.shape)} for a boolean "
            f"logits_to_keep with {count} positions; it does not take such a mask"
        )
    targets = labels[:, 1:][labels[:, 1:] != IGNORE_INDEX].to(logits.device)  # (N,)
    return logits, targets, keep, outputs


def row_nlls(
    model: nn.Module, inputs: dict[str, Any], *, labelled: bool
) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Each row's summed next-token NLL over its labelled positions, and their number.

    Args:
        model: A causal LM.
        inputs: `(B, T)` input_ids, attention_mask and labels, as for `forward_labelled`.
        labelled: Compute the logits of the labelled positions only (the model must take a
            boolean `logits_to_keep`; see `labelled_logits_reason`), else all of them.

    Returns:
        `(B,)` float32 NLL sums and `(B,)` counts (on the CPU), and the model's output.
    """
    labels = inputs["labels"]
    if labelled:
        logits, targets, keep, outputs = _labelled_logits(model, inputs)
        token_nll = F.cross_entropy(logits.float(), targets, reduction="none")  # (N,)
        rows = keep.nonzero(as_tuple=True)[0].to(token_nll.device)  # (N,) row of each
        sums = token_nll.new_zeros(labels.shape[0]).index_add_(0, rows, token_nll)  # (B,)
    else:
        features = {key: value for key, value in inputs.items() if key != "labels"}
        outputs = model(**features, return_dict=True)
        logits = outputs.logits[:, :-1].float()  # (B, T-1, vocab): t predicts token t + 1
        targets = labels[:, 1:].to(logits.device)  # (B, T-1)
        sums = F.cross_entropy(
            logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
        ).sum(dim=1)  # (B,), ignored positions count 0
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)  # (B,)
    return sums.cpu(), counts.cpu(), outputs


def labelled_logits_reason(model: nn.Module) -> str | None:
    """Why `model`'s loss cannot be taken from its labelled positions' logits, or None."""
    model_type = causal_lm_model_type(model)
    if model_type not in LABELLED_LOGITS_MODEL_TYPES:
        return f"model type {model_type!r} is not among those checked for it"
    config = model.lm.config if isinstance(model, XLoraModel) else getattr(model, "config", None)
    if getattr(config, "output_router_logits", False):
        return "its loss adds the router's auxiliary loss"
    if isinstance(model, XLoraModel) and isinstance(model.lm.get_output_embeddings(), MixedLora):
        return "experts adapt the output head, whose per-token mixing needs every position"
    return None


class RowNlls:
    """`row_nlls` over the batches of one evaluation: from the labelled positions' logits where
    `labelled_logits_reason` allows it, from all logits otherwise, and from then on also if the
    model turns out not to take the mask (logged once).

    Args:
        model: The evaluated causal LM.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        reason = labelled_logits_reason(model)
        self.labelled = reason is None
        if reason is not None:
            logger.info("the NLL takes every position's logits: %s", reason)

    def __call__(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """`(B,)` NLL sums, `(B,)` labelled counts and the model's output; see `row_nlls`."""
        if self.labelled:
            try:
                return row_nlls(self.model, inputs, labelled=True)
            except (TypeError, ValueError) as error:  # e.g. logits of every position came back
                self.labelled = False
                logger.info("the NLL takes every position's logits: %s", error)
        return row_nlls(self.model, inputs, labelled=False)


class CompletionLossTrainer(Trainer):
    """transformers' `Trainer`, with the training loss from `forward_labelled`.

    Attributes:
        labelled_logits: None until the first training batch with a label, then whether
            training batches take `forward_labelled` (True) or the model's own loss (False;
            the log says why). Evaluation always takes the model's own loss.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.labelled_logits: bool | None = None

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        if model.training and self.labelled_logits is None and _has_labels(inputs):
            self.labelled_logits = self._check_labelled_logits(model, inputs)
        if not (model.training and self.labelled_logits):
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        loss, outputs = self._labelled_loss(model, inputs, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def _labelled_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: torch.Tensor | int | None,
    ) -> tuple[torch.Tensor, Any]:
        """`forward_labelled`'s loss, reduced and scaled as `Trainer.compute_loss` does a
        model's own loss, and the model's output."""
        if not self.model_accepts_loss_kwargs:  # the model's loss would be a plain mean
            num_items_in_batch = None
        loss, outputs = forward_labelled(model, inputs, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # As `Trainer.compute_loss` scales a model's own loss: `num_items_in_batch` counts
            # the tokens of every process, and DDP averages the gradients over processes.
            tensor_parallel = getattr(self, "get_tp_size", lambda: 1)()
            loss = loss * (self.accelerator.num_processes // tensor_parallel)
        return loss, outputs

    def _check_labelled_logits(self, model: nn.Module, inputs: dict[str, Any]) -> bool:
        """Whether `forward_labelled` gives the model's own loss on this batch (see the module
        docstring); logs why not when it does not. (Both forward calls also reach an X-LoRA
        model's own scalings log, where that is switched on.)"""
        reason = self._unsupported_reason(model, inputs)
        if reason is None:
            model.eval()  # no dropout: both losses must see the same network
            try:
                with torch.no_grad():
                    own = float(super().compute_loss(model, dict(inputs)))
                    mine = float(forward_labelled(model, inputs)[0])
                if not math.isclose(own, mine, rel_tol=RELATIVE_TOLERANCE):
                    reason = f"its loss differs (first labelled batch: {own:.6g} vs {mine:.6g})"
            except Exception as error:  # noqa: BLE001 - any failure means: keep the model's loss
                reason = f"computing the labelled positions' logits failed ({error})"
            finally:
                model.train()
        if reason is not None:
            logger.info("training takes the model's own loss over all positions: %s", reason)
            return False
        logger.debug("training takes the loss from the labelled positions' logits only")
        return True

    def _unsupported_reason(self, model: nn.Module, inputs: dict[str, Any]) -> str | None:
        """Why `forward_labelled` cannot replace the model's loss here, or None."""
        if self.label_smoother is not None:
            return "label smoothing is on"
        if self.compute_loss_func is not None:
            return "a custom loss function is set"
        if self.args.n_gpu > 1:
            return "DataParallel over several GPUs"
        parallelism = getattr(self.accelerator, "parallelism_config", None)
        split = parallelism is not None and (
            getattr(parallelism, "sp_enabled", False) or getattr(parallelism, "cp_enabled", False)
        )
        if split or "shift_labels" in inputs:
            return "sequence or context parallelism"
        return labelled_logits_reason(self.accelerator.unwrap_model(model))


def _has_labels(inputs: dict[str, Any]) -> bool:
    labels = inputs.get("labels")
    return labels is not None and bool((labels[:, 1:] != IGNORE_INDEX).any())


def causal_lm_model_type(model: nn.Module) -> str | None:
    """The transformers `model_type` of the causal LM under `model` (an X-LoRA or peft model,
    or the LM itself), or None."""
    if isinstance(model, XLoraModel):
        model = model.lm
    config = getattr(model, "config", None)  # a peft model passes it on from its base
    return getattr(config, "model_type", None)
