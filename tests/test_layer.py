"""Mixing modules against direct per-expert formulas, merged deltas and op counts.

Reference values come from the formula of the module docstring written out per expert,

    y = W x + g * sum_i s[b, t, l, i] * scale_i * B_i A_i x,

in float64, with heterogeneous ranks and an expert that does not adapt the module.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from transformers.pytorch_utils import Conv1D

from loramix.experts import ModuleLora
from loramix.layer import (
    MixedEmbedding,
    MixedLinear,
    MixingState,
    adapted_shape,
    add_up_projection,
    is_quantized,
    make_mixed_module,
)

B, T, L, LAYER = 2, 5, 3, 1  # batch, tokens, adapted modules, this module's index
D_IN, D_OUT, V = 6, 7, 11
RANKS = {0: 2, 2: 5, 3: 1}  # expert index -> rank; expert 1 does not adapt this module
E = 4
SCALES = {0: 0.5, 2: 2.0, 3: -1.25}
G = 0.7


def make_loras(
    shape_in: int, shape_out: int, seed: int = 0, embedding: bool = False, ranks=RANKS
) -> list[tuple[int, ModuleLora]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            index,
            ModuleLora(
                torch.randn(rank, shape_in, generator=generator, dtype=torch.float64),
                torch.randn(shape_out, rank, generator=generator, dtype=torch.float64),
                SCALES.get(index, 1.0),
                embedding,
            ),
        )
        for index, rank in ranks.items()
    ]


def random_scalings(seed: int = 1, n_experts: int = E) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, L, n_experts, generator=generator, dtype=torch.float64)  # (B, T, L, E)


def reference_delta(
    x: torch.Tensor,
    loras: list[tuple[int, ModuleLora]],
    scalings: torch.Tensor,
    layer: int = LAYER,
    g: float = G,
) -> torch.Tensor:
    """`g * sum_i s_i scale_i B_i A_i x`, one expert at a time; `x` is `(B, T, D_in)`."""
    total = 0
    for index, lora in loras:
        s = scalings[:, :, layer, index].unsqueeze(-1)  # (B, T, 1)
        total = total + g * s * lora.scale * (x @ lora.lora_a.T @ lora.lora_b.T)
    return total


def linear_base() -> nn.Linear:
    torch.manual_seed(3)
    return nn.Linear(D_IN, D_OUT, dtype=torch.float64)


def conv1d_base() -> Conv1D:
    torch.manual_seed(4)
    base = Conv1D(D_OUT, D_IN).double()  # weight (D_in, D_out)
    nn.init.normal_(base.weight)
    nn.init.normal_(base.bias)
    return base


def embedding_base() -> nn.Embedding:
    torch.manual_seed(5)
    return nn.Embedding(V, D_OUT, dtype=torch.float64)


def inputs(seed: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, D_IN, generator=generator, dtype=torch.float64)


def token_ids(seed: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=generator)


# ------------------------------------------------------------- reference formulas


@pytest.mark.parametrize("make_base", [linear_base, conv1d_base], ids=["linear", "conv1d"])
def test_linear_equals_per_expert_formula(make_base) -> None:
    base = make_base()
    loras = make_loras(D_IN, D_OUT)
    state = MixingState(global_scaling_weight=G)
    module = make_mixed_module(base, LAYER, loras, state)
    assert type(module) is MixedLinear
    x, scalings = inputs(), random_scalings()
    if isinstance(base, Conv1D):
        expected_base = x @ base.weight + base.bias  # GPT-2 layout: weight (D_in, D_out)
    else:
        expected_base = x @ base.weight.T + base.bias
    expected = expected_base + reference_delta(x, loras, scalings)
    with torch.no_grad(), state.using(scalings):
        out = module(x)
    assert out.shape == (B, T, D_OUT)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    # the absent expert's scaling does not matter
    changed = scalings.clone()
    changed[..., 1] = 123.0
    with torch.no_grad(), state.using(changed):
        torch.testing.assert_close(module(x), expected, atol=1e-12, rtol=1e-12)


def test_embedding_equals_lookup_formula() -> None:
    base = embedding_base()
    loras = make_loras(V, D_OUT, embedding=True)
    state = MixingState(global_scaling_weight=G)
    module = make_mixed_module(base, LAYER, loras, state)
    assert type(module) is MixedEmbedding
    ids, scalings = token_ids(), random_scalings()
    expected = base.weight[ids].clone()  # (B, T, D)
    for index, lora in loras:
        s = scalings[:, :, LAYER, index].unsqueeze(-1)  # (B, T, 1)
        rows = lora.lora_a.T[ids]  # (B, T, r): column ids of A
        expected += G * s * lora.scale * (rows @ lora.lora_b.T)
    with torch.no_grad(), state.using(scalings):
        out = module(ids)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


class ScaledEmbedding(nn.Embedding):
    """Gemma-style: the embedding output is multiplied by `embed_scale`."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.embed_scale = 3.0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * self.embed_scale


