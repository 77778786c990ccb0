"""Generation with X-LoRA: granular, frozen and merged scalings.

`XLoraModel.generate` is transformers' own `generate` (greedy, sampling, beam search,
stopping criteria, streamers) with an `XLoraCache`, so every step runs the scaling pass and
the mixed pass over the new tokens only. The keyword `scalings_mode` picks how the experts'
scalings are formed:

granular (default)
    Each token gets its own scalings from the gate: both passes run at every step. Logits
    equal a full no-cache recomputation of X-LoRA.

frozen (mistral.rs calls it "non-granular")
    The prompt is processed exactly as in granular mode. Then each sequence `b` gets one set
    of scalings, kept for the rest of the call, and the scaling pass is skipped:

        fixed[b, l, e] = sum_t m[b, t] * s[b, t, l, e] / sum_t m[b, t]

    where `s` are the gate's scalings (after its softmax, before top-k) and `m[b, t]` is 1
    for a real (attention mask 1, not padding) token of sequence `b` inside the window, else
    0. The window is the prompt (`freeze_after=0`), or the first `freeze_after` generated
    tokens, which are themselves generated in granular mode (the scalings of a generated
    token are those computed when it is fed back as input). Top-k (`top_k_lora`,
    `enable_softmax_topk`) is then applied to `fixed` as to any scalings, and `g`
    (`global_scaling_weight`) multiplies as usual. A sequence with no real token in the
    window gets all-zero scalings (experts off). With a softmax gate the averages still sum
    to 1 over experts.

merged
    As frozen, then the fixed mix of every adapted module `l` is folded into its weight,
    with `m = top_k(fixed)` the scalings the modules would use:

        W_l' = W_l + g * sum_i m[l, i] * scale_i * B_i A_i = W_l + delta_weight(m[l])

    (one fused GEMM per module, `MixedLora.merged_weight`)

    so every later token costs what the base model costs. `W_l'` is a new tensor: the
    original tensor is kept untouched and put back when the call ends, also on an error or a
    KeyboardInterrupt, so the restored weights are the original ones bit for bit (nothing is
    subtracted). One set of weights serves the whole batch, so a joint merge needs every
    sequence to share its fixed scalings (batch 1, the beams or returned sequences of one
    prompt, identical prompts). A batch of different prompts is generated one sequence at a
    time, each merged on its own, and the outputs are right-padded with `pad_token_id` to one
    length; where that is impossible (`return_dict_in_generate=True`, a streamer, a cache
    passed in) the call runs in frozen mode and logs a warning. It also falls back to frozen
    mode (with a warning) when an adapted weight is shared with another module (tied
    embeddings) or offloaded by accelerate (on the meta device), and when sequences end up
    with different fixed scalings (`freeze_after > 0` with sampling or beam search). For a
    batch of different prompts frozen mode is usually the faster one: it keeps the batch
    together. On a quantized base merged mode is refused (an exact merge would need the
    weights in float); frozen mode gives the same scalings there.

The scalings log (`XLoraModel.enable_scalings_logging`) keeps one `(B, T, L, E)` entry per
forward call in every mode; in frozen and merged steps the entry is `fixed` expanded over T.

Axis names: B batch (sequences or beams), T tokens, L adapted modules, E experts.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin

from loramix.cache import TwoPassCache
from loramix.checks import is_int, raise_problems
from loramix.gate import select_top_k
from loramix.layer import is_quantized
from loramix.modes import SCALINGS_MODES

if TYPE_CHECKING:
    from loramix.model import XLoraModel

logger = logging.getLogger(__name__)


# Names of the per-sequence tensors a FreezePlan keeps in `XLoraCache.sequence_state`.
_SUM = "frozen_scalings_sum"  # (B, L, E) float32, sum over the window's real tokens so far
_COUNT = "frozen_scalings_count"  # (B,) float32, real tokens of the window seen so far
_FIXED = "frozen_scalings"  # (B, L, E) the averaged scalings (before top-k)
_MIXING = "frozen_mixing"  # (B, 1, L, E) the fixed scalings after top-k, as the modules use them


def check_generation_options(scalings_mode: str, freeze_after: int) -> None:
    """Raises one `ValueError` naming each bad option and its fix."""
    problems = []
    if scalings_mode not in SCALINGS_MODES:
        problems.append(f"scalings_mode={scalings_mode!r}: use one of {', '.join(SCALINGS_MODES)}")
    if not is_int(freeze_after) or freeze_after < 0:
        problems.append(
            f"freeze_after={freeze_after!r}: use an int >= 0 (0 averages the prompt's scalings, "
            "k > 0 those of the first k generated tokens)"
        )
    elif freeze_after > 0 and scalings_mode == "granular":
        problems.append(
            f"freeze_after={freeze_after} applies to scalings_mode 'frozen' or 'merged' "
            "(granular mixes each token afresh and would ignore it); pick one of those modes "
            "or leave freeze_after at 0"
        )
    raise_problems("Invalid generation options", problems)


# ------------------------------------------------------------------ merged weights


class MergedWeights:
    """Folds fixed scalings into the base weights of an `XLoraModel`; puts them back exactly.

    The merged weight of each module is a new tensor swapped in as the parameter's data; the
    original tensor is kept untouched and swapped back by `restore()`, so nothing is ever
    subtracted and the restored weights are the original tensors themselves. Peak memory
    grows by one copy of the adapted weights while merged. While merged, the base modules
    also stand in the model's tree in place of their mixing modules (which would only pass
    their input through), exactly as `XLoraModel.unload()` does; `restore()` puts the mixing
    modules back. Use as a context manager so everything comes back on any exit.
    """

    def __init__(self, model: XLoraModel) -> None:
        self.model = model
        self._saved: list[tuple[nn.Parameter, torch.Tensor]] = []
        self._unwrapped: list[tuple[str, nn.Module]] = []  # (module path, mixing module)

    @property
    def merged(self) -> bool:
        return bool(self._saved)

    @torch.no_grad()
    def merge(self, expert_scalings: torch.Tensor) -> None:
        """Adds each module's mixed update to its base weight.

        Args:
            expert_scalings: `(L, E)` scalings after top-k (as the mixing modules use them).
        """
        if self._saved:
            raise RuntimeError("weights are already merged; call restore() first")
        try:
            for module in self.model.mixed_modules():
                weight = module.base_layer.weight
                merged = module.merged_weight(expert_scalings[module.layer_index])
                if merged.stride() != weight.stride():  # keep the original layout
                    merged = torch.empty_like(weight).copy_(merged)
                self._saved.append((weight, weight.data))
                weight.data = merged
            for name, mixed in zip(
                self.model.adapted_modules, list(self.model.mixed_modules()), strict=True
            ):
                self.model.swap_module(name, mixed.base_layer)
                self._unwrapped.append((name, mixed))
        except BaseException:
            self.restore()
            raise

    def restore(self) -> None:
        """Puts the mixing modules and every original weight tensor back (no-op if unmerged)."""
        try:
            while self._unwrapped:
                name, mixed = self._unwrapped.pop()
                self.model.swap_module(name, mixed)
        finally:
            while self._saved:
                weight, original = self._saved.pop()
                weight.data = original

    def __enter__(self) -> MergedWeights:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def merge_problems(model: XLoraModel) -> list[str]:
    """Why the model's adapted weights cannot be merged in place (empty if they can)."""
    problems = [
        f"{name}.weight is shared with another module (tied weights)"
        for name in model.tied_adapted_weights()
    ]
    offloaded = [
        name
        for name, module in zip(model.adapted_modules, model.mixed_modules(), strict=True)
        if module.base_layer.weight.device.type == "meta"
    ]
    if offloaded:
        problems.append(
            f"{len(offloaded)} adapted weights are offloaded by accelerate (on the meta "
            f"device), e.g. {offloaded[0]}.weight"
        )
    return problems


