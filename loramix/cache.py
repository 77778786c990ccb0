"""`XLoraCache`: the KV cache of an X-LoRA model, one cache per pass.

Each forward call of `XLoraModel` runs the base model twice over the same new tokens: the
scaling pass (experts off, giving the gate its hidden states) and the mixed pass. Both passes
attend over the whole past, and their keys and values differ (the mixed pass's projections
carry the experts), so each pass needs its own KV cache:

    cache                 the mixed pass's keys and values   (this object, a DynamicCache)
    cache.scaling_cache   the scaling pass's keys and values (a plain DynamicCache)

With both caches a generation step runs the two passes over the new token only, instead of
re-running the whole sequence twice as X-LoRA's published implementations do.

Everything that changes the batch or the length of one cache (beam-search reordering,
cropping, batch repeat or selection, reset) is applied to both, and to `sequence_state`: the
per-sequence tensors (leading batch axis `B`) that frozen and merged generation keep beside
the cache (see `loramix.generation`), so beams and sequences never lose their scalings.

Two kinds, with the same pairing of the passes (`TwoPassCache`):

    XLoraCache         dynamic: both caches grow with the sequence (the default)
    XLoraStaticCache   static: both caches are allocated once for `max_cache_len` tokens and
                       written in place, so a decode step has fixed shapes and can be captured
                       by `torch.compile` (and CUDA graphs); `generate(...,
                       cache_implementation="static")` makes one

`XLoraModel.forward` (`loramix.model`) fills both caches; frozen and merged generation hand
it a `ScalingsPlan` on `freeze_plan`, which it calls once per step.

Axis names: B batch (sequences or beams), T tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import torch
from transformers import Cache, DynamicCache, PreTrainedConfig, StaticCache

if TYPE_CHECKING:
    from loramix.model import XLoraModel


class ScalingsPlan(Protocol):
    """How one `generate` call forms its scalings; `XLoraModel.forward` calls it once per step.

    `loramix.generation.FreezePlan` (frozen and merged modes) is the implementation. The plan
    either runs `granular` (the scaling pass and the gate) and watches its scalings, or, once
    it has fixed them, returns the fixed ones without a scaling pass.
    """

    def scalings(
        self,
        model: XLoraModel,
        cache: TwoPassCache,
        tokens: int,
        attention_mask: torch.Tensor | None,
        granular: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor] | None, bool]:
        """The scalings of `tokens` new tokens.

        Args:
            model: The X-LoRA model running the step.
            cache: The step's cache (this plan's per-sequence tensors live in it).
            tokens: T, the new tokens of the step.
            attention_mask: `(B, T_past + T)` or None.
            granular: Runs the scaling pass and the gate: `(B, T, L, E)` scalings and their
                top-k mixing.

        Returns:
            `(scalings, mixing, scaled_lora_b, fixed)`: the `(B, T, L, E)` scalings to report
            (before top-k); the mixing the modules use (`(B, T or 1, L, E)`, None once merged);
            each module's B with the scalings folded in, or None; whether the scalings were
            fixed (no scaling pass ran).
        """
        ...


class TwoPassCache(Cache):
    """What both kinds share: a second cache for the scaling pass, kept aligned with this one.

    Attributes:
        scaling_cache: The scaling pass's own KV cache (of the same kind).
        sequence_state: Name -> tensor with a leading batch axis `(B, ...)`; every batch
            operation of the cache is applied to these tensors too.
        freeze_plan: Set by frozen/merged generation for the length of one `generate` call
            (a `ScalingsPlan`: `loramix.generation.FreezePlan`); None means granular scalings.
    """

    scaling_cache: Cache
    sequence_state: dict[str, torch.Tensor]
    freeze_plan: ScalingsPlan | None

    def _init_pass_state(self, scaling_cache: Cache) -> None:
        self.scaling_cache = scaling_cache
        self.sequence_state = {}
        self.freeze_plan = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(mixed_length={int(self.get_seq_length())}, "
            f"scaling_length={int(self.scaling_cache.get_seq_length())}, "
            f"sequence_state={sorted(self.sequence_state)})"
        )

    # ------------------------------------------------------------- kept aligned

    def reset(self) -> None:
        super().reset()
        self.scaling_cache.reset()
        self.sequence_state.clear()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row `i` becomes old row `beam_idx[i]`, in both caches and the state."""
        super().reorder_cache(beam_idx)
        self.scaling_cache.reorder_cache(beam_idx)
        self._map_state(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.scaling_cache.batch_repeat_interleave(repeats)
        self._map_state(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.scaling_cache.batch_select_indices(indices)
        self._map_state(lambda t: t[indices.to(t.device)])

    def crop(self, tokens_to_remove: int) -> None:
        """Removes the last `-tokens_to_remove` tokens (transformers >= 5 counts negatively).

        The scaling cache may be shorter than the mixed one (frozen and merged generation skip
        the scaling pass once the scalings are fixed); it is cut to the same end position,
        never below its own length.
        """
        target = int(self.get_seq_length()) + tokens_to_remove  # tokens_to_remove <= 0
        super().crop(tokens_to_remove)
        excess = int(self.scaling_cache.get_seq_length()) - max(target, 0)
        if excess > 0:
            self.scaling_cache.crop(-excess)

    def activate_past_recording(self) -> None:
        super().activate_past_recording()
        self.scaling_cache.activate_past_recording()

    @property
    def is_croppable(self) -> bool:
        return super().is_croppable and self.scaling_cache.is_croppable

    def _map_state(self, fn: Any) -> None:
        for name, tensor in self.sequence_state.items():
            self.sequence_state[name] = fn(tensor)


class XLoraCache(TwoPassCache, DynamicCache):
    """A `DynamicCache` for the mixed pass that carries a second one for the scaling pass.

    Args:
        config: The base model's config (lets transformers pick sliding-window layers);
            None builds plain layers lazily.
    """

    def __init__(self, config: PreTrainedConfig | None = None, **kwargs: Any) -> None:
        DynamicCache.__init__(self, config=config, **kwargs)
        self._init_pass_state(DynamicCache(config=config, **kwargs))


class XLoraStaticCache(TwoPassCache, StaticCache):
    """A `StaticCache` for the mixed pass that carries a second one for the scaling pass.

    Both are allocated on the first forward call (batch, heads and dtype taken from it) for
    `max_cache_len` tokens each, and written in place. Frozen and merged generation stop
    writing the scaling cache once the scalings are fixed; its slots are then unused.

    Args:
        config: The base model's config.
        max_cache_len: The most tokens (prompt and generated) a sequence may reach.
    """

    def __init__(self, config: PreTrainedConfig, max_cache_len: int, **kwargs: Any) -> None:
        StaticCache.__init__(self, config=config, max_cache_len=max_cache_len, **kwargs)
        self._init_pass_state(StaticCache(config=config, max_cache_len=max_cache_len, **kwargs))