def test_scaled_embedding_scales_the_update_too() -> None:
    torch.manual_seed(5)
    base = ScaledEmbedding(V, D_OUT, dtype=torch.float64)
    plain = embedding_base()
    plain.weight.data.copy_(base.weight.data)
    loras = make_loras(V, D_OUT, embedding=True)
    state = MixingState(global_scaling_weight=G)
    scaled_module = MixedEmbedding(base, LAYER, loras, state)
    plain_module = MixedEmbedding(plain, LAYER, loras, state)
    ids = token_ids()
    with torch.no_grad(), state.using(random_scalings()):
        torch.testing.assert_close(scaled_module(ids), 3.0 * plain_module(ids))


def test_gradient_reaches_the_scalings() -> None:
    """The gate trains through the scalings: their gradient must equal the formula's."""
    base = linear_base()
    loras = make_loras(D_IN, D_OUT)
    state = MixingState(global_scaling_weight=G)
    module = MixedLinear(base, LAYER, loras, state)
    x = inputs()
    ours = random_scalings().requires_grad_(True)
    theirs = ours.detach().clone().requires_grad_(True)
    weights = torch.randn(B, T, D_OUT, dtype=torch.float64)
    with state.using(ours):
        (module(x) * weights).sum().backward()
    (reference_delta(x, loras, theirs) * weights).sum().backward()
    torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-12, rtol=1e-12)
    assert ours.grad[:, :, LAYER, 1].abs().max() == 0  # absent expert
    assert ours.grad[:, :, 0].abs().max() == 0  # other modules' scalings


def test_modules_with_different_experts_and_ranks_share_one_state() -> None:
    """The state gathers every module's rank weights at once; each must get its own."""
    layouts = [{1: 3, 3: 2}, {0: 4}, {0: 1, 1: 2, 2: 3, 3: 4}]  # layer -> {expert: rank}
    state = MixingState(global_scaling_weight=G)
    modules, loras = [], []
    for layer, ranks in enumerate(layouts):
        loras.append(make_loras(D_IN, D_OUT, seed=10 + layer, ranks=ranks))
        modules.append(MixedLinear(linear_base(), layer, loras[layer], state))
    x = inputs()
    ours = random_scalings().requires_grad_(True)
    theirs = ours.detach().clone().requires_grad_(True)
    weights = torch.randn(B, T, D_OUT, dtype=torch.float64)
    with state.using(ours):
        outputs = [module(x) for module in reversed(modules)][::-1]  # any order of calls
    expected = [
        modules[layer].base_layer(x) + reference_delta(x, loras[layer], theirs, layer)
        for layer in range(L)
    ]
    for out, reference in zip(outputs, expected, strict=True):
        torch.testing.assert_close(out, reference, atol=1e-12, rtol=1e-12)
    sum((out * weights).sum() for out in outputs).backward()
    sum((out * weights).sum() for out in expected).backward()
    torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-12, rtol=1e-12)

    # new scalings and a new g in the next call are picked up, not the previous call's
    state.global_scaling_weight = 0.3
    other = random_scalings(seed=7)
    with torch.no_grad(), state.using(other):
        out = modules[2](x)
    reference = modules[2].base_layer(x) + reference_delta(x, loras[2], other, 2, g=0.3)
    torch.testing.assert_close(out, reference, atol=1e-12, rtol=1e-12)


# --------------------------------------------------------------- merged deltas


