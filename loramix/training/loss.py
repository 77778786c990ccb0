"""The causal-LM training loss, with logits only where a label counts.

A causal LM's own loss turns every position's last hidden state into `(B, T, vocab)` logits,
upcasts them to float32 and takes the cross entropy of all of them, although only the
labelled positions count. On loramix's training data (prompt/completion pairs with the loss on
the completion) about one position in eight carries a label, and the output head with its
cross entropy is a large share of a step on a small model: SmolLM2-135M's head (576 x 49152)
does a fifth of the forward pass's multiply-adds. `CompletionLossTrainer` asks the model for
one position's logits (`logits_to_keep`, which transformers' causal LMs accept) and its
hidden states, and applies the output embeddings at the labelled positions only; the loss is
the same number, reduced the same way (mean, or sum over `num_items_in_batch`).

That holds only where the logits are `head(last hidden state)`. Some architectures change
them after the head (Gemma 2's soft-capped logits, Cohere's and Granite's scaled ones, a
mixture's router loss), and a trainable head would be called outside the model's forward. So
only the architectures listed in `PLAIN_HEAD_MODEL_TYPES` take this way, and the trainer also
checks once, on its first batch, that both ways give the same loss; any other model keeps its
own loss (the same numbers, only slower), and the log says why.
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

PLAIN_HEAD_MODEL_TYPES = frozenset(
    {
        "falcon",
        "gemma",
        "gpt2",
        "gpt_neox",
        "llama",
        "mistral",
        "olmo2",
        "opt",
        "phi",
        "phi3",
        "qwen2",
        "qwen3",
        "stablelm",
        "starcoder2",
    }
)
"""transformers `model_type`s whose causal-LM logits are `lm_head(last hidden state)` and whose
loss is the plain cross entropy of them (each checked against the model's own loss in the
architecture tests)."""

RELATIVE_TOLERANCE = 1e-3
"""How far (relative) the first batch's two losses may differ: rounding only. Soft-capped or
scaled logits move the loss by percents."""


def labelled_loss(
    head: nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """Next-token cross entropy at the labelled positions, as transformers' causal-LM loss.

    Args:
        head: The output embeddings (hidden size -> vocabulary).
        hidden: `(B, T, D)` last hidden states.
        labels: `(B, T)` token ids, `IGNORE_INDEX` where no loss is taken; position t's
            logits predict label t + 1.
        num_items_in_batch: If given, the summed loss is divided by it (the Trainer's count
            over an accumulated batch); otherwise the mean over labelled positions.

    Returns:
        The scalar loss (float32).
    """
    targets = labels[:, 1:]  # (B, T-1)
    keep = targets != IGNORE_INDEX  # (B, T-1)
    logits = head(hidden[:, :-1][keep]).float()  # (N, vocab), N labelled positions
    if num_items_in_batch is None:
        return F.cross_entropy(logits, targets[keep].to(logits.device))
    loss = F.cross_entropy(logits, targets[keep].to(logits.device), reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def forward_labelled(
    model: nn.Module,
    head: nn.Module,
    inputs: dict[str, Any],
    num_items_in_batch: torch.Tensor | int | None = None,
) -> tuple[torch.Tensor, Any]:
    """Run `model` on a batch for its hidden states and take `labelled_loss` of them.

    Args:
        model: A causal LM that takes `logits_to_keep` and `output_hidden_states`.
        head: Its output embeddings.
        inputs: The batch: input_ids, attention_mask, labels `(B, T)`.
        num_items_in_batch: As for `labelled_loss`.

    Returns:
        The loss, and the model's output with it as `loss` (and the first position's logits,
        all hidden states, and whatever else the model returns).
    """
    features = {key: value for key, value in inputs.items() if key != "labels"}
    # The first position's logits only. An index tensor rather than `logits_to_keep=1`: the
    # int slices the hidden states into a strided view, and on the CPU a bfloat16 matmul of
    # that view copies the whole head per row (850 ms for 8 rows on SmolLM2, against 8.5 ms
    # for the gathered copy an index tensor gives).
    first = torch.zeros(1, dtype=torch.long, device=inputs["labels"].device)
    outputs = model(**features, logits_to_keep=first, output_hidden_states=True)
    loss = labelled_loss(head, outputs.hidden_states[-1], inputs["labels"], num_items_in_batch)
    outputs["loss"] = loss  # where the model's own loss would be
    return loss, outputs


class CompletionLossTrainer(Trainer):
    """transformers' `Trainer`, with the causal-LM loss computed by `labelled_loss`.

    Attributes:
        labelled_logits: None until the first batch, then whether the loss is computed from
            the labelled positions' logits only (True) or by the model itself (False: the
            check found different logits, a trainable head, label smoothing or a custom
            loss function).
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
        if self.labelled_logits is None:
            self.labelled_logits = self._check_labelled_logits(model, inputs)
        if not self.labelled_logits:
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
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        loss, outputs = forward_labelled(model, head, inputs, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # As `Trainer.compute_loss` scales a model's own loss: `num_items_in_batch` counts
            # the tokens of every process, and DDP averages the gradients over processes.
            tensor_parallel = getattr(self, "get_tp_size", lambda: 1)()
            processes = self.accelerator.num_processes // tensor_parallel
            loss = loss * (processes if self.args.n_gpu <= 1 else self.args.n_gpu)
        return loss, outputs

    def _check_labelled_logits(self, model: nn.Module, inputs: dict[str, Any]) -> bool:
        """Whether `labelled_loss` gives the model's own loss on this batch (see the module
        docstring); says why not when it does not."""
        reason = self._unsupported_reason(model, inputs)
        if reason is None:
            was_training = model.training
            model.eval()  # no dropout: both losses must see the same network
            try:
                with torch.no_grad():
                    own = float(super().compute_loss(model, dict(inputs)))
                    mine = float(self._labelled_loss(model, inputs, None)[0])
            except TypeError as error:  # no `logits_to_keep` or `output_hidden_states`
                own = mine = math.nan
                reason = f"the model's forward does not take its arguments ({error})"
            finally:
                model.train(was_training)
            if reason is None and not math.isclose(own, mine, rel_tol=RELATIVE_TOLERANCE):
                reason = (
                    f"the model's logits are not its output embeddings applied to its last "
                    f"hidden state (first batch's loss {own:.6g} vs {mine:.6g}; soft-capped "
                    "or scaled logits?)"
                )
        if reason is not None:
            logger.info("computing the loss from all positions' logits: %s", reason)
            return False
        logger.debug("computing the loss from the labelled positions' logits only")
        return True

    def _unsupported_reason(self, model: nn.Module, inputs: dict[str, Any]) -> str | None:
        """Why `labelled_loss` cannot replace the model's loss, or None."""
        if "labels" not in inputs:
            return "the batch has no labels"
        if self.label_smoother is not None:
            return "label smoothing is on"
        if self.compute_loss_func is not None:
            return "a custom loss function is set"
        unwrapped = self.accelerator.unwrap_model(model)
        model_type = causal_lm_model_type(unwrapped)
        if model_type not in PLAIN_HEAD_MODEL_TYPES:
            return f"model type {model_type!r} is not known to compute plain logits"
        head = unwrapped.get_output_embeddings()
        if head is None:
            return "the model has no output embeddings"
        if any(parameter.requires_grad for parameter in head.parameters()):
            return "the output embeddings are trained"
        if isinstance(head, MixedLora):  # mixes its experts inside the X-LoRA forward only
            return "the output embeddings are an X-LoRA adapted module"
        return None


def causal_lm_model_type(model: nn.Module) -> str | None:
    """The transformers `model_type` of the causal LM under `model` (an X-LoRA or peft model,
    or the LM itself), or None."""
    if isinstance(model, XLoraModel):
        model = model.lm
    config = getattr(model, "config", None)  # a peft model passes it on from its base
    return getattr(config, "model_type", None)
