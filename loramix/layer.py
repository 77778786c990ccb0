"""Mixing modules: a frozen base module plus a gated sum of stacked LoRA experts.

For one adapted module `l`, with input `x` and gate scalings `s`:

    y = W x + g * sum_i s[b, t, l, i] * scale_i * B_i A_i x

The experts' `A_i` are concatenated along the rank axis into one `(R, in)` matrix and the
`B_i` into one `(out, R)` matrix, where `R` is the sum of the experts' ranks (ranks may
differ; an expert that does not adapt this module has no rows). The sum over experts is then
two GEMMs and one elementwise product, whatever the number of experts:

    a = A_cat x                      # (B, T, R)
    a = a * s[..., expert_of_rank] * scale_of_rank * g
    y = W x + B_cat a                # (B, T, out)

Axis names used in shape comments:
    B batch, T tokens, L adapted modules ("layers"), E experts, R total rank of a module,
    D_in / D_out a module's input / output width, V vocabulary (embedding rows).

The scalings reach the modules through a `MixingState` that `XLoraModel` owns and sets for
the length of one forward call (`with state.using(scalings): ...`). No hooks are involved.
`plan_mixed_modules` decides which modules of a base model get mixed, `build_mixed_modules`
builds their mixing modules (placed where each module runs), and `replace_module`
is the one place where modules of the base model are swapped (see `loramix.model`).

Token layout: a module is normally called on `(B, T, D_in)` activations, token `(b, t)` at
row `(b, t)`. Some architectures flatten them to `(B * T, D_in)` first (OPT's feed-forward
block, Qwen2-MoE's shared expert); the rows are then the tokens in batch-major order and the
rank weights are flattened the same way. A module called on any other number of rows (a
subset of the tokens, e.g. the tokens routed to one expert of a mixture-of-experts block)
cannot be matched to its tokens' scalings and raises an error naming the module, unless every
token has the same weights (fixed or frozen scalings).

Quantized bases (bitsandbytes 4-bit and 8-bit, torchao tensor subclasses): the base module
is called as it is; the experts are never cast to its storage dtype but kept in the
activations' dtype and added to its output. Folding them into a quantized weight is refused.

Precision: the stacked experts are stored in the base weight's dtype (float32, float16 or
bfloat16), converted once when the module is built (and by `.to()`), never per call. The
scalings come from the gate in float32; `using` forms every module's rank weights from them
in float32 and casts the result to the experts' dtype once per forward call, so no module
converts anything per step. Frozen generation folds fixed scalings into B in float32 and
rounds once (`MixedLora.scaled_lora_b`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from loramix.checks import raise_problems
from loramix.experts import LoraExpert, ModuleLora


@dataclass
class MixingState:
    """What every mixing module of one model reads during a forward call.

    Attributes:
        scalings: `(B, T, L, E)` expert weights per token and adapted module, after top-k;
            `None` switches every expert off (the module returns its base output).
        global_scaling_weight: The factor `g` on the mixed LoRA term.
        scaled_lora_b: Optional, one `(D_out, R)` matrix per module (indexed by
            `layer_index`): `MixedLora.scaled_lora_b` of fixed scalings shared by every
            sequence. When set, modules compute `W x + B' (A x)` and skip `scalings`:
            frozen generation sets it once per call, saving four small ops per module and
            step.
    """

    scalings: torch.Tensor | None = None
    global_scaling_weight: float = 1.0
    scaled_lora_b: list[torch.Tensor] | None = None

    # layer index -> (expert of each rank, scale of each rank), given by `add_module`
    _layouts: dict[int, tuple[tuple[int, ...], tuple[float, ...]]] = field(
        default_factory=dict, init=False, repr=False
    )
    # (device, E, dtype) -> (gather index (sum R,), scale of each rank (sum R,), R per layer)
    _gathers: dict[tuple, tuple[torch.Tensor, torch.Tensor, list[int]]] = field(
        default_factory=dict, init=False, repr=False
    )
    # layer index -> its (B, T, R) rank weights, formed by `using` for the current call
    _rank_weights: dict[int, torch.Tensor] = field(default_factory=dict, init=False, repr=False)

    def add_module(
        self, layer_index: int, expert_of_rank: list[int], scale_of_rank: list[float]
    ) -> None:
        """Records which expert and LoRA scale each rank of module `layer_index` has."""
        self._layouts[layer_index] = (tuple(expert_of_rank), tuple(scale_of_rank))
        self._gathers.clear()

    def rank_weights(self, layer_index: int) -> torch.Tensor:
        """`(B, T, R)`: `g * s[b, t, l, i] * scale_i` on each rank of module `layer_index`.

        Computed for every module at once when `using` sets the scalings (outside any
        checkpointed layer): one gather, one multiply and one split of the `(B, T, L, E)`
        scalings, instead of three small ops per module. In the backward pass the split is
        one concatenation and the gather one scatter-add (indexing per module would allocate
        a zero tensor of the full scalings' size, L times over).
        """
        return self._rank_weights[layer_index]

    def _split_rank_weights(
        self, scalings: torch.Tensor, dtype: torch.dtype | None
    ) -> dict[int, torch.Tensor]:
        """layer index -> its `(B, T, R_l)` rank weights, for `(B, T, L, E)` scalings.

        Formed in the scalings' dtype, then cast to `dtype` (the experts') in one op.
        """
        index, scale, sizes = self._gather(scalings)
        flat = scalings.flatten(-2)  # (B, T, L * E)
        weights = flat.index_select(-1, index) * (scale * self.global_scaling_weight)
        if dtype is not None:
            weights = weights.to(dtype)  # (B, T, sum R)
        return dict(zip(self._layouts, weights.split(sizes, dim=-1), strict=True))

    def _gather(self, scalings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        n_experts = scalings.shape[-1]
        key = (scalings.device, n_experts, scalings.dtype)
        if key not in self._gathers:
            index, scale, sizes = [], [], []
            for layer_index, (experts, scales) in self._layouts.items():
                index += [layer_index * n_experts + expert for expert in experts]
                scale += scales
                sizes.append(len(experts))
            # Normal tensors even when the first call runs under `torch.inference_mode()`:
            # an inference tensor kept here would break every later call that needs grads.
            with torch.inference_mode(False):
                self._gathers[key] = (
                    torch.tensor(index, dtype=torch.long, device=scalings.device),  # (sum R,)
                    torch.tensor(scale, dtype=scalings.dtype, device=scalings.device),  # (sum R,)
                    sizes,
                )
        return self._gathers[key]

    @contextmanager
    def using(
        self,
        scalings: torch.Tensor | None,
        scaled_lora_b: list[torch.Tensor] | None = None,
        dtype: torch.dtype | None = None,
    ) -> Iterator[None]:
        """Sets the scalings (or the scaled B matrices) for the length of one forward call.

        Args:
            scalings: `(B, T, L, E)` or None (experts off).
            scaled_lora_b: Per module, B with fixed scalings folded in (then `scalings` is
                only reported, not applied).
            dtype: The experts' dtype: the rank weights are cast to it once here, so the
                modules multiply without a conversion. None keeps the scalings' dtype.
        """
        rank_weights = {}
        if scalings is not None and scaled_lora_b is None and self._layouts:
            rank_weights = self._split_rank_weights(scalings, dtype)
        with self._restoring((scalings, scaled_lora_b, rank_weights)):
            yield

    def checkpoint_contexts(self) -> tuple[AbstractContextManager, AbstractContextManager]:
        """`context_fn` for `torch.utils.checkpoint`: a layer's recompute sees its own call.

        Activation checkpointing runs a layer again in the backward pass, after `using` has
        ended (and maybe after later forward calls). The second context puts back, for that
        recompute, the scalings and the very rank-weight tensors the layer's first run used.
        """
        snapshot = (self.scalings, self.scaled_lora_b, self._rank_weights)
        return nullcontext(), self._restoring(snapshot)

    @contextmanager
    def _restoring(self, snapshot: tuple) -> Iterator[None]:
        previous = self.scalings, self.scaled_lora_b, self._rank_weights
        self.scalings, self.scaled_lora_b, self._rank_weights = snapshot
        try:
            yield
        finally:
            self.scalings, self.scaled_lora_b, self._rank_weights = previous


def add_up_projection(
    result: torch.Tensor, down: torch.Tensor, lora_b: torch.Tensor
) -> torch.Tensor:
    """`result + down @ lora_b.T`, the up-projection fused into the add where dtypes allow.

    One `addmm` (the GEMM accumulates into a copy of `result`) instead of a GEMM, a new
    `(B, T, D_out)` tensor and an elementwise add: about 3% of an X-LoRA forward call on
    SmolLM2-135M's shape (benchmarks/forward.py).

    Args:
        result: `(..., D_out)` the base module's output.
        down: `(..., R)` the weighted down-projection.
        lora_b: `(D_out, R)` the stacked B matrices (scalings folded in or not).
    """
    if result.dtype != down.dtype:  # e.g. a half-precision base over float32 experts
        return result + F.linear(down, lora_b).to(result.dtype)
    fused = torch.addmm(
        result.reshape(-1, result.shape[-1]), down.reshape(-1, down.shape[-1]), lora_b.T
    )  # (B * T, D_out)
    return fused.view(result.shape)


def is_quantized(module: nn.Module) -> bool:
    """Whether `module.weight` is stored quantized: an integer dtype (bitsandbytes 4-bit
    packs into uint8, 8-bit is int8) or a tensor subclass (torchao), not a plain float tensor.
    """
    weight = module.weight
    return not weight.is_floating_point() or type(weight.data) is not torch.Tensor


def adapted_shape(module: nn.Module) -> tuple[int, int] | None:
    """`(in, out)` as LoRA sees the module (`(V, D)` for an embedding), or None if unsupported."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):  # GPT-2 style: weight is (in, out)
        return module.weight.shape[0], module.weight.shape[1]
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    return None