@pytest.mark.parametrize(
    "make_base", [linear_base, conv1d_base, embedding_base], ids=["linear", "conv1d", "embedding"]
)
def test_delta_weight_equals_unmerged(make_base) -> None:
    base = make_base()
    is_embedding = isinstance(base, nn.Embedding)
    loras = make_loras(V if is_embedding else D_IN, D_OUT, embedding=is_embedding)
    state = MixingState(global_scaling_weight=G)
    module = make_mixed_module(base, LAYER, loras, state)
    fixed = torch.tensor([0.3, -2.0, 1.1, 0.6], dtype=torch.float64)  # (E,)
    delta = module.delta_weight(fixed)
    assert delta.shape == base.weight.shape  # laid out like the base weight
    merged = base.weight + delta
    x = token_ids() if is_embedding else inputs()
    with torch.no_grad(), state.using(fixed.expand(B, T, L, E)):
        unmerged = module(x)
    if is_embedding:
        expected = F.embedding(x, merged)
    elif isinstance(base, Conv1D):
        expected = x @ merged + base.bias
    else:
        expected = F.linear(x, merged, base.bias)
    torch.testing.assert_close(unmerged, expected, atol=1e-12, rtol=1e-12)


# ----------------------------------------------------------- off, weights, state


@pytest.mark.parametrize("make_base", [linear_base, conv1d_base, embedding_base])
def test_no_scalings_gives_exactly_the_base_output(make_base) -> None:
    base = make_base()
    is_embedding = isinstance(base, nn.Embedding)
    loras = make_loras(V if is_embedding else D_IN, D_OUT, embedding=is_embedding)
    module = make_mixed_module(base, LAYER, loras, MixingState())
    x = token_ids() if is_embedding else inputs()
    with torch.no_grad():
        assert torch.equal(module(x), base(x))
    assert module.weight is base.weight


def test_zero_scalings_give_the_base_output() -> None:
    base = linear_base()
    state = MixingState()
    module = MixedLinear(base, LAYER, make_loras(D_IN, D_OUT), state)
    x = inputs()
    with torch.no_grad(), state.using(torch.zeros(B, T, L, E, dtype=torch.float64)):
        torch.testing.assert_close(module(x), base(x), atol=0, rtol=0)


def test_expert_weights_are_the_original_slices() -> None:
    loras = dict(make_loras(D_IN, D_OUT))
    module = MixedLinear(linear_base(), LAYER, list(loras.items()), MixingState())
    assert module.lora_a.shape == (sum(RANKS.values()), D_IN)  # (R, D_in)
    assert module.lora_b.shape == (D_OUT, sum(RANKS.values()))  # (D_out, R)
    for index in range(E):
        weights = module.expert_weights(index)
        if index not in loras:
            assert weights is None
            continue
        lora_a, lora_b = weights
        assert torch.equal(lora_a, loras[index].lora_a)
        assert torch.equal(lora_b, loras[index].lora_b)


def test_weights_follow_the_base_dtype() -> None:
    base = nn.Linear(D_IN, D_OUT, dtype=torch.float32)
    module = MixedLinear(base, LAYER, make_loras(D_IN, D_OUT), MixingState())
    assert module.lora_a.dtype == module.lora_b.dtype == torch.float32


def test_frozen_buffers_or_trainable_parameters() -> None:
    loras = make_loras(D_IN, D_OUT)
    frozen = MixedLinear(linear_base(), LAYER, loras, MixingState())
    assert {name for name, _ in frozen.named_parameters()} == {
        "base_layer.weight",
        "base_layer.bias",
    }
    assert {"lora_a", "lora_b"} <= set(frozen.state_dict())
    assert "expert_of_rank" not in frozen.state_dict()  # derived, not saved
    trainable = MixedLinear(linear_base(), LAYER, loras, MixingState(), trainable=True)
    parameters = dict(trainable.named_parameters())
    assert parameters["lora_a"].requires_grad and parameters["lora_b"].requires_grad


def test_state_using_restores_previous_value() -> None:
    state = MixingState()
    outer, inner = torch.zeros(1), torch.ones(1)
    with state.using(outer):
        with pytest.raises(RuntimeError), state.using(inner):
            assert state.scalings is inner
            raise RuntimeError
        assert state.scalings is outer
    assert state.scalings is None