def quantized_modules(model: XLoraModel) -> list[str]:
    """The adapted modules whose base weight is quantized (no exact merge possible)."""
    return [
        name
        for name, module in zip(model.adapted_modules, model.mixed_modules(), strict=True)
        if is_quantized(module.base_layer)
    ]


# ---------------------------------------------------------------- frozen scalings


@dataclass
class FreezePlan:
    """When and how one `generate` call fixes its scalings; lives on `XLoraCache.freeze_plan`.

    `XLoraModel.forward` calls `scalings` once per step (the `loramix.cache.ScalingsPlan`
    protocol): until the window ends it runs both passes and `observe`s the scalings,
    afterwards it returns `fixed_scalings` and the scaling pass is skipped.
    The per-sequence tensors live in the cache's `sequence_state`, so beam search reorders
    them with the keys and values.

    When every sequence has the same fixed scalings (batch 1, beams of one prompt), frozen
    steps use each module's `scaled_lora_b` (the scalings folded into B, computed once per
    call: one extra copy of the B matrices) instead of the scalings.

    Attributes:
        window_start: First cache position whose scalings are averaged.
        window_end: The scalings are fixed once the cache holds this many tokens.
        weights: Set in merged mode: merges at the first frozen step.
    """

    window_start: int
    window_end: int
    weights: MergedWeights | None = None
    _merge_refused: bool = field(default=False, repr=False)
    _scaled_lora_b: list[torch.Tensor] | None = field(default=None, repr=False)
    _shared: bool | None = field(default=None, repr=False)  # every sequence has one mix

    def scalings(
        self,
        model: XLoraModel,
        cache: TwoPassCache,
        tokens: int,
        attention_mask: torch.Tensor | None,
        granular: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor] | None, bool]:
        """`loramix.cache.ScalingsPlan`: the fixed scalings once formed, else `granular`'s."""
        if _MIXING in cache.sequence_state:  # fixed: no scaling pass
            return (*self.fixed_scalings(model, cache, tokens), True)
        scalings, mixing = granular()  # (B, T, L, E) each
        self.observe(model, cache, scalings, attention_mask)
        return scalings, mixing, None, False

    def observe(
        self,
        model: XLoraModel,
        cache: TwoPassCache,
        scalings: torch.Tensor,
        attention_mask: torch.Tensor | None,
    ) -> None:
        """Adds the new tokens' scalings to the window average; fixes it at the window's end.

        Must be called before the mixed pass fills `cache` with these tokens.

        Args:
            scalings: `(B, T, L, E)` the gate's scalings of the new tokens.
            attention_mask: `(B, T_past + T)`, or the `(B, 1, T, K)` mask transformers
                builds for a static cache, or None (every token real).
        """
        batch, tokens = scalings.shape[:2]
        past = int(cache.get_seq_length())  # a tensor in a static cache
        state = cache.sequence_state
        if past < self.window_end and past + tokens > self.window_start:
            positions = torch.arange(past, past + tokens, device=scalings.device)  # (T,)
            weight = (positions >= self.window_start) & (positions < self.window_end)
            weight = weight.expand(batch, tokens)  # (B, T)
            real = _real_tokens(attention_mask, past, tokens)  # (B, T) or None
            if real is not None:
                weight = weight & real.to(weight.device)
            weight = weight.float()
            total = torch.einsum("bt,btle->ble", weight, scalings.float())  # (B, L, E)
            count = weight.sum(dim=1)  # (B,)
            if _SUM in state:
                total, count = total + state[_SUM], count + state[_COUNT]
            state[_SUM], state[_COUNT] = total, count
        if past + tokens >= self.window_end and _SUM in state:
            total, count = state.pop(_SUM), state.pop(_COUNT)
            fixed = (total / count.clamp(min=1.0)[:, None, None]).to(scalings.dtype)  # (B, L, E)
            state[_FIXED] = fixed
            state[_MIXING] = select_top_k(
                fixed[:, None], model.top_k_lora, model.enable_softmax_topk
            )  # (B, 1, L, E)

    def fixed_scalings(
        self, model: XLoraModel, cache: TwoPassCache, tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor] | None]:
        """The fixed scalings for `tokens` new tokens; merges the weights on the first call.

        Returns:
            `(B, T, L, E)` scalings to report (before top-k); the `(B, 1, L, E)` mixing for
            the modules and, when all sequences share it, each module's `scaled_lora_b`
            (else None). Both are None once merged (the experts are then in the weights).
        """
        state = cache.sequence_state
        fixed, mixing = state[_FIXED], state[_MIXING]
        if self._shared is None:  # decided once, so that later steps never sync on data
            self._shared = _same_rows(mixing)
        shared = self._shared
        if self.weights is not None and not self.weights.merged and not self._merge_refused:
            if shared:
                self.weights.merge(mixing[0, 0])  # (L, E)
            else:
                self._merge_refused = True
                logger.warning(
                    "merged mode: the sequences ended up with different fixed scalings "
                    "(freeze_after > 0 with sampling or beams), so one merged weight set "
                    "cannot serve them; continuing in frozen mode"
                )
        scalings = fixed[:, None].expand(-1, tokens, -1, -1)  # (B, T, L, E)
        if self.weights is not None and self.weights.merged:
            return scalings, None, None
        if shared and self._scaled_lora_b is None:
            self._scaled_lora_b = [None] * model.n_layers
            for module in model.mixed_modules():
                self._scaled_lora_b[module.layer_index] = module.scaled_lora_b(
                    mixing[0, 0, module.layer_index]
                )
        return scalings, mixing, self._scaled_lora_b

    def close(self, cache: TwoPassCache) -> None:
        """Restores merged weights and drops the plan's state from the cache."""
        try:
            if self.weights is not None:
                self.weights.restore()
        finally:
            cache.freeze_plan = None
            self._scaled_lora_b = None
            for name in (_SUM, _COUNT, _FIXED, _MIXING):
                cache.sequence_state.pop(name, None)


