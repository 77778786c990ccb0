"""XLoraGate and select_top_k against peft's XLoraClassifier and XLoraLayer."""

from __future__ import annotations

import itertools
import warnings
from types import SimpleNamespace

import peft
import pytest
import torch
from peft.tuners.xlora.classifier import XLoraClassifier
from peft.tuners.xlora.layer import XLoraLayer
from torch import nn

from loramix.config import XLoraConfig
from loramix.gate import XLoraGate, select_top_k

B, T, D, L, E = 2, 5, 12, 4, 3
SIZE = 8  # xlora_size


def configs(**options) -> tuple[XLoraConfig, peft.XLoraConfig]:
    adapters = {str(i): f"/experts/{i}" for i in range(E)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns about softmax + top-k combinations
        theirs = peft.XLoraConfig(hidden_size=D, adapters=adapters, **options)
    return XLoraConfig(adapters=adapters, hidden_size=D, **options), theirs


def peft_classifier(config: peft.XLoraConfig) -> XLoraClassifier:
    dtype_source = nn.Linear(1, 1)  # the classifier takes its dtype from a model's parameters
    return XLoraClassifier(dtype_source, config, E, L, torch.device("cpu"))


def randomize(module: nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))


def hidden(seed: int = 1) -> torch.Tensor:
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed))  # (B, T, D)


STRUCTURES = [
    {"xlora_depth": depth, "layerwise_scalings": layerwise, "xlora_dropout_p": p}
    for depth, layerwise, p in itertools.product((1, 2, 3), (False, True), (0.0, 0.2))
]


def structure_id(options: dict) -> str:
    return "depth{xlora_depth}-layerwise{layerwise_scalings}-p{xlora_dropout_p}".format(**options)


@pytest.mark.parametrize("options", STRUCTURES, ids=structure_id)
def test_state_dict_and_layers_equal_peft(options: dict) -> None:
    ours_config, theirs_config = configs(xlora_size=SIZE, **options)
    ours = XLoraGate(ours_config, D, L, E)
    theirs = peft_classifier(theirs_config)
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert list(ours_state) == list(theirs_state)
    assert {k: v.shape for k, v in ours_state.items()} == {
        k: v.shape for k, v in theirs_state.items()
    }
    assert [type(m) for m in ours.layers] == [type(m) for m in theirs.layers]
    dropouts = [m.p for m in ours.layers if isinstance(m, nn.Dropout)]
    assert dropouts == [m.p for m in theirs.layers if isinstance(m, nn.Dropout)]
    n_out = E * L if options["layerwise_scalings"] else E
    assert ours.layers[-1].out_features == n_out


OUTPUT_OPTIONS = [
    {},
    {"softmax_temperature": 0.3},
    {"softmax_temperature": 4.0, "layerwise_scalings": True},
    {"enable_softmax": False},
    {"enable_softmax": False, "layerwise_scalings": True, "xlora_depth": 2},
    {"xlora_depth": 3, "xlora_dropout_p": 0.5, "softmax_temperature": 0.7},
]


@pytest.mark.parametrize("options", OUTPUT_OPTIONS, ids=lambda o: ",".join(o) or "defaults")
def test_outputs_equal_peft(options: dict) -> None:
    ours_config, theirs_config = configs(xlora_size=SIZE, **options)
    ours = XLoraGate(ours_config, D, L, E).eval()
    randomize(ours)
    theirs = peft_classifier(theirs_config).eval()
    theirs.load_state_dict(ours.state_dict())
    states = hidden()
    out = ours(states)
    expected = theirs(SimpleNamespace(hidden_states=(states,)), input_ids=torch.zeros(B, T))
    assert out.shape == (B, T, L, E)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    if ours_config.enable_softmax:
        torch.testing.assert_close(out.sum(-1), torch.ones(B, T, L))
    if not ours_config.layerwise_scalings:  # one set of scalings shared by every module
        assert torch.equal(out, out[:, :, :1].expand_as(out))


def test_temperature_by_formula() -> None:
    config, _ = configs(softmax_temperature=0.25)
    gate = XLoraGate(config, D, L, E)
    randomize(gate)
    states = hidden()
    logits = gate.layers[0](states)  # (B, T, E)
    expected = torch.softmax(logits / 0.25, dim=-1).unsqueeze(2).expand(B, T, L, E)
    torch.testing.assert_close(gate(states), expected)


def test_dropout_is_active_only_in_training() -> None:
    config, _ = configs(xlora_depth=2, xlora_size=64, xlora_dropout_p=0.5)
    gate = XLoraGate(config, D, L, E)
    randomize(gate)
    states = hidden()
    gate.eval()
    assert torch.equal(gate(states), gate(states))
    gate.train()
    torch.manual_seed(0)
    assert not torch.allclose(gate(states), gate.eval()(states))


def test_gate_input_is_cast_to_its_dtype() -> None:
    config, _ = configs()
    gate = XLoraGate(config, D, L, E).to(torch.float64)
    assert gate(hidden()).dtype == torch.float64


# ------------------------------------------------------------------------ top-k


def peft_topk(scalings: torch.Tensor, k: int | None, renormalize: bool) -> torch.Tensor:
    """peft's per-layer top-k, stacked back to `(B, T, L, E)`."""
    _, config = configs(top_k_lora=k, enable_softmax_topk=renormalize)
    per_layer = [
        XLoraLayer(None, None, None, layer, config).get_maybe_topk_scalings(scalings)
        for layer in range(scalings.shape[2])
    ]  # L x (B, T, E)
    return torch.stack(per_layer, dim=2)


def scalings_cases() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(B, T, L, E, generator=generator) * 2
    with_zeros = torch.softmax(logits, -1)
    with_zeros[0, 0, 0, 1] = 0.0  # an exact zero (e.g. from an earlier top-k)
    with_zeros[1, 2, 3] = 0.0  # a token whose scalings are all zero
    return {"softmax": torch.softmax(logits, -1), "raw": logits, "zeros": with_zeros}


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("k", [None, *range(1, E + 1)])
@pytest.mark.parametrize("case", ["softmax", "raw", "zeros"])
def test_select_top_k_equals_peft(case: str, k: int | None, renormalize: bool) -> None:
    scalings = scalings_cases()[case]
    ours = select_top_k(scalings, k, renormalize)
    theirs = peft_topk(scalings, k, renormalize)
    assert ours.shape == scalings.shape
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
    if k is not None:
        assert ((ours != 0).sum(-1) <= k).all()


def test_select_top_k_by_hand() -> None:
    scalings = torch.tensor([0.1, 0.6, 0.3]).view(1, 1, 1, 3)
    assert select_top_k(scalings, 2, False).flatten().tolist() == pytest.approx([0.0, 0.6, 0.3])
    kept = torch.softmax(torch.tensor([0.6, 0.3]), 0).tolist()
    assert select_top_k(scalings, 2, True).flatten().tolist() == pytest.approx([0.0, *kept])
    assert select_top_k(scalings, None, False) is scalings
