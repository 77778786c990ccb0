"""Activation (gradient) checkpointing of the mixed pass, in the base model's layers.

The scalings reach the mixing modules through the model's `MixingState`, not through the
layers' inputs, so checkpointing is non-reentrant, with `MixingState.checkpoint_contexts`
as `context_fn` (see `loramix.layer`). `CheckpointingMixin` gives `XLoraModel` the methods
transformers' `Trainer` calls.
"""

from __future__ import annotations

from typing import Any


class CheckpointingMixin:
    """`XLoraModel`'s activation checkpointing; uses its `lm` (the base model) and
    `mixing_state`. Placed before `PreTrainedModel` among the bases, so that these methods
    replace transformers' own."""

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict | None = None, **options: Any
    ) -> None:
        """Activation checkpointing in the base model's layers, for the mixed pass's backward.

        Also reached through transformers' `activation_checkpointing_enable` and the
        Trainer's `gradient_checkpointing=True`. The gate's gradient flows back through every
        layer of the mixed pass, so on a large base model the saved activations dominate
        training memory; checkpointing keeps one tensor per layer and recomputes the rest in
        the backward pass. Gradients equal those without it (up to float rounding).

        The scalings reach the mixing modules through the model's `MixingState`, not through
        the layers' inputs, so checkpointing must be non-reentrant, with loramix's
        `context_fn` giving each recompute the scalings of its own forward call.

        Args:
            gradient_checkpointing_kwargs: For `torch.utils.checkpoint.checkpoint`, except
                `use_reentrant=True` and `context_fn`, which are refused.
            **options: Passed to the base model's method (e.g. `every_n_layers`).
        """
        kwargs = dict(gradient_checkpointing_kwargs or {})
        if kwargs.get("use_reentrant", False):
            raise ValueError(
                "gradient_checkpointing_kwargs use_reentrant=True: reentrant checkpointing "
                "drops the gate's gradient (the scalings are not inputs of the checkpointed "
                "layers); leave use_reentrant out or set it to False."
            )
        if "context_fn" in kwargs:
            raise ValueError(
                "gradient_checkpointing_kwargs context_fn: loramix sets its own, which gives "
                "each recomputed layer the scalings of its forward call; leave it out."
            )
        kwargs.update(use_reentrant=False, context_fn=self.mixing_state.checkpoint_contexts)
        had_input_hooks = bool(getattr(self.lm, "_require_grads_hooks", None))
        enable = getattr(self.lm, "activation_checkpointing_enable", None)
        if enable is None:  # transformers releases before the rename
            enable = self.lm.gradient_checkpointing_enable
        enable(kwargs, **options)
        if not had_input_hooks:  # only reentrant checkpointing needs the embeddings' hook
            self.lm.disable_input_require_grads()

    def gradient_checkpointing_disable(self) -> None:
        """Turns activation checkpointing off in the base model's layers."""
        disable = getattr(self.lm, "activation_checkpointing_disable", None)
        if disable is None:
            disable = self.lm.gradient_checkpointing_disable
        disable()

    @property
    def checkpointing_activations(self) -> bool:
        """Whether any layer of the base model checkpoints its activations."""
        return any(getattr(module, "gradient_checkpointing", False) for module in self.lm.modules())