@pytest.mark.parametrize("leading", [(), (5,), (2, 3)], ids=["vector", "rows", "batch"])
def test_add_up_projection_is_result_plus_up(leading: tuple[int, ...]) -> None:
    generator = torch.Generator().manual_seed(3)
    result = torch.randn(*leading, D_OUT, dtype=torch.float64, generator=generator)
    down = torch.randn(*leading, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    lora_b = torch.randn(D_OUT, 4, dtype=torch.float64, generator=generator)
    fused = add_up_projection(result, down, lora_b)
    assert fused.shape == result.shape
    torch.testing.assert_close(fused, result + down @ lora_b.T, rtol=0, atol=1e-12)
    fused.sum().backward()
    torch.testing.assert_close(down.grad, lora_b.sum(0).expand_as(down), rtol=0, atol=1e-12)


def test_add_up_projection_keeps_the_base_dtype() -> None:
    result = torch.randn(2, 3, D_OUT).to(torch.bfloat16)
    down, lora_b = torch.randn(2, 3, 4), torch.randn(D_OUT, 4)
    fused = add_up_projection(result, down, lora_b)
    assert fused.dtype == torch.bfloat16
    expected = result + (down @ lora_b.T).to(torch.bfloat16)
    torch.testing.assert_close(fused, expected, rtol=0, atol=0)


def test_adapted_shape() -> None:
    assert adapted_shape(linear_base()) == (D_IN, D_OUT)
    assert adapted_shape(conv1d_base()) == (D_IN, D_OUT)
    assert adapted_shape(embedding_base()) == (V, D_OUT)
    assert adapted_shape(nn.Conv2d(2, 3, 1)) is None
    assert adapted_shape(nn.LayerNorm(4)) is None


# ------------------------------------------------------------- no loop over experts


class CountCalls(TorchFunctionMode):
    """Counts every torch function called (matmuls, index ops, elementwise ops...)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("make_base", [linear_base, embedding_base], ids=["linear", "embedding"])
def test_number_of_ops_does_not_grow_with_experts(make_base) -> None:
    counts = {}
    for n_experts in (1, 3, 9):
        base = make_base()
        is_embedding = isinstance(base, nn.Embedding)
        ranks = {i: 1 + i % 3 for i in range(n_experts)}
        loras = make_loras(V if is_embedding else D_IN, D_OUT, embedding=is_embedding, ranks=ranks)
        state = MixingState()
        module = make_mixed_module(base, LAYER, loras, state)
        x = token_ids() if is_embedding else inputs()
        scalings = random_scalings(n_experts=n_experts)
        with torch.no_grad(), state.using(scalings), CountCalls() as counter:
            module(x)
        counts[n_experts] = counter.calls
    assert counts[1] == counts[3] == counts[9]
    matmuls = [
        name for name in counts[9] if name in ("linear", "matmul", "bmm", "mm", "addmm", "einsum")
    ]
    # a linear: the base GEMM, A_cat x and B_cat a; an embedding: lookups and B_cat a
    assert len(matmuls) == (1 if make_base is embedding_base else 3)


# ------------------------------------------------------------------- token layout


def test_flattened_rows_get_their_own_tokens_scalings() -> None:
    """OPT and Qwen2-MoE call some projections on `(B * T, D)`: row b * T + t is token (b, t)."""
    base, loras = linear_base(), make_loras(D_IN, D_OUT)
    state = MixingState(global_scaling_weight=G)
    module = make_mixed_module(base, LAYER, loras, state, module_name="mlp.fc1")
    x, scalings = inputs(), random_scalings()
    with torch.no_grad(), state.using(scalings):
        expected = module(x)  # (B, T, D_out)
        flat = module(x.reshape(B * T, D_IN))  # (B * T, D_out)
    torch.testing.assert_close(flat, expected.reshape(B * T, D_OUT), atol=1e-12, rtol=0)
    # per-sequence fixed scalings (frozen generation) broadcast over the flattened tokens too
    per_sequence = scalings[:, :1]  # (B, 1, L, E)
    with torch.no_grad(), state.using(per_sequence):
        expected = module(x)
        flat = module(x.reshape(B * T, D_IN))
    torch.testing.assert_close(flat, expected.reshape(B * T, D_OUT), atol=1e-12, rtol=0)


def test_a_subset_of_tokens_is_refused_with_the_module_name() -> None:
    """A module that sees only some tokens (routed experts) cannot get per-token scalings."""
    base, loras = linear_base(), make_loras(D_IN, D_OUT)
    state = MixingState(global_scaling_weight=G)
    module = make_mixed_module(base, LAYER, loras, state, module_name="mlp.experts.3.w1")
    routed = inputs().reshape(B * T, D_IN)[[0, 3, 4]]  # 3 of the 10 tokens
    with torch.no_grad(), state.using(random_scalings()), pytest.raises(ValueError) as error:
        module(routed)
    message = str(error.value)
    assert "mlp.experts.3.w1" in message and "(3,)" in message
    assert "leave it out of target_modules" in message
    # ... unless every token has the same scalings: then any subset gets them
    same = random_scalings()[:1, :1].expand(B, T, L, E)
    with torch.no_grad(), state.using(same):
        out = module(routed)
        expected = module(inputs().reshape(B * T, D_IN))[[0, 3, 4]]
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)


# ----------------------------------------------------------- placement and storage


def test_experts_follow_the_module_and_a_given_device() -> None:
    loras = make_loras(D_IN, D_OUT)
    offloaded = nn.Linear(D_IN, D_OUT, device="meta")  # as accelerate leaves an offloaded module
    module = make_mixed_module(offloaded, LAYER, loras, MixingState(), device="cpu")
    tensors = (module.lora_a, module.lora_b, module.expert_of_rank, module.scale_of_rank)
    assert {t.device.type for t in tensors} == {"cpu"}  # where the module runs
    module = make_mixed_module(linear_base(), LAYER, loras, MixingState())
    module.to("meta")  # experts and base move together with `.to()`
    assert module.lora_a.device.type == module.base_layer.weight.device.type == "meta"


def test_offloaded_weight_without_execution_device_is_refused() -> None:
    base = nn.Linear(D_IN, D_OUT, device="meta")
    with pytest.raises(ValueError, match="blocks.0.fc.*meta device"):
        make_mixed_module(
            base, LAYER, make_loras(D_IN, D_OUT), MixingState(), module_name="blocks.0.fc"
        )


def test_quantized_storage_keeps_float_experts_and_refuses_merging() -> None:
    """An integer-stored weight (as bitsandbytes keeps it) never sets the experts' dtype."""

    class Int8Linear(nn.Linear):  # stands in for a quantized layer: int8 storage, float compute
        def __init__(self) -> None:
            super().__init__(D_IN, D_OUT, bias=False)
            self.weight = nn.Parameter(torch.ones(D_OUT, D_IN, dtype=torch.int8), False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, self.weight.to(x.dtype))

    assert is_quantized(Int8Linear()) and not is_quantized(linear_base())
    state = MixingState(global_scaling_weight=G)
    loras = make_loras(D_IN, D_OUT)
    module = make_mixed_module(
        Int8Linear(), LAYER, loras, state, module_name="q", activation_dtype=torch.float64
    )
    assert module.lora_a.dtype == module.lora_b.dtype == torch.float64
    x, scalings = inputs(), random_scalings()
    with torch.no_grad(), state.using(scalings):
        out = module(x)
    expected = x @ torch.ones(D_OUT, D_IN, dtype=torch.float64).T + reference_delta(
        x, loras, scalings
    )
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="quantized.*scalings_mode='frozen'"):
        module.merged_weight(torch.ones(E, dtype=torch.float64))