def _real_tokens(mask: torch.Tensor | None, past: int, tokens: int) -> torch.Tensor | None:
    """`(B, T)` whether each new token is real (not padding), from either kind of mask.

    A 2-D mask `(B, T_past + T)` says it directly. A 4-D mask `(B, 1, T, K)` (what
    transformers passes with a static cache: True or 0 where a query may attend) masks a
    padding token's key for every query, its own included, so its diagonal says it.
    """
    if mask is None:
        return None
    if mask.dim() == 2:
        return mask[:, -tokens:].bool()
    rows = torch.arange(tokens, device=mask.device)  # (T,)
    own = mask[:, 0, rows, past + rows]  # (B, T) each new token's own key
    return own if own.dtype == torch.bool else own == 0


def _same_rows(tensor: torch.Tensor) -> bool:
    return bool(torch.equal(tensor, tensor[:1].expand_as(tensor)))


# ---------------------------------------------------------------------- generate


def generate(
    model: XLoraModel,
    inputs: torch.Tensor | None = None,
    generation_config: Any = None,
    *,
    scalings_mode: str = "granular",
    freeze_after: int = 0,
    **kwargs: Any,
) -> Any:
    """transformers' `generate` with an `XLoraCache` and the chosen scalings mode.

    Args:
        model: The X-LoRA model.
        inputs: `(B, T)` prompt ids (left-padded for B > 1), as for transformers' generate.
        generation_config: A `GenerationConfig`, or None for the model's.
        scalings_mode: "granular", "frozen" or "merged" (see the module docstring).
        freeze_after: Frozen and merged modes: 0 averages the prompt's scalings; k > 0
            generates k tokens in granular mode and averages theirs.
        **kwargs: Anything transformers' `generate` accepts (`max_new_tokens`, `do_sample`,
            `num_beams`, `attention_mask`, `streamer`, `stopping_criteria`, ...). A `cache`
            (or `past_key_values`) must be an `XLoraCache` (`model.new_cache()`).

    Returns:
        What transformers' `generate` returns.
    """
    check_generation_options(scalings_mode, freeze_after)
    cache = kwargs.pop("cache", None)
    legacy = kwargs.pop("past_key_values", None)
    cache = cache if cache is not None else legacy
    if cache is not None and not isinstance(cache, TwoPassCache):
        raise ValueError(
            f"XLoraModel.generate needs an XLoraCache (one cache per pass), got a "
            f"{type(cache).__name__}; pass `cache=model.new_cache()` or no cache at all."
        )
    config = generation_config if generation_config is not None else model.generation_config
    implementation = kwargs.pop("cache_implementation", None) or config.cache_implementation
    if implementation is not None:
        if implementation != "static":
            raise ValueError(
                f"cache_implementation={implementation!r}: XLoraModel.generate keeps one cache "
                "per pass, dynamic (leave cache_implementation out) or static "
                "(cache_implementation='static')."
            )
        if cache is not None:
            raise ValueError(
                "cache_implementation='static' and a cache passed in: give one of them (a "
                "static one is `model.new_cache(max_cache_len=...)`)."
            )
        if config.cache_implementation is not None:  # transformers refuses it beside a cache
            config = copy.deepcopy(config)
            config.cache_implementation = None
            generation_config = config
    if model.has_fixed_scalings:  # inside `fixed_scalings`: the mix is given, nothing to freeze
        scalings_mode = "granular"
    use_cache = kwargs.get("use_cache", config.use_cache)
    if use_cache is False:
        if scalings_mode != "granular":
            raise ValueError(
                f"scalings_mode={scalings_mode!r} needs the KV cache: drop use_cache=False "
                "(or use scalings_mode='granular')."
            )
        return GenerationMixin.generate(model, inputs, generation_config, **kwargs)

    def new_cache() -> TwoPassCache:
        if implementation != "static":
            return model.new_cache()
        prompt = _prompt_tensor(inputs, kwargs)
        return model.new_cache(max_cache_len=_static_cache_length(config, prompt, kwargs))

    if scalings_mode == "granular":
        cache = cache if cache is not None else new_cache()
        return GenerationMixin.generate(model, inputs, generation_config, cache=cache, **kwargs)

    prompt = _prompt_tensor(inputs, kwargs)
    merge = scalings_mode == "merged"
    if merge and (quantized := quantized_modules(model)):
        raise ValueError(
            f"scalings_mode='merged' on a quantized base ({len(quantized)} adapted modules, "
            f"e.g. {quantized[0]}): merging would dequantize, add and requantize the weights, "
            "which is not exact. Use scalings_mode='frozen': the same fixed scalings, with the "
            "experts kept beside the quantized weights."
        )
    if merge and (problems := merge_problems(model)):
        logger.warning("merged mode impossible (%s); running in frozen mode", "; ".join(problems))
        merge = False
    if merge and prompt.shape[0] > 1 and not _same_prompts(prompt, kwargs.get("attention_mask")):
        blockers = [
            name
            for name, present in (
                ("return_dict_in_generate=True", _wants_dict(config, kwargs)),
                ("a streamer", kwargs.get("streamer") is not None),
                ("a cache passed in", cache is not None),
            )
            if present
        ]
        if not blockers:
            if implementation is not None:
                kwargs["cache_implementation"] = implementation
            return _generate_per_sequence(model, inputs, generation_config, freeze_after, kwargs)
        logger.warning(
            "merged mode: different prompts need one merge each, which %s rules out; running "
            "in frozen mode",
            " and ".join(blockers),
        )
        merge = False

    cache = cache if cache is not None else new_cache()
    if cache.freeze_plan is not None:
        raise ValueError("this XLoraCache is in use by another generate call; pass a new one")
    start = int(cache.get_seq_length())
    mask = kwargs.get("attention_mask")
    prompt_end = mask.shape[1] if mask is not None else max(prompt.shape[1], start)
    plan = FreezePlan(
        window_start=start if freeze_after == 0 else prompt_end,
        window_end=prompt_end + freeze_after,
        weights=MergedWeights(model) if merge else None,
    )
    cache.freeze_plan = plan
    try:
        return GenerationMixin.generate(model, inputs, generation_config, cache=cache, **kwargs)
    finally:
        plan.close(cache)


