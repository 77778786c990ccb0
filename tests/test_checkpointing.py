"""loramix.checkpointing: activation checkpointing gives the same gate gradients, keeps fewer
activations, leaves no hooks behind, and refuses the settings that drop the gradient."""

from __future__ import annotations

import pytest
import torch
from helpers import random_ids, randomize_gate, tiny_llama

from loramix import XLoraConfig, XLoraModel


def gate_gradients(model: XLoraModel, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """The gate's gradients of the summed loss of several forward calls, one backward."""
    model.gate.zero_grad(set_to_none=True)
    loss = sum(model(input_ids=ids, labels=ids).loss for ids in batches)
    loss.backward()
    return [p.grad.clone() for p in model.gate.parameters()]


def count_saved_tensors(model: XLoraModel, ids: torch.Tensor) -> int:
    packed = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        packed.append(1)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, labels=ids)
    return len(packed)


@pytest.mark.parametrize("layerwise", [False, True])
def test_activation_checkpointing_gives_the_same_gate_gradients(
    llama_experts: dict, layerwise: bool
) -> None:
    config = XLoraConfig(
        adapters=llama_experts, layerwise_scalings=layerwise, xlora_dropout_p=0.0, top_k_lora=2
    )
    model = XLoraModel(tiny_llama(), config).train()
    randomize_gate(model, std=0.5)
    batches = [random_ids(seed=1), random_ids(seed=2)]
    plain = gate_gradients(model, batches)
    saved_plain = count_saved_tensors(model, batches[0])

    model.gradient_checkpointing_enable()
    assert model.checkpointing_activations
    # Two forward calls before one backward: each layer's recompute must see its own call.
    checkpointed = gate_gradients(model, batches)
    for expected, got in zip(plain, checkpointed, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert count_saved_tensors(model, batches[0]) < saved_plain / 2  # activations not kept
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"gate.layers.0.weight", "gate.layers.0.bias"}

    model.gradient_checkpointing_disable()
    assert not model.checkpointing_activations


def test_activation_checkpointing_leaves_no_hooks(llama_experts: dict) -> None:
    model = XLoraModel(tiny_llama(), XLoraConfig(adapters=llama_experts))
    model.activation_checkpointing_enable()  # transformers' newer name reaches the same code
    assert model.checkpointing_activations
    assert not model.lm.get_input_embeddings()._forward_hooks
    base = model.unload()
    assert not any(getattr(m, "gradient_checkpointing", False) for m in base.modules())


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"use_reentrant": True}, "use_reentrant"), ({"context_fn": None}, "context_fn")],
)
def test_activation_checkpointing_refuses_what_drops_the_gradient(
    llama_experts: dict, kwargs: dict, field: str
) -> None:
    model = XLoraModel(tiny_llama(), XLoraConfig(adapters=llama_experts))
    with pytest.raises(ValueError, match=field):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    assert not model.checkpointing_activations