# ------------------------------------------------------------------ half precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_rank_weights_cast_once_and_merge_in_float32(dtype) -> None:
    """float32 scalings reach the modules already in the experts' dtype; merging rounds once."""
    loras = make_loras(D_IN, D_OUT)
    state = MixingState(global_scaling_weight=G)
    module = MixedLinear(linear_base().to(dtype), LAYER, loras, state)
    assert module.lora_a.dtype == module.lora_b.dtype == dtype
    x = inputs().to(dtype)
    s = random_scalings().float()  # (B, T, L, E) as the gate gives them
    with torch.no_grad(), state.using(s, dtype=dtype):
        assert state.rank_weights(LAYER).dtype == dtype
        out = module(x)
    assert out.dtype == dtype
    exact = linear_base()(x.double()) + reference_delta(x.double(), loras, s.double())
    tolerance = 2e-2 if dtype == torch.float16 else 1e-1
    torch.testing.assert_close(
        out.double(), exact, atol=tolerance * exact.abs().max().item(), rtol=0
    )

    fixed = torch.rand(E, dtype=torch.float32)
    merged = module.merged_weight(fixed)
    assert merged.dtype == dtype
    scaled_b = module.lora_b.double() * module.rank_weights(fixed.double())  # (D_out, R)
    exact_weight = module.base_layer.weight.double() + scaled_b @ module.lora_a.double()
    one_rounding = exact_weight.to(dtype).double()  # the best a dtype weight can do
    error = (merged.double() - exact_weight).abs().max()
    assert error <= 2 * (one_rounding - exact_weight).abs().max() + 1e-6
