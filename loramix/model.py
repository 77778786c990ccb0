"""`XLoraModel`: a frozen causal LM, frozen LoRA experts and a trained gate.

Every forward call runs two passes over the same tokens (Buehler & Buehler 2024,
https://arxiv.org/abs/2402.07148):

1. the scaling pass: the base model's backbone with the experts off (or at a uniform
   `scaling_pass_value`), under `no_grad`, giving the last hidden state `(B, T, D)`;
2. the gate maps it to scalings `(B, T, L, E)`;
3. the mixed pass: the full causal LM, every adapted module adding its experts' updates
   weighted by the scalings (see `loramix.layer`).

The base model's adapted modules are replaced by mixing modules that keep the original
module inside (`unload()` puts them back); no class or method of the base model is patched.

Where the rest lives: the gate in `loramix.gate`, the mixing modules and the experts'
stacked weights in `loramix.layer`, the two-pass KV cache in `loramix.cache`, generation
modes in `loramix.generation`, fixed mixes and `merge_and_unload` in `loramix.mixes`,
activation checkpointing in `loramix.checkpointing`, saving and loading in `loramix.saving`,
training in `loramix.training` (the trainer plumbing is `loramix.training.trainer`).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel

from loramix import generation, saving
from loramix.cache import XLoraCache, XLoraStaticCache
from loramix.checkpointing import CheckpointingMixin
from loramix.checks import is_int, is_number
from loramix.config import XLoraConfig
from loramix.experts import LoraExpert, load_expert
from loramix.gate import XLoraGate, select_top_k
from loramix.layer import (
    MixedLora,
    MixingState,
    build_mixed_modules,
    head_device,
    plan_mixed_modules,
    replace_module,
)
from loramix.mixes import FixedMixMixin
from loramix.records import check_experts_base
from loramix.saving import SavingMixin

logger = logging.getLogger(__name__)

# Forward arguments that belong to the mixed pass only.
_MIXED_PASS_ONLY = frozenset(
    {"labels", "logits_to_keep", "output_hidden_states", "output_attentions", "return_dict"}
)


class XLoraModel(FixedMixMixin, CheckpointingMixin, SavingMixin, PreTrainedModel, GenerationMixin):
    """An X-LoRA model over any transformers causal LM.

    Fixed mixes (`fixed_scalings`, `mix_weights`, `merge_and_unload`) come from
    `loramix.mixes`, activation checkpointing from `loramix.checkpointing`, and
    `save_pretrained` / `from_pretrained` / `expert_state` from `loramix.saving`.

    Args:
        base_model: A transformers causal LM. Its adapted modules are replaced in place and
            all of its parameters are frozen.
        config: Which experts to mix and how.
        experts: Already loaded experts (in `config.adapters` order); read from the
            folders in `config.adapters` when None.

    Attributes:
        gate: The only trainable module unless `config.use_trainable_adapters`.
        expert_names: Expert names, in config order (the E axis).
        adapted_modules: Module paths in `base_model.named_modules()` order (the L axis).
    """

    base_model_prefix = "lm"
    supports_gradient_checkpointing = True  # in the base model's layers; see below
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(
        self,
        base_model: PreTrainedModel,
        config: XLoraConfig,
        experts: list[LoraExpert] | None = None,
    ) -> None:
        config.validate()
        if any(isinstance(m, MixedLora) for m in base_model.modules()):
            raise ValueError(
                "base_model already holds X-LoRA mixing modules; pass a fresh base model or "
                "call `unload()` on the X-LoRA model that wraps it first."
            )
        if experts is None:
            experts = [load_expert(name, path) for name, path in config.adapters.items()]
        hidden_size = _check_hidden_size(base_model, config)
        adapted = plan_mixed_modules(base_model, experts)  # validates before any change
        check_experts_base(
            base_model, {e.name: e.peft_config.get("base_model_name_or_path") for e in experts}
        )

        super().__init__(copy.deepcopy(base_model.config))
        self.lm = base_model
        # The base model's loss is the model's loss: transformers' Trainer reads `loss_type`
        # to know that labels are shifted (it then counts `num_items_in_batch` without each
        # row's first label); the class name alone would leave it None.
        self.loss_type = getattr(base_model, "loss_type", None)
        self.generation_config = copy.deepcopy(base_model.generation_config)
        self.xlora_config = config
        self.expert_names = [expert.name for expert in experts]
        self.adapted_modules = [name for name, _ in adapted]
        self.top_k_lora = config.top_k_lora
        self.enable_softmax_topk = config.enable_softmax_topk
        self.scaling_pass_value = config.scaling_pass_value
        self.mixing_state = MixingState(global_scaling_weight=config.global_scaling_weight)
        self._adapters_disabled = False
        self._fixed_scalings: torch.Tensor | None = None  # (1 or B, 1, L, E) in fixed_scalings()
        self._fixed_scaled_b: list[torch.Tensor] | None = None  # per module, one shared mix
        self._latest_scalings: torch.Tensor | None = None
        self._log_scalings = False
        self._scalings_log: list[torch.Tensor] = []  # grows only while logging is enabled
        self.expert_configs = [expert.peft_config for expert in experts]
        self._cache_kwarg = _cache_kwarg_name(base_model)

        for param in base_model.parameters():
            param.requires_grad_(False)
        mixed = build_mixed_modules(
            base_model, adapted, self.mixing_state, trainable=config.use_trainable_adapters
        )  # all built (and checked) before the first module is replaced
        for module_name, module in zip(self.adapted_modules, mixed, strict=True):
            replace_module(base_model, module_name, module)
        self._first_mixed = mixed[:1]  # a list: not registered a second time

        # The gate sits where the last hidden state goes: beside the LM head.
        weight = base_model.get_input_embeddings().weight
        gate_dtype = torch.promote_types(weight.dtype, torch.float32)  # see loramix.gate
        self.gate = XLoraGate(config, hidden_size, self.n_layers, self.n_experts).to(
            device=head_device(base_model), dtype=gate_dtype
        )
        self.eval()

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        """Kept as named: a mixture-of-experts base's config copy names the base's own
        experts implementation (e.g. "grouped_mm"), which transformers would refuse here."""
        return requested_experts or "eager"

    # ------------------------------------------------------------------ properties

    @property
    def n_layers(self) -> int:
        """L: the number of adapted modules (not transformer blocks)."""
        return len(self.adapted_modules)

    @property
    def n_experts(self) -> int:
        return len(self.expert_names)

    @property
    def global_scaling_weight(self) -> float:
        return self.mixing_state.global_scaling_weight

    @property
    def expert_dtype(self) -> torch.dtype:
        """The dtype the stacked experts are stored and computed in (the base weights')."""
        return self._first_mixed[0].lora_a.dtype

    def mixed_modules(self) -> Iterator[MixedLora]:
        """The mixing modules, in L-axis order."""
        for name in self.adapted_modules:
            yield self.lm.get_submodule(name)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """`(trainable, all)` parameter counts, as peft's method of that name returns.

        "All" counts the experts' stacked A and B too (frozen buffers here, parameters in
        peft), so the totals compare with peft's.
        """
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        if not self.xlora_config.use_trainable_adapters:  # otherwise already parameters
            total += sum(m.lora_a.numel() + m.lora_b.numel() for m in self.mixed_modules())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Prints the trainable and total parameter counts, in peft's format."""
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / total:.4f}"
        )

    def get_input_embeddings(self) -> nn.Module:
        return self.lm.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        return self.lm.get_output_embeddings()

    # --------------------------------------------------------------------- forward

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        cache: Any = None,
        position_ids: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> Any:
        """Scaling pass, gate, mixed pass.

        Args:
            input_ids: `(B, T)` token ids (or give `inputs_embeds`, `(B, T, D)`).
            attention_mask: `(B, T_past + T)`, 1 for real tokens.
            labels: `(B, T)` for the causal-LM loss of the mixed pass.
            use_cache: Whether to fill `cache` (a new `XLoraCache` when none is given, returned
                as `past_key_values`). None follows the base model's config, except in
                training mode, where it means False: training needs no cache, and the two
                passes' caches would only take memory.
            cache: An `XLoraCache` (see `loramix.cache`), which carries a second cache for
                the scaling pass; any other cache object is refused, since the scaling pass
                needs its own. `past_key_values` is accepted as an alias. While frozen or
                merged generation holds it (`cache.freeze_plan`, see `loramix.generation`),
                fixed scalings replace the scaling pass once the plan has formed them.
            position_ids: `(B, T)` positions, to both passes (named here so that
                `generate` computes them from the attention mask for left-padded batches).
            logits_to_keep: Mixed pass only (named so that `generate` sets it to 1); an int
                k becomes the index tensor of the last k positions (`last_positions`).
            **kwargs: Passed to the base model.

        Returns:
            The base model's output (e.g. `CausalLMOutputWithPast`) with `scalings`
            `(B, T, L, E)`: the gate's output after softmax, before top-k.
        """
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        if cache is None and not self._adapters_disabled:
            if use_cache is None:
                text_config = self.lm.config.get_text_config(decoder=True)
                use_cache = not self.training and bool(getattr(text_config, "use_cache", False))
            if use_cache:
                cache = self.new_cache()  # one KV cache per pass, as `generate` uses
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        if not isinstance(logits_to_keep, int) or logits_to_keep != 0:
            reference = input_ids if input_ids is not None else inputs_embeds
            logits_to_keep = last_positions(logits_to_keep, reference)
            if torch.is_tensor(logits_to_keep) and len(_devices(self.lm)) > 1:
                # The last hidden states are on the last block's device; torch indexes a
                # tensor on any device with CPU indices.
                logits_to_keep = logits_to_keep.cpu()
            kwargs["logits_to_keep"] = logits_to_keep
        if self._adapters_disabled:
            return self.lm(
                input_ids=input_ids,
                attention_mask=attention_mask,
                inputs_embeds=inputs_embeds,
                labels=labels,
                use_cache=use_cache,
                **{self._cache_kwarg: cache},
                **kwargs,
            )
        scaling_cache = plan = scaled_lora_b = None
        if cache is not None:
            scaling_cache = getattr(cache, "scaling_cache", None)
            if scaling_cache is None:
                raise ValueError(
                    f"XLoraModel needs a cache per pass, got a {type(cache).__name__}. Pass "
                    "`cache=model.new_cache()` (an XLoraCache) or no cache at all."
                )
            plan = cache.freeze_plan

        def granular() -> tuple[torch.Tensor, torch.Tensor]:
            """Scaling pass and gate: `(B, T, L, E)` scalings and their top-k mixing."""
            if (  # a misuse check that needs the lengths as numbers: eager calls only
                cache is not None
                and not torch.compiler.is_compiling()
                and scaling_cache.get_seq_length() != cache.get_seq_length()
            ):
                raise ValueError(
                    f"this XLoraCache's scaling pass stops at token "
                    f"{scaling_cache.get_seq_length()} but its mixed pass at "
                    f"{cache.get_seq_length()} (frozen or merged generation skip the scaling "
                    "pass); per-token scalings need both, so start from `model.new_cache()`."
                )
            scalings = self.compute_scalings(
                input_ids=input_ids,
                attention_mask=attention_mask,
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
                cache=scaling_cache,
                **kwargs,
            )  # (B, T, L, E)
            return scalings, select_top_k(scalings, self.top_k_lora, self.enable_softmax_topk)

        if self._fixed_scalings is not None:  # a fixed mix: no scaling pass, no gate, no top-k
            batch, tokens = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
            scalings, mixing, scaled_lora_b = self._fixed_mix(batch, tokens)  # (B, T, L, E)
            self._record_scalings(scalings)
        elif plan is not None:  # frozen/merged generation: the plan decides, in one call
            tokens = (input_ids if input_ids is not None else inputs_embeds).shape[1]
            # fixed: mixing (B, 1, L, E) and the modules' scaled B; both None once merged
            scalings, mixing, scaled_lora_b, fixed = plan.scalings(
                self, cache, tokens, attention_mask, granular
            )
            if fixed:  # `granular` (compute_scalings) records the scalings it computes
                self._record_scalings(scalings)
        else:
            scalings, mixing = granular()
        with self.mixing_state.using(mixing, scaled_lora_b, self.expert_dtype):
            output = self.lm(
                input_ids=input_ids,
                attention_mask=attention_mask,
                inputs_embeds=inputs_embeds,
                labels=labels,
                use_cache=use_cache,
                **{self._cache_kwarg: cache},
                **kwargs,
            )
        if not isinstance(output, dict):  # return_dict=False gave a tuple
            return (*output, scalings)
        output["scalings"] = scalings
        return output

    def new_cache(self, max_cache_len: int | None = None) -> XLoraCache | XLoraStaticCache:
        """An empty cache (one KV cache per pass) for `forward` or `generate`.

        Args:
            max_cache_len: None for a dynamic `XLoraCache`; a number of tokens for an
                `XLoraStaticCache` that holds that many (fixed shapes, for `torch.compile`).
        """
        config = self.config.get_text_config(decoder=True)
        if max_cache_len is None:
            return XLoraCache(config=config)
        if (
            isinstance(max_cache_len, bool)
            or not isinstance(max_cache_len, int)
            or max_cache_len < 1
        ):
            raise ValueError(f"max_cache_len={max_cache_len!r}: use an int >= 1 (or None)")
        return XLoraStaticCache(config=config, max_cache_len=max_cache_len)

    def generate(
        self,
        inputs: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        *,
        scalings_mode: str = "granular",
        freeze_after: int = 0,
        **kwargs: Any,
    ) -> Any:
        """transformers' `generate`, with one KV cache per pass and a choice of scalings.

        Args:
            inputs: `(B, T)` prompt ids, left-padded (with `attention_mask`) when B > 1.
            generation_config: As for transformers' `generate`.
            scalings_mode: "granular" (per-token scalings, both passes at every step),
                "frozen" (scalings fixed per sequence, no scaling pass afterwards) or
                "merged" (fixed scalings folded into the base weights for the call, restored
                exactly afterwards); see `loramix.generation`.
            freeze_after: Frozen/merged modes: 0 averages the prompt's scalings, k > 0 those
                of the first k generated tokens.
            **kwargs: Anything transformers' `generate` accepts (`max_new_tokens`,
                `do_sample`, `num_beams`, `streamer`, `stopping_criteria`, ...).

        Returns:
            What transformers' `generate` returns.
        """
        return generation.generate(
            self,
            inputs,
            generation_config,
            scalings_mode=scalings_mode,
            freeze_after=freeze_after,
            **kwargs,
        )

    def compute_scalings(self, cache: Any = None, **inputs: Any) -> torch.Tensor:
        """Runs the scaling pass and the gate.

        Args:
            cache: The scaling pass's own KV cache, or None.
            **inputs: The forward inputs (`input_ids` or `inputs_embeds`, masks, ...).

        Returns:
            `(B, T, L, E)` scalings after softmax, before top-k; also kept for
            `get_latest_scalings()` and the scalings log.
        """
        inputs = {k: v for k, v in inputs.items() if k not in _MIXED_PASS_ONLY}
        if cache is None:
            inputs["use_cache"] = False
        reference = inputs.get("input_ids")
        if reference is None:
            reference = inputs["inputs_embeds"]
        batch, tokens = reference.shape[:2]
        pass_scalings = None
        if self.scaling_pass_value != 0:
            pass_scalings = torch.full(
                (1, 1, 1, 1), float(self.scaling_pass_value), device=reference.device
            ).expand(batch, tokens, self.n_layers, self.n_experts)  # (B, T, L, E)
        with torch.no_grad(), self.mixing_state.using(pass_scalings, dtype=self.expert_dtype):
            backbone = self.lm.base_model  # the causal LM without its head
            hidden = backbone(**inputs, **{self._cache_kwarg: cache}).last_hidden_state
        gate_device = self.gate.layers[-1].weight.device
        scalings = self.gate(hidden.to(gate_device))  # (B, T, L, E), no-op on one device
        self._record_scalings(scalings)
        return scalings

    def _record_scalings(self, scalings: torch.Tensor) -> None:
        detached = scalings.detach()
        self._latest_scalings = detached
        if self._log_scalings:
            self._scalings_log.append(detached.cpu())

    # ------------------------------------------------------------ runtime settings

    def get_latest_scalings(self) -> torch.Tensor | None:
        """`(B, T, L, E)` scalings of the last forward call (after softmax, before top-k)."""
        return self._latest_scalings

    def enable_scalings_logging(self) -> None:
        """Starts appending every forward call's scalings (on the CPU) to the log."""
        self._log_scalings = True

    def disable_scalings_logging(self) -> None:
        """Stops logging; the entries logged so far stay until `clear_scalings_log()`."""
        self._log_scalings = False

    def get_scalings_log(self) -> list[torch.Tensor]:
        """The logged scalings, one `(B, T, L, E)` tensor per forward call."""
        return list(self._scalings_log)

    def clear_scalings_log(self) -> None:
        self._scalings_log.clear()

    def save_scalings_log(self, path: str | os.PathLike) -> None:
        """Writes the log as `.npz` (see `loramix.saving.save_scalings_log`), atomically."""
        saving.save_scalings_log(self, path)

    def set_topk_lora(self, value: int | None) -> None:
        """Keeps only the `value` largest scalings per token and module (None keeps all)."""
        if value is not None and not (is_int(value) and 1 <= value <= self.n_experts):
            raise ValueError(
                f"top_k_lora={value!r}: use None or an int between 1 and {self.n_experts}"
            )
        self.top_k_lora = value

    def set_global_scaling_weight(self, weight: float) -> None:
        """Sets `g`, the factor on every module's mixed LoRA term."""
        if not is_number(weight):
            raise ValueError(f"global_scaling_weight={weight!r}: use a number")
        self.mixing_state.global_scaling_weight = float(weight)

    def set_scaling_pass_value(self, value: float | None) -> None:
        """Sets the experts' scaling in the scaling pass; None means 1 / n_experts."""
        if value is None:
            value = 1.0 / self.n_experts
        if not is_number(value):
            raise ValueError(f"scaling_pass_value={value!r}: use a number or None")
        self.scaling_pass_value = float(value)

    @contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Inside this block the model computes exactly the base model's outputs."""
        previous = self._adapters_disabled
        self._adapters_disabled = True
        try:
            yield
        finally:
            self._adapters_disabled = previous

    def current_config(self) -> XLoraConfig:
        """The config with the runtime settings (top-k, scaling-pass value, g) folded in."""
        return dataclasses.replace(
            self.xlora_config,
            top_k_lora=self.top_k_lora,
            scaling_pass_value=self.scaling_pass_value,
            global_scaling_weight=self.global_scaling_weight,
        )

    def unload(self) -> PreTrainedModel:
        """Puts the original modules back and returns the base model (still frozen).

        Activation checkpointing, if on, is turned off: it was set up with this model's
        `context_fn`; enable it again on the returned model if needed.
        """
        if self.checkpointing_activations:
            self.gradient_checkpointing_disable()
        for name, module in zip(self.adapted_modules, list(self.mixed_modules()), strict=True):
            replace_module(self.lm, name, module.base_layer)
        return self.lm

    def swap_module(self, name: str, module: nn.Module) -> nn.Module:
        """Puts `module` at `name` (an entry of `adapted_modules`); returns the one it replaces.

        Merged generation uses it to stand the base modules in for the mixing modules for the
        length of a call (and to put the mixing modules back).
        """
        if name not in self.adapted_modules:
            raise ValueError(f"{name!r} is not an adapted module; see `adapted_modules`")
        return replace_module(self.lm, name, module)

    def tied_adapted_weights(self) -> list[str]:
        """Adapted modules whose weight is shared with another module (tied embeddings)."""
        owners: dict[int, int] = {}
        for _, param in self.lm.named_parameters(remove_duplicate=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
        return [
            name
            for name, module in zip(self.adapted_modules, self.mixed_modules(), strict=True)
            if owners.get(id(module.base_layer.weight), 0) > 1
        ]


# ------------------------------------------------------------------------ helpers


def last_positions(
    logits_to_keep: int | torch.Tensor, reference: torch.Tensor | None
) -> int | torch.Tensor:
    """`logits_to_keep=k` as the index tensor of the last k of the `T` positions, on the CPU.

    The same logits, faster: transformers slices the hidden states with an int, a strided
    view, and on the CPU torch's matmul does not fold a strided `(B, k, D)` input into one
    matrix product when the head is frozen (as an X-LoRA model's is): it expands the head to
    `(B, D, vocab)` and copies it, one copy of the head per sequence (timings in
    BENCHMARKS.md, "Prefill logits as an index, not a slice"). An index tensor gathers
    contiguous rows instead. Other devices, an int of 0 (every position), a tensor, or
    k >= T are left as they are.

    Args:
        logits_to_keep: The forward's argument.
        reference: `(B, T)` input ids or `(B, T, D)` input embeddings, or None.

    Returns:
        `logits_to_keep`, or the `(k,)` positions T - k .. T - 1.
    """
    if (
        reference is None
        or reference.device.type != "cpu"
        or not isinstance(logits_to_keep, int)
        or not 0 < logits_to_keep < reference.shape[1]
    ):
        return logits_to_keep
    tokens = reference.shape[1]
    return torch.arange(tokens - logits_to_keep, tokens)  # (k,)


def _devices(base_model: nn.Module) -> set[str]:
    """The devices an accelerate device map spreads the base model over (none without one)."""
    return {str(device) for device in (getattr(base_model, "hf_device_map", None) or {}).values()}


def _check_hidden_size(base_model: PreTrainedModel, config: XLoraConfig) -> int:
    text_config = base_model.config.get_text_config()
    inferred = getattr(text_config, "hidden_size", None)
    if config.hidden_size is None:
        if inferred is None:
            raise ValueError(
                "hidden_size: the base model's config has no hidden_size; set "
                "XLoraConfig.hidden_size to the width of its last hidden state."
            )
        return int(inferred)
    if inferred is not None and inferred != config.hidden_size:
        raise ValueError(
            f"hidden_size={config.hidden_size} but the base model's hidden size is {inferred}; "
            "set hidden_size=None to infer it."
        )
    return config.hidden_size


def _cache_kwarg_name(base_model: nn.Module) -> str:
    """transformers >= 5.2x calls the KV cache argument `cache`; earlier, `past_key_values`."""
    parameters = inspect.signature(type(base_model).forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"