class MixedLora(nn.Module):
    """Base of the mixing modules: holds the stacked experts and applies the scalings.

    Subclasses only say how the input reaches rank space (`project_down`) and how a weight
    delta is laid out (`delta_weight`).

    Args:
        base_layer: The frozen module being adapted (kept as is, called unchanged).
        layer_index: This module's position on the L axis of the scalings.
        expert_loras: `(expert index, its update of this module)`, in expert order; experts
            that do not adapt this module are absent.
        state: The model's shared `MixingState`.
        trainable: Register the stacked LoRA weights as trainable parameters instead of
            frozen buffers.
        module_name: The module's path in the model, for error messages.
        device: Where the experts live; None: the base weight's device. A base placed by
            accelerate with offloaded (meta) weights needs its execution device here.
        activation_dtype: The experts' dtype over a quantized base weight (whose storage
            dtype is no compute dtype); None: float32. Unused for floating-point weights.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        layer_index: int,
        expert_loras: list[tuple[int, ModuleLora]],
        state: MixingState,
        trainable: bool = False,
        *,
        module_name: str | None = None,
        device: torch.device | str | None = None,
        activation_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.layer_index = layer_index
        self.state = state
        self.module_name = module_name or f"adapted module {layer_index}"
        weight = base_layer.weight
        device = weight.device if device is None else torch.device(device)
        if device.type == "meta":
            raise ValueError(
                f"{self.module_name}: its weight is on the meta device (offloaded, or not "
                "loaded) and no execution device is known; load the base model onto real "
                "devices, or dispatch it with accelerate so that its hooks name one."
            )
        if is_quantized(base_layer):  # storage dtype (uint8, int8) is not a compute dtype
            dtype = activation_dtype if activation_dtype is not None else torch.float32
        else:
            dtype = weight.dtype
        lora_a = torch.cat([lora.lora_a for _, lora in expert_loras], dim=0)  # (R, D_in)
        lora_b = torch.cat([lora.lora_b for _, lora in expert_loras], dim=1)  # (D_out, R)
        lora_a = lora_a.to(device=device, dtype=dtype)
        lora_b = lora_b.to(device=device, dtype=dtype)
        expert_of_rank = torch.cat(
            [torch.full((lora.rank,), index, dtype=torch.long) for index, lora in expert_loras]
        )  # (R,)
        scale_of_rank = torch.cat(
            [torch.full((lora.rank,), lora.scale, dtype=torch.float64) for _, lora in expert_loras]
        )  # (R,)
        if trainable:
            self.lora_a = nn.Parameter(lora_a)
            self.lora_b = nn.Parameter(lora_b)
        else:
            self.register_buffer("lora_a", lora_a)
            self.register_buffer("lora_b", lora_b)
        self.register_buffer("expert_of_rank", expert_of_rank.to(device), persistent=False)
        self.register_buffer("scale_of_rank", scale_of_rank.to(device, dtype), persistent=False)
        # (expert index, first rank row, end rank row), to split the stack back per expert.
        self.rank_blocks: list[tuple[int, int, int]] = []
        start = 0
        for index, lora in expert_loras:
            self.rank_blocks.append((index, start, start + lora.rank))
            start += lora.rank
        state.add_module(layer_index, expert_of_rank.tolist(), scale_of_rank.tolist())

    @property
    def weight(self) -> torch.Tensor:
        """The base module's weight (transformers reads it, e.g. to tie or resize embeddings)."""
        return self.base_layer.weight

    def project_down(self, x: torch.Tensor) -> torch.Tensor:
        """`(B, T, D_in)` input -> `(B, T, R)`: every expert's `A_i x` at once."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Base output plus the mixed experts.

        Args:
            x: `(B, T, D_in)` activations (or `(B * T, D_in)`, flattened batch-major), or
                `(B, T)` token ids for an embedding.

        Returns:
            `(B, T, D_out)` (`(B * T, D_out)` for flattened input), the base module's output
            when neither `state.scalings` nor `state.scaled_lora_b` is set.
        """
        result = self.base_layer(x, *args, **kwargs)
        state = self.state
        if state.scaled_lora_b is not None:  # fixed scalings, already folded into B
            down = self.project_down(x)  # (B, T, R)
            return add_up_projection(result, down, state.scaled_lora_b[self.layer_index])
        scalings = state.scalings
        if scalings is None:
            return result
        rank_weights = state.rank_weights(self.layer_index)  # (B, T, R) or (B, 1, R)
        down = self.project_down(x)  # (B, T, R), or (B * T, R) for flattened activations
        rank_weights = self._per_row(rank_weights, down.shape[:-1])
        rank_weights = rank_weights.to(device=down.device, dtype=down.dtype)
        return add_up_projection(result, down * rank_weights, self.lora_b)

    def _per_row(self, rank_weights: torch.Tensor, rows: torch.Size) -> torch.Tensor:
        """`(B, T|1, R)` rank weights laid out like the input's rows `rows` (see the module
        docstring): as they are for `(B, T)` rows, flattened for `(B * T,)` rows.

        Raises:
            ValueError: the rows are neither, so they cannot be matched to their tokens.
        """
        batch, tokens, rank = rank_weights.shape
        if len(rows) == 2 and rows[0] == batch and tokens in (rows[1], 1):
            return rank_weights  # broadcasts over T when the scalings are fixed per sequence
        if len(rows) == 1 and batch * tokens == rows[0]:
            return rank_weights.reshape(rows[0], rank)  # (B * T, R), batch-major
        if len(rows) == 1 and tokens == 1 and rows[0] % batch == 0:
            return rank_weights.expand(batch, rows[0] // batch, rank).reshape(rows[0], rank)
        if bool((rank_weights == rank_weights[:1, :1]).all()):  # the same for every token
            return rank_weights[0, 0]  # (R,)
        raise ValueError(
            f"{self.module_name} was called on input rows {tuple(rows)} but the scalings "
            f"cover {batch} x {tokens} tokens: it sees a subset or a rearrangement of the "
            "tokens (e.g. the tokens routed to one expert of a mixture-of-experts block), so "
            "per-token scalings cannot reach the right tokens. Retrain the experts without "
            "this module (leave it out of target_modules), or use fixed scalings."
        )

    def rank_weights(self, layer_scalings: torch.Tensor) -> torch.Tensor:
        """`(..., E)` expert scalings -> `(..., R)`: `g * s_i * scale_i` on expert i's ranks.

        For fixed scalings; in a forward call `MixingState.rank_weights` does this for every
        module at once.
        """
        weights = layer_scalings.index_select(-1, self.expert_of_rank)  # (..., R)
        return weights * (self.scale_of_rank * self.state.global_scaling_weight)

    def delta_weight(self, expert_scalings: torch.Tensor) -> torch.Tensor:
        """The mixed update for fixed scalings, laid out like `base_layer.weight`.

        Args:
            expert_scalings: `(E,)` one scaling per expert.
        """
        return self.scaled_lora_b(expert_scalings) @ self.lora_a  # (D_out, D_in)

    def scaled_lora_b(self, expert_scalings: torch.Tensor) -> torch.Tensor:
        """`(D_out, R)`: `lora_b` with `g * s_i * scale_i` folded into expert i's columns.

        Args:
            expert_scalings: `(E,)` one scaling per expert.
        """
        return self._wide_scaled_lora_b(expert_scalings).to(self.lora_b.dtype)  # (D_out, R)

    def _wide_scaled_lora_b(self, expert_scalings: torch.Tensor) -> torch.Tensor:
        """`scaled_lora_b` in float32 at least (float64 stays float64), not yet rounded."""
        wide = torch.promote_types(self.lora_b.dtype, torch.float32)
        weights = self.rank_weights(expert_scalings.to(self.lora_b.device, wide))  # (R,)
        return self.lora_b.to(wide) * weights  # (D_out, R)

    def merged_weight(self, expert_scalings: torch.Tensor) -> torch.Tensor:
        """`base_layer.weight + delta_weight(expert_scalings)` as a new tensor, in one GEMM.

        Equal to the sum up to float rounding; one fused `addmm` instead of a delta, a copy
        and an add (merged generation folds every module at once, so this is its cost).
        Over a float16 or bfloat16 weight the delta is formed in float32 and rounded once
        before the add: more exact, and on CPUs without half-precision matrix units far
        faster (a float16 GEMM of inner size R took 50 to 70 ms against 1 ms in float32 for
        a 1536 x 576 weight on the project's AVX-512 CPU).

        Args:
            expert_scalings: `(E,)` one scaling per expert.
        """
        if is_quantized(self.base_layer):
            raise ValueError(
                f"{self.module_name}: its base weight is quantized "
                f"({type(self.base_layer).__name__}, stored as {self.base_layer.weight.dtype}); "
                "adding the experts to it would need a dequantize-add-requantize round trip, "
                "which is not exact. Use scalings_mode='frozen' instead of 'merged': it keeps "
                "the experts beside the quantized weight at the same fixed scalings."
            )
        scaled_b = self._wide_scaled_lora_b(expert_scalings)  # (D_out, R), float32 at least
        weight = self.base_layer.weight.detach()
        if scaled_b.dtype != weight.dtype:  # half precision: float32 delta, one rounding
            delta = scaled_b @ self.lora_a.to(scaled_b.dtype)  # (D_out, D_in)
            return weight + (delta.T if self.weight_is_transposed else delta).to(weight.dtype)
        if self.weight_is_transposed:  # weight is (D_in, D_out)
            return torch.addmm(weight, self.lora_a.T, scaled_b.T)
        return torch.addmm(weight, scaled_b, self.lora_a)  # (D_out, D_in)

    @property
    def weight_is_transposed(self) -> bool:
        """Whether `base_layer.weight` is laid out `(D_in, D_out)` (Conv1D, embeddings)."""
        return False

    def expert_weights(self, expert_index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This module's `(A, B)` for one expert, or None if the expert does not adapt it."""
        for index, start, end in self.rank_blocks:
            if index == expert_index:
                return self.lora_a[start:end], self.lora_b[:, start:end]
        return None


class MixedLinear(MixedLora):
    """Mixing module over an `nn.Linear` or a transformers `Conv1D` (GPT-2)."""

    def project_down(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.lora_a.dtype), self.lora_a)  # (B, T, R)

    def delta_weight(self, expert_scalings: torch.Tensor) -> torch.Tensor:
        delta = super().delta_weight(expert_scalings)  # (D_out, D_in)
        return delta.T if self.weight_is_transposed else delta

    @property
    def weight_is_transposed(self) -> bool:
        return isinstance(self.base_layer, Conv1D)  # GPT-2: weight is (D_in, D_out)


class MixedEmbedding(MixedLora):
    """Mixing module over an `nn.Embedding` (rows of A are looked up, not multiplied)."""

    def project_down(self, x: torch.Tensor) -> torch.Tensor:
        down = F.embedding(x, self.lora_a.T)  # (B, T, R)
        embed_scale = getattr(self.base_layer, "embed_scale", None)  # e.g. Gemma's sqrt(D)
        return down if embed_scale is None else down * embed_scale

    def delta_weight(self, expert_scalings: torch.Tensor) -> torch.Tensor:
        return super().delta_weight(expert_scalings).T  # (V, D)

    @property
    def weight_is_transposed(self) -> bool:
        return True  # (V, D): rows are looked up by the input ids


def execution_device(root: nn.Module, module_name: str) -> torch.device | None:
    """Where a module runs when accelerate offloaded its weight (to the meta device): the
    `execution_device` of the nearest accelerate hook on it or above it. None otherwise."""
    if root.get_submodule(module_name).weight.device.type != "meta":
        return None
    parts = module_name.split(".")
    for end in range(len(parts), -1, -1):
        owner = root.get_submodule(".".join(parts[:end]))
        hook = getattr(owner, "_hf_hook", None)
        for one in getattr(hook, "hooks", None) or [hook]:
            device = getattr(one, "execution_device", None)
            if device is not None:
                return torch.device(device)
    return None


def head_device(base_model: nn.Module) -> torch.device:
    """Where a causal LM's head runs (its input embeddings' when it has no head module): the
    device the last hidden state goes to, where `XLoraModel` puts its gate."""
    head = base_model.get_output_embeddings() or base_model.get_input_embeddings()
    name = next(name for name, module in base_model.named_modules() if module is head)
    device = execution_device(base_model, name)  # set when accelerate offloaded the head
    return head.weight.device if device is None else device


def build_mixed_modules(
    base_model: nn.Module,
    plan: list[tuple[str, list[tuple[int, ModuleLora]]]],
    state: MixingState,
    trainable: bool = False,
) -> list[MixedLora]:
    """One mixing module per planned module (see `plan_mixed_modules`), in plan order, each
    with its experts where its module runs and, over a quantized weight, in the dtype of the
    model's activations (its input embeddings' dtype). Nothing is swapped in here."""
    weight = base_model.get_input_embeddings().weight
    activation_dtype = weight.dtype if weight.is_floating_point() else None
    return [
        make_mixed_module(
            base_model.get_submodule(name),
            layer_index,
            expert_loras,
            state,
            trainable,
            module_name=name,
            device=execution_device(base_model, name),
            activation_dtype=activation_dtype,
        )
        for layer_index, (name, expert_loras) in enumerate(plan)
    ]


def make_mixed_module(
    base_layer: nn.Module,
    layer_index: int,
    expert_loras: list[tuple[int, ModuleLora]],
    state: MixingState,
    trainable: bool = False,
    **placement: Any,
) -> MixedLora:
    """Builds the mixing module that fits `base_layer`'s type.

    Args:
        **placement: `module_name`, `device`, `activation_dtype` (see `MixedLora`).
    """
    cls = MixedEmbedding if isinstance(base_layer, nn.Embedding) else MixedLinear
    return cls(base_layer, layer_index, expert_loras, state, trainable, **placement)


def replace_module(root: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Puts `module` at path `name` under `root` and returns the module that stood there.

    The one place where loramix swaps modules in a base model's tree: `XLoraModel` puts the
    mixing modules in (and back out in `unload`), merged generation swaps the base modules
    in for the length of a call.
    """
    parent_name, _, child_name = name.rpartition(".")
    parent = root.get_submodule(parent_name)
    previous = getattr(parent, child_name)
    setattr(parent, child_name, module)
    return previous


def plan_mixed_modules(
    base_model: nn.Module, experts: list[LoraExpert]
) -> list[tuple[str, list[tuple[int, ModuleLora]]]]:
    """Which modules get mixed, with which experts, in `named_modules()` order.

    Raises:
        ValueError: listing every expert module that is missing from the base model, of an
            unsupported type, or of the wrong shape.
    """
    if not experts:
        raise ValueError("no experts: give at least one adapter in XLoraConfig.adapters")
    modules = dict(base_model.named_modules())
    problems = []
    for expert in experts:
        for name, lora in expert.modules.items():
            module = modules.get(name)
            if module is None:
                problems.append(
                    f"expert {expert.name!r} ({expert.path}) adapts {name!r}, which matches no "
                    "module of the base model; was it trained on another architecture?"
                )
                continue
            shape = adapted_shape(module)
            if shape is None:
                problems.append(
                    f"expert {expert.name!r} adapts {name!r}, a {type(module).__name__}; "
                    "only Linear, Conv1D and Embedding modules can be mixed"
                )
                continue
            if isinstance(module, nn.Embedding) != lora.is_embedding:
                problems.append(
                    f"expert {expert.name!r}: module {name!r} is a {type(module).__name__} but "
                    "the adapter stores it as "
                    + ("an embedding" if lora.is_embedding else "a linear layer")
                )
                continue
            got = (lora.lora_a.shape[1], lora.lora_b.shape[0])
            if got != shape:
                problems.append(
                    f"expert {expert.name!r}: module {name!r} has (in, out) = {shape} in the "
                    f"base model but the adapter's lora_A/lora_B give {got}"
                )
    raise_problems("experts do not fit the base model", problems)
    plan = []
    for name in modules:
        loras = [(i, e.modules[name]) for i, e in enumerate(experts) if name in e.modules]
        if loras:
            plan.append((name, loras))
    return plan
