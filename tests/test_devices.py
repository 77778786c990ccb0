"""Bases placed by accelerate: experts where their module runs, the gate beside the LM head.

On the CPU: a base offloaded by accelerate (`cpu_offload`: weights on the meta device, loaded
by hooks at each call) gives exactly the in-memory model's outputs. With CUDA (`-m cuda`,
skipped without it): a base on the GPU, a base split across the GPU and offloaded CPU
modules by a `device_map`, and across two GPUs when there are two.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import cpu_offload
from helpers import LLAMA_TARGETS, make_expert, random_ids, tiny_llama
from transformers import AutoModelForCausalLM

from loramix import XLoraConfig, XLoraModel
from loramix.training.loss import row_nlls

NEW = 4
# The tiny Llama's modules; layer 1, the final norm and the head go to the second device.
SPLIT = ("model.layers.1", "model.norm", "lm_head")
FIRST = ("model.embed_tokens", "model.rotary_emb", "model.layers.0")


@pytest.fixture(scope="module")
def experts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("devices")
    return {
        "a": str(make_expert(tiny_llama, root / "a", 1, LLAMA_TARGETS, rank=4)),
        "b": str(make_expert(tiny_llama, root / "b", 2, LLAMA_TARGETS, rank=2, alpha=4)),
    }


def xlora(base: torch.nn.Module, experts: dict[str, str]) -> XLoraModel:
    model = XLoraModel(base, XLoraConfig(adapters=experts, layerwise_scalings=True))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in model.gate.parameters():
            param.copy_(torch.randn(param.shape, generator=generator).to(param.device) * 2.0)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def execution_device(module: torch.nn.Module) -> torch.device:
    """Where a module runs: its weight's device, or its accelerate hook's when offloaded."""
    if module.weight.device.type != "meta":
        return module.weight.device
    return torch.device(module._hf_hook.execution_device)


def assert_same_model(placed: XLoraModel, reference: XLoraModel) -> None:
    """Outputs and every generation mode of `placed` equal the in-memory CPU `reference`."""
    for module in placed.mixed_modules():
        device = execution_device(module.base_layer)
        assert module.lora_a.device == module.lora_b.device == device, module.module_name
    head = placed.lm.get_output_embeddings()
    assert placed.gate.layers[-1].weight.device == execution_device(head)
    ids = random_ids(2, 6)
    device = placed.lm.get_input_embeddings().weight.device
    if device.type == "meta":
        device = execution_device(placed.lm.get_input_embeddings())
    with torch.no_grad():
        ours = placed(input_ids=ids.to(device))
        theirs = reference(input_ids=ids)
    torch.testing.assert_close(ours.scalings.cpu(), theirs.scalings, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.logits.cpu(), theirs.logits, atol=1e-4, rtol=1e-4)
    labels = ids.clone()
    labels[:, :3] = -100  # the evaluation's NLL from the labelled positions' logits only
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    with torch.no_grad():
        sums, _, _ = row_nlls(placed, {k: v.to(device) for k, v in inputs.items()}, labelled=True)
        expected, _, _ = row_nlls(reference, inputs, labelled=False)
    torch.testing.assert_close(sums, expected, atol=1e-4, rtol=1e-4)
    for mode in ("granular", "frozen", "merged"):
        kwargs = dict(max_new_tokens=NEW, do_sample=False, scalings_mode=mode)
        expected = reference.generate(ids[:1], **kwargs)
        assert torch.equal(placed.generate(ids[:1].to(device), **kwargs).cpu(), expected), mode


def test_cpu_offloaded_base_equals_in_memory(experts: dict[str, str]) -> None:
    base = tiny_llama()
    cpu_offload(base, execution_device="cpu")  # weights on meta, loaded at each call
    assert base.model.layers[0].self_attn.q_proj.weight.device.type == "meta"
    assert_same_model(xlora(base, experts), xlora(tiny_llama(), experts))


def test_offloaded_weights_fall_back_from_merged_mode(experts: dict[str, str], caplog) -> None:
    base = tiny_llama()
    cpu_offload(base, execution_device="cpu")
    model = xlora(base, experts)
    with caplog.at_level("WARNING", logger="loramix.generation"):
        model.generate(random_ids(1, 5), max_new_tokens=2, scalings_mode="merged")
    assert "14 adapted weights are offloaded by accelerate" in caplog.text
    assert model.lm.model.layers[0].self_attn.q_proj.base_layer.weight.device.type == "meta"


# ------------------------------------------------------------------------------ CUDA


def saved_base(tmp_path: Path) -> Path:
    tiny_llama().save_pretrained(tmp_path / "base")
    return tmp_path / "base"


@pytest.mark.cuda
def test_base_on_cuda(experts: dict[str, str]) -> None:
    model = xlora(tiny_llama().to("cuda"), experts)
    assert {m.lora_a.device.type for m in model.mixed_modules()} == {"cuda"}
    assert_same_model(model, xlora(tiny_llama(), experts))


@pytest.mark.cuda
def test_device_map_cuda_and_offloaded_cpu(experts: dict[str, str], tmp_path: Path) -> None:
    device_map = {name: 0 for name in FIRST} | {name: "cpu" for name in SPLIT}
    base = AutoModelForCausalLM.from_pretrained(saved_base(tmp_path), device_map=device_map)
    assert_same_model(xlora(base.eval(), experts), xlora(tiny_llama(), experts))


@pytest.mark.cuda
def test_device_map_two_gpus(experts: dict[str, str], tmp_path: Path) -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    device_map = {name: 0 for name in FIRST} | {name: 1 for name in SPLIT}
    base = AutoModelForCausalLM.from_pretrained(saved_base(tmp_path), device_map=device_map)
    model = xlora(base.eval(), experts)
    devices = {m.module_name: m.lora_a.device for m in model.mixed_modules()}
    assert devices["model.layers.0.self_attn.q_proj"] == torch.device("cuda", 0)
    assert devices["model.layers.1.self_attn.q_proj"] == torch.device("cuda", 1)
    assert_same_model(model, xlora(tiny_llama(), experts))
