"""Fixed mixes of the experts: `fixed_scalings`, `mix_weights` and `merge_and_unload`.

A fixed mix replaces the scaling pass and the gate with given weights, `(E,)` per expert or
`(L, E)` per adapted module too (one-hot: one expert alone; `1 / E` each: the uniform
average). `FixedMixMixin` gives `XLoraModel` these methods; the model's `forward` asks
`_fixed_mix` for the scalings while a `fixed_scalings` block is active, and
`merge_and_unload` folds a mix into the base weights for good.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from transformers import PreTrainedModel

from loramix.checks import is_finite


class FixedMixMixin:
    """`XLoraModel`'s fixed mixes; uses its `gate`, `mixed_modules()`, `expert_names`,
    `n_layers`, `n_experts`, `xlora_config`, `tied_adapted_weights()` and `unload()`, and
    the `_fixed_scalings` / `_fixed_scaled_b` state its `__init__` sets to None."""

    @property
    def has_fixed_scalings(self) -> bool:
        """Whether a `fixed_scalings` block is active (no scaling pass, no gate)."""
        return self._fixed_scalings is not None

    @contextmanager
    def fixed_scalings(self, weights: torch.Tensor, per_sequence: bool = False) -> Iterator[None]:
        """Inside this block every token is mixed with fixed, given weights.

        The scaling pass, the gate and top-k are skipped: `weights` are used exactly as given.
        One-hot weights give one expert alone (plain LoRA); `1 / E` each gives the uniform
        average of the experts. A cache filled inside the block has no scaling-pass half, so
        it cannot be continued with per-token scalings outside it. Works with `generate`
        (every scalings mode then behaves alike: the mix is already fixed).

        One mix for all sequences is folded into each module's B once per block (under
        `no_grad`, with frozen experts), as frozen generation does. Different mixes per
        sequence are applied as per-sequence rank weights, `(B, 1, R)` per module and call:
        of the exact ways measured (`benchmarks/batched_mixes.py`: per-sequence scaled B or A
        with a batched matmul), the fastest, since it reads the stacked experts once for the
        whole batch.

        Args:
            weights: `(E,)` one weight per expert, or `(L, E)` per adapted module too; with
                `per_sequence=True`, `(B, E)` or `(B, L, E)`: row `b` mixes sequence `b`, and
                every forward call inside the block must have batch `B`.
            per_sequence: Whether the first axis of `weights` is the batch.
        """
        n_layers, n_experts = self.n_layers, self.n_experts
        weights = torch.as_tensor(weights)
        if per_sequence:
            if weights.ndim == 2 and weights.shape[1] == n_experts:
                weights = weights[:, None].expand(-1, n_layers, -1)  # (B, L, E)
            if weights.ndim != 3 or weights.shape[1:] != (n_layers, n_experts):
                raise ValueError(
                    f"per-sequence fixed scalings of shape {tuple(weights.shape)}: give "
                    f"(B, {n_experts}) (one mix per sequence) or (B, {n_layers}, {n_experts}) "
                    "(per module too)"
                )
        elif weights.shape in ((n_experts,), (n_layers, n_experts)):
            weights = weights.expand(n_layers, n_experts)[None]  # (1, L, E)
        else:
            raise ValueError(
                f"fixed scalings of shape {tuple(weights.shape)}: give ({n_experts},) "
                f"(one per expert) or ({n_layers}, {n_experts}) (per module too); for one mix "
                "per sequence pass per_sequence=True"
            )
        reference = self.gate.layers[-1].weight
        weights = weights.to(device=reference.device, dtype=reference.dtype)
        if weights.shape[0] > 1 and torch.equal(weights, weights[:1].expand_as(weights)):
            weights = weights[:1]  # (1, L, E): one mix after all, folded into B below
        previous = self._fixed_scalings, self._fixed_scaled_b
        self._fixed_scalings = weights[:, None]  # (B or 1, 1, L, E)
        self._fixed_scaled_b = None  # formed on first use (one mix only)
        try:
            yield
        finally:
            self._fixed_scalings, self._fixed_scaled_b = previous

    def _fixed_mix(self, batch: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Inside `fixed_scalings`: scalings `(B, T, L, E)`, mixing, and maybe scaled B."""
        fixed = self._fixed_scalings  # (1 or B, 1, L, E)
        if fixed.shape[0] not in (1, batch):
            raise ValueError(
                f"fixed_scalings holds {fixed.shape[0]} per-sequence mixes but this call has "
                f"batch {batch}; give one row per sequence of the batch"
            )
        scalings = fixed.expand(batch, tokens, -1, -1)  # (B, T, L, E)
        shared = fixed.shape[0] == 1  # one mix for all (equal rows were folded on entry)
        if not shared or torch.is_grad_enabled() or self.xlora_config.use_trainable_adapters:
            return scalings, fixed, None  # rank weights (B or 1, 1, R) per module
        if self._fixed_scaled_b is None:
            self._fixed_scaled_b = [
                m.scaled_lora_b(fixed[0, 0, m.layer_index]) for m in self.mixed_modules()
            ]
        return scalings, fixed, self._fixed_scaled_b

    def mix_weights(self, weights: torch.Tensor | Mapping[str, float]) -> torch.Tensor:
        """`(L, E)` float32 weights of a fixed mix given as `(E,)`, `(L, E)` or a dict.

        Raises:
            ValueError: On another shape, or a dict naming an unknown expert or a weight that
                is not a finite number.
        """
        if isinstance(weights, Mapping):
            unknown = sorted(set(weights) - set(self.expert_names))
            bad = {k: v for k, v in weights.items() if not is_finite(v)}
            if unknown or bad:
                raise ValueError(
                    f"mix weights: unknown expert(s) {unknown} (the experts are "
                    f"{self.expert_names}); weights that are not finite numbers {bad}. Give "
                    "expert name -> number; experts left out weigh 0."
                )
            weights = torch.tensor([float(weights.get(n, 0.0)) for n in self.expert_names])
        weights = torch.as_tensor(weights, dtype=torch.float32)
        if weights.shape not in ((self.n_experts,), (self.n_layers, self.n_experts)):
            raise ValueError(
                f"fixed scalings of shape {tuple(weights.shape)}: give ({self.n_experts},) "
                f"(one per expert) or ({self.n_layers}, {self.n_experts}) (per module too)"
            )
        return weights.expand(self.n_layers, self.n_experts)  # (L, E)

    def merge_and_unload(self, weights: torch.Tensor | Mapping[str, float]) -> PreTrainedModel:
        """Folds a fixed mix of the experts into the base weights; returns the base model.

        Every adapted module `l` gets `W + g * sum_i w[l, i] * scale_i * B_i A_i` and is put
        back as the original `nn.Linear` / `Conv1D` / `nn.Embedding`, so the result is a
        plain transformers model for any runtime (`save_pretrained`, export, serving). It
        computes what `with model.fixed_scalings(weights):` computes (no gate, no scaling
        pass), up to float rounding. The base model's weights are changed in place; this
        X-LoRA model is unusable afterwards (as peft's `merge_and_unload`).

        Args:
            weights: `(E,)` one weight per expert (e.g. one-hot: one expert alone; `1 / E`
                each: the uniform average), `(L, E)` per adapted module too, or a dict
                expert name -> weight (experts left out weigh 0).

        Raises:
            ValueError: On weights of another shape or with unknown names, or when an adapted
                module shares its weight with another module (tied input and output
                embeddings: merging would change both, the mix changes only one).
        """
        mix = self.mix_weights(weights)  # (L, E)
        tied = self.tied_adapted_weights()
        if tied:
            raise ValueError(
                f"merge_and_unload: the weights of {tied} are tied to another module (e.g. the "
                "output layer shares the input embeddings), so folding the mix into them would "
                "change that module too. Untie them first (copy the weight into a new "
                "nn.Parameter on one side), or mix with `fixed_scalings` instead."
            )
        with torch.no_grad():
            for layer, module in enumerate(self.mixed_modules()):
                merged = module.merged_weight(mix[layer].to(module.lora_a.device))
                module.base_layer.weight.copy_(merged)
        return self.unload()