def _static_cache_length(config: Any, prompt: torch.Tensor, kwargs: dict[str, Any]) -> int:
    """Tokens a static cache must hold: the prompt plus every token `generate` may add."""
    new_tokens = kwargs.get("max_new_tokens", config.max_new_tokens)
    if new_tokens is not None:
        return prompt.shape[1] + int(new_tokens)
    max_length = kwargs.get("max_length", config.max_length)
    if max_length is None:
        raise ValueError(
            "cache_implementation='static' sizes the cache from max_new_tokens (or max_length); "
            "pass one of them to generate."
        )
    return int(max_length)


def _prompt_tensor(inputs: torch.Tensor | None, kwargs: dict[str, Any]) -> torch.Tensor:
    for prompt in (inputs, kwargs.get("input_ids"), kwargs.get("inputs_embeds")):
        if prompt is not None:
            return prompt
    raise ValueError(
        "frozen and merged generation fix the scalings from the prompt: pass input_ids "
        "(or inputs_embeds)"
    )


def _same_prompts(prompt: torch.Tensor, attention_mask: torch.Tensor | None) -> bool:
    return _same_rows(prompt) and (attention_mask is None or _same_rows(attention_mask))


def _wants_dict(config: Any, kwargs: dict[str, Any]) -> bool:
    return bool(kwargs.get("return_dict_in_generate", config.return_dict_in_generate))


def _generate_per_sequence(
    model: XLoraModel,
    inputs: torch.Tensor | None,
    generation_config: Any,
    freeze_after: int,
    kwargs: dict[str, Any],
) -> torch.Tensor:
    """Merged mode for different prompts: one merged call per row, right-padded outputs."""
    prompt = _prompt_tensor(inputs, kwargs)
    batch = prompt.shape[0]
    outputs = []
    for row in range(batch):
        row_kwargs = {
            key: value[row : row + 1] if _is_per_row(value, batch) else value
            for key, value in kwargs.items()
        }
        row_inputs = None if inputs is None else inputs[row : row + 1]
        outputs.append(
            generate(
                model,
                row_inputs,
                generation_config,
                scalings_mode="merged",
                freeze_after=freeze_after,
                **row_kwargs,
            )
        )
    width = max(out.shape[1] for out in outputs)
    if any(out.shape[1] != width for out in outputs):
        pad = _pad_token_id(model, generation_config, kwargs)
        outputs = [F.pad(out, (0, width - out.shape[1]), value=pad) for out in outputs]
    return torch.cat(outputs, dim=0)


def _is_per_row(value: Any, batch: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch


def _pad_token_id(model: XLoraModel, generation_config: Any, kwargs: dict[str, Any]) -> int:
    configs = [generation_config, model.generation_config]
    for value in [kwargs.get("pad_token_id"), kwargs.get("eos_token_id")] + [
        getattr(c, name, None) for name in ("pad_token_id", "eos_token_id") for c in configs
    ]:
        if isinstance(value, list | tuple):
            value = value[0] if value else None
        if isinstance(value, torch.Tensor):
            value = value.flatten()[0].item() if value.numel() else None
        if value is not None:
            return int(value)
    raise ValueError(
        "merged mode ran the prompts one by one and their outputs have different lengths, "
        "but no pad_token_id is known to align them; pass pad_token_id=... to generate"
    )


# ------------------------------------------------------------ which expert wrote what


def generated_token_scalings(log: list[torch.Tensor], new_tokens: int) -> torch.Tensor:
    """The scalings that wrote each generated token, from a scalings log.

    Generated token `j` comes out of the `j`-th forward call of a `generate` call (the
    prefill for `j = 0`), at that call's last position. Clear the log before the call; with
    beam search the rows are beams as they stood at each step, not final sequences.

    Args:
        log: `XLoraModel.get_scalings_log()` after one `generate` call (any mode).
        new_tokens: How many tokens the call generated (the last `new_tokens` entries).

    Returns:
        `(B, N, L, E)` scalings (after the gate's softmax, before top-k).
    """
    if not 0 < new_tokens <= len(log):
        raise ValueError(
            f"new_tokens={new_tokens} but the log holds {len(log)} forward calls; enable "
            "scalings logging and clear the log before calling generate"
        )
    return torch.stack([entry[:, -1] for entry in log[-new_tokens:]], dim=1)


def dominant_experts(token_scalings: torch.Tensor) -> torch.Tensor:
    """`(B, N, L, E)` -> `(B, N)`: the expert with the largest scaling averaged over modules."""
    return token_scalings.float().mean(dim=2).argmax(dim=-1)
