"""XLoraModel: equivalence with peft, disable, freezing, switches, and input errors."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
from helpers import (
    GPT2_TARGETS,
    LLAMA_TARGETS,
    MODEL_FACTORIES,
    make_expert,
    random_ids,
    randomize_gate,
    tiny_gpt2,
    tiny_llama,
)
from peft import PeftModel, get_peft_model
from transformers import LlamaForCausalLM

from loramix import XLoraConfig, XLoraModel
from loramix.cache import XLoraCache
from loramix.model import last_positions


def frozen_uniform_gate(model: XLoraModel, value: float) -> None:
    """A gate whose scalings are `value` for every expert (no softmax)."""
    with torch.no_grad():
        last = model.gate.layers[-1]
        last.weight.zero_()
        last.bias.fill_(value)


def peft_xlora(base_factory, experts: dict[str, str], gate_state: dict, **options):
    """peft's XLoraModel with the same experts (named "0".."n-1") and gate weights."""
    base = base_factory()
    base.config.use_cache = False
    config = peft.XLoraConfig(
        task_type="CAUSAL_LM",
        hidden_size=base.config.get_text_config().hidden_size,
        adapters={str(i): path for i, path in enumerate(experts.values())},
        **options,
    )
    model = get_peft_model(base, config).eval()
    model.base_model.internal_xlora_classifier.load_state_dict(gate_state)
    return model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_one_expert_with_unit_scalings_equals_peft_lora(arch: str, tmp_path: Path) -> None:
    factory, targets = MODEL_FACTORIES[arch]
    folder = make_expert(factory, tmp_path / "only", 7, targets, rank=4, alpha=16)
    model = XLoraModel(factory(), XLoraConfig(adapters={"only": str(folder)}, enable_softmax=False))
    frozen_uniform_gate(model, 1.0)
    reference = PeftModel.from_pretrained(factory(), folder).eval()
    ids = random_ids(2, 9)
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        theirs = reference(input_ids=ids).logits
        base = factory()(input_ids=ids).logits
    assert not torch.allclose(theirs, base, atol=1e-3)  # the expert matters
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


OPTION_SETS = [
    {},
    {"layerwise_scalings": True},
    {"top_k_lora": 2},
    {"top_k_lora": 1, "enable_softmax_topk": True},
    {"layerwise_scalings": True, "top_k_lora": 2, "enable_softmax_topk": True},
    {"xlora_depth": 3, "xlora_size": 16, "softmax_temperature": 0.5},
    {"enable_softmax": False, "global_scaling_weight": 0.7},
]


@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: ",".join(o) or "defaults")
def test_matches_peft_xlora_on_llama(options: dict, llama_experts: dict[str, str]) -> None:
    model = XLoraModel(tiny_llama(), XLoraConfig(adapters=llama_experts, **options))
    randomize_gate(model)
    reference = peft_xlora(tiny_llama, llama_experts, model.gate.state_dict(), **options)
    ids = random_ids(3, 11)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding on one row
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask)
        theirs = reference(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        ours.scalings, reference.base_model.get_latest_scalings(), atol=1e-6, rtol=0
    )
    assert ours.scalings.shape == (3, 11, model.n_layers, 3)


def test_gpt2_fixed_mix_equals_peft_multi_adapter(gpt2_experts: dict[str, str]) -> None:
    """peft's X-LoRA cannot load GPT-2 experts (its key rewriting assumes `model.` paths), so
    the oracle here is a PeftModel with both adapters active, each scaled by a fixed s_i."""
    weights = {"a": 0.3, "b": 1.7}
    model = XLoraModel(tiny_gpt2(), XLoraConfig(adapters=gpt2_experts, enable_softmax=False))
    with torch.no_grad():
        model.gate.layers[-1].weight.zero_()
        model.gate.layers[-1].bias.copy_(torch.tensor(list(weights.values())))
    reference = PeftModel.from_pretrained(tiny_gpt2(), gpt2_experts["a"], adapter_name="a")
    reference.load_adapter(gpt2_experts["b"], adapter_name="b")
    reference.base_model.set_adapter(["a", "b"])
    for module in reference.modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            for name, weight in weights.items():
                module.set_scale(name, weight)
    ids = random_ids(2, 8)
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        theirs = reference(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_nonzero_scaling_pass_value_matches_peft(llama_experts: dict[str, str]) -> None:
    model = XLoraModel(tiny_llama(), XLoraConfig(adapters=llama_experts))
    model.set_scaling_pass_value(None)  # 1 / n_experts
    assert model.scaling_pass_value == pytest.approx(1 / 3)
    randomize_gate(model)
    reference = peft_xlora(
        tiny_llama, llama_experts, model.gate.state_dict(), scaling_pass_value=1 / 3
    )
    ids = random_ids(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5, rtol=0
        )


def test_embedding_experts_match_peft(tmp_path: Path) -> None:
    targets = ["embed_tokens", "q_proj"]
    experts = {
        "x": str(make_expert(tiny_llama, tmp_path / "x", 1, targets)),
        "y": str(make_expert(tiny_llama, tmp_path / "y", 2, targets, rank=2)),
    }
    model = XLoraModel(tiny_llama(), XLoraConfig(adapters=experts))
    assert model.adapted_modules[0] == "model.embed_tokens"
    randomize_gate(model)
    reference = peft_xlora(tiny_llama, experts, model.gate.state_dict())
    ids = random_ids(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5, rtol=0
        )


def test_expert_names_and_layer_order(llama_experts: dict[str, str]) -> None:
    model = XLoraModel(tiny_llama(), XLoraConfig(adapters=llama_experts))
    assert model.expert_names == ["bio", "chem", "mech"]
    all_names = [name for name, _ in tiny_llama().named_modules()]
    positions = [all_names.index(name) for name in model.adapted_modules]
    assert positions == sorted(positions)
    assert model.n_layers == 2 * 7  # 2 blocks x 7 projections
    assert model.base_model is model.lm


def test_loss_type_is_the_base_models_so_the_trainer_counts_shifted_labels(
    llama_experts: dict[str, str], tmp_path: Path
) -> None:
    from transformers import Trainer, TrainingArguments

    base = tiny_llama()
    model = XLoraModel(base, XLoraConfig(adapters=llama_experts))
    assert model.loss_type == base.loss_type == "ForCausalLM"
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    # Without it the Trainer counts every row's first label in `num_items_in_batch`, and the
    # loss of a batch whose first tokens are labelled (plain text lines) comes out too small.
    assert Trainer(model=model, args=args)._loss_shifts_labels


def test_scalings_are_softmax_over_experts(llama_experts: dict[str, str]) -> None:
    model = XLoraModel(tiny_llama(), XLoraConfig(adapters=llama_experts, top_k_lora=1))
    randomize_gate(model)
    scalings = model(input_ids=random_ids()).scalings
    torch.testing.assert_close(scalings.sum(-1), torch.ones(scalings.shape[:-1]))
    assert (scalings > 0).all()  # reported before top-k
    assert torch.equal(model.get_latest_scalings(), scalings.detach())


def test_disable_adapters_gives_base_model(llama_experts: dict[str, str]) -> None:
    model = XLoraModel(tiny_llama(), XLoraConfig(adapters=llama_experts))
    randomize_gate(model)
    ids = random_ids()
    with torch.no_grad():
        base = tiny_llama()(input_ids=ids).logits
        mixed = model(input_ids=ids).logits
        with model.disable_adapters():
            disabled = model(input_ids=ids).logits
        again = model(input_ids=ids).logits
    assert not torch.allclose(mixed, base, atol=1e-3)
    assert torch.equal(disabled, base)
    assert torch.equal(again, mixed)


def trainable_names(model: torch.nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


GATE_PARAMS = {"gate.layers.0.weight", "gate.layers.0.bias"}


def test_only_gate_trainable_through_lifecycle(llama_experts: dict, tmp_path: Path) -> None:
    model = XLoraModel(tiny_llama(), XLoraConfig(adapters=llama_experts))
    assert trainable_names(model) == GATE_PARAMS
    model.train()
    ids = random_ids()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == GATE_PARAMS
    model.eval()
    assert trainable_names(model) == GATE_PARAMS
    model.generate(ids, max_new_tokens=2, do_sample=False, use_cache=False)
    with model.disable_adapters():
        model(input_ids=ids)
    assert trainable_names(model) == GATE_PARAMS
    model.save_pretrained(tmp_path / "saved")
    reloaded = XLoraModel.from_pretrained(tiny_llama(), tmp_path / "saved")
    assert trainable_names(reloaded) == GATE_PARAMS


@pytest.mark.parametrize("first_call", ["inference_mode", "generate"])
def test_training_after_inference_mode_call(llama_experts: dict, first_call: str) -> None:
    # A first forward under inference mode must leave no inference tensor behind that a
    # later, gradient-tracking forward would need (e.g. cached per-model index tensors).
    model = XLoraModel(tiny_llama(), XLoraConfig(adapters=llama_experts))
    ids = random_ids()
    with torch.inference_mode():
        if first_call == "generate":
            model.generate(ids, max_new_tokens=2, do_sample=False)
        else:
            model(input_ids=ids)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for p in model.gate.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("trainable_adapters", [False, True])
def test_parameter_counts_match_peft(llama_experts: dict, trainable_adapters: bool, capsys) -> None:
    config = XLoraConfig(adapters=llama_experts, use_trainable_adapters=trainable_adapters)
    model = XLoraModel(tiny_llama(), config)
    reference = peft_xlora(tiny_llama, llama_experts, model.gate.state_dict())
    expected_total = reference.get_nb_trainable_parameters()[1]
    trainable, total = model.get_nb_trainable_parameters()
    assert total == expected_total
    gate = sum(p.numel() for p in model.gate.parameters())
    experts = total - sum(p.numel() for p in tiny_llama().parameters()) - gate
    assert trainable == gate + (experts if trainable_adapters else 0)
    model.print_trainable_parameters()
    assert capsys.readouterr().out == (
        f"trainable params: {trainable:,d} || all params: {total:,d} || "
        f"trainable%: {100 * trainable / total:.4f}\n"
    )


def test_trainable_adapters_are_parameters(llama_experts: dict[str, str]) -> None:
    model = XLoraModel(
        tiny_llama(), XLoraConfig(adapters=llama_experts, use_trainable_adapters=True)
    )
    names = trainable_names(model)
    assert names >= GATE_PARAMS
    assert "lm.model.layers.0.self_attn.q_proj.lora_a" in names
    assert not any("base_layer" in name for name in names)


def test_unload_restores_base_modules(llama_experts: dict[str, str]) -> None:
    base = tiny_llama()
    original = base.model.layers[0].self_attn.q_proj
    model = XLoraModel(base, XLoraConfig(adapters=llama_experts))
    assert model.lm.model.layers[0].self_attn.q_proj is not original
    assert model.unload().model.layers[0].self_attn.q_proj is original


def test_runtime_setters(llama_experts: dict[str, str]) -> None:
    model = XLoraModel(tiny_llama(), XLoraConfig(adapters=llama_experts))
    randomize_gate(model)
    ids = random_ids()
    with torch.no_grad():
        full = model(input_ids=ids).logits
        model.set_global_scaling_weight(0.0)
        with model.disable_adapters():
            base = model(input_ids=ids).logits
        torch.testing.assert_close(model(input_ids=ids).logits, base, atol=1e-6, rtol=0)
        model.set_global_scaling_weight(1.0)
        assert torch.equal(model(input_ids=ids).logits, full)
    assert model.current_config().global_scaling_weight == 1.0
    with pytest.raises(ValueError, match="top_k_lora=4"):
        model.set_topk_lora(4)
    with pytest.raises(ValueError, match="global_scaling_weight"):
        model.set_global_scaling_weight("1")  # type: ignore[arg-type]


# ------------------------------------------------------------------------- errors


def test_wrong_architecture_names_module_and_shapes(tmp_path: Path) -> None:
    folder = make_expert(tiny_gpt2, tmp_path / "gpt2", 1, GPT2_TARGETS)
    with pytest.raises(ValueError, match=r"matches no module of the base model") as error:
        XLoraModel(tiny_llama(), XLoraConfig(adapters={"g": str(folder)}))
    assert "transformer.h.0.attn.c_attn" in str(error.value)


def test_shape_mismatch_names_module_and_both_shapes(tmp_path: Path) -> None:
    def wide_llama():
        model = tiny_llama()
        config = model.config
        config.intermediate_size = 64
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM(config).eval()

    folder = make_expert(wide_llama, tmp_path / "wide", 1, ["up_proj"])
    base = tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError) as error:
        XLoraModel(base, XLoraConfig(adapters={"w": str(folder)}))
    message = str(error.value)
    assert "model.layers.0.mlp.up_proj" in message
    assert "(32, 48)" in message and "(32, 64)" in message
    # a failed construction leaves the base model as it was
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    assert type(base.model.layers[0].mlp.up_proj) is torch.nn.Linear


def test_dora_expert_refused(tmp_path: Path) -> None:
    folder = make_expert(tiny_llama, tmp_path / "dora", 1, ["q_proj"], use_dora=True)
    with pytest.raises(ValueError, match="use_dora"):
        XLoraModel(tiny_llama(), XLoraConfig(adapters={"d": str(folder)}))


def test_zero_experts_refused() -> None:
    with pytest.raises(ValueError, match="at least one expert"):
        XLoraConfig(adapters={})


def test_double_wrapping_refused(llama_experts: dict[str, str]) -> None:
    base = tiny_llama()
    XLoraModel(base, XLoraConfig(adapters=llama_experts))
    with pytest.raises(ValueError, match="unload"):
        XLoraModel(base, XLoraConfig(adapters=llama_experts))


def test_hidden_size_mismatch(llama_experts: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="hidden_size=64 but the base model's hidden size is 32"):
        XLoraModel(tiny_llama(), XLoraConfig(adapters=llama_experts, hidden_size=64))


def test_use_cache_returns_an_xlora_cache_that_continues(llama_experts: dict) -> None:
    model = XLoraModel(tiny_llama(), XLoraConfig(adapters=llama_experts))
    randomize_gate(model)
    ids = random_ids(tokens=9)
    full = model(input_ids=ids, use_cache=False)
    assert full.past_key_values is None
    first = model(input_ids=ids[:, :5])  # use_cache=None: the base config's True
    assert isinstance(first.past_key_values, XLoraCache)
    assert first.past_key_values.scaling_cache.get_seq_length() == 5
    rest = model(input_ids=ids[:, 5:], past_key_values=first.past_key_values)
    torch.testing.assert_close(rest.logits, full.logits[:, 5:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rest.scalings, full.scalings[:, 5:], rtol=1e-5, atol=1e-6)

    model.train()  # training keeps no cache unless asked
    assert model(input_ids=ids).past_key_values is None
    assert isinstance(model(input_ids=ids, use_cache=True).past_key_values, XLoraCache)


def test_plain_cache_refused(llama_experts: dict[str, str]) -> None:
    from transformers import DynamicCache

    model = XLoraModel(tiny_llama(), XLoraConfig(adapters=llama_experts))
    with pytest.raises(ValueError, match="XLoraCache"):
        model(input_ids=random_ids(), cache=DynamicCache(), use_cache=True)


def test_llama_targets_constant_is_complete() -> None:
    names = {name.rsplit(".", 1)[-1] for name, _ in tiny_llama().named_modules()}
    assert set(LLAMA_TARGETS) <= names


def test_fixed_one_hot_scalings_equal_that_expert_alone(llama_experts: dict[str, str]) -> None:
    model = XLoraModel(tiny_llama(), XLoraConfig(adapters=llama_experts, top_k_lora=1))
    randomize_gate(model)
    ids = random_ids(2, 6)
    with torch.no_grad():
        gated = model(input_ids=ids).logits
        for index, (name, folder) in enumerate(llama_experts.items()):
            alone = PeftModel.from_pretrained(tiny_llama(), folder).eval()
            with model.fixed_scalings(torch.eye(3)[index]):
                output = model(input_ids=ids)
            torch.testing.assert_close(
                output.logits, alone(input_ids=ids).logits, atol=1e-5, rtol=0
            )
            assert torch.equal(output.scalings[0, 0, 0], torch.eye(3)[index]), name
        assert torch.equal(model(input_ids=ids).logits, gated)  # the gate is back afterwards
    with pytest.raises(ValueError, match=r"give \(3,\)"), model.fixed_scalings(torch.ones(4)):
        pass


def test_experts_and_gate_move_with_the_model(llama_experts: dict[str, str]) -> None:
    """`.to()` moves the base, the stacked experts (buffers) and the gate together; a model
    built on a base already on a GPU is checked in test_cuda.py."""
    model = XLoraModel(tiny_llama(), XLoraConfig(adapters=llama_experts)).to("meta")
    devices = {t.device.type for t in [*model.parameters(), *model.buffers()]}
    assert devices == {"meta"}
    assert model.gate.layers[0].weight.device.type == "meta"


# ------------------------------------------------------------------ half precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_from_pretrained_at_a_half_dtype_keeps_the_gate_float32(
    dtype, llama_experts: dict[str, str], tmp_path: Path
) -> None:
    model = XLoraModel(tiny_llama(), XLoraConfig(adapters=llama_experts, layerwise_scalings=True))
    randomize_gate(model)
    model.save_pretrained(tmp_path / "saved")
    ids = random_ids(2, 6)
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    tiny_llama().save_pretrained(tmp_path / "base")  # by folder: loramix loads it at `dtype`
    loaded = XLoraModel.from_pretrained(tmp_path / "base", tmp_path / "saved", dtype=dtype)
    assert loaded.lm.get_input_embeddings().weight.dtype == dtype
    assert {m.lora_a.dtype for m in loaded.mixed_modules()} == {dtype}
    assert {p.dtype for p in loaded.gate.parameters()} == {torch.float32}
    with torch.no_grad():
        output = loaded(input_ids=ids)
    assert output.scalings.dtype == torch.float32
    tolerance = 2e-2 if dtype == torch.float16 else 1e-1
    scale = reference.abs().max().item()
    torch.testing.assert_close(output.logits.float(), reference, atol=tolerance * scale, rtol=0)


def test_gate_is_float32_over_a_half_precision_base(llama_experts: dict[str, str]) -> None:
    model = XLoraModel(tiny_llama().to(torch.bfloat16), XLoraConfig(adapters=llama_experts))
    assert model.gate.layers[-1].weight.dtype == torch.float32
    assert model.expert_dtype == torch.bfloat16
    scalings = model(input_ids=random_ids(1, 4)).scalings
    assert scalings.dtype == torch.float32
    torch.testing.assert_close(scalings.sum(-1), torch.ones(1, 4, model.n_layers))


class RecordingLlama(LlamaForCausalLM):
    """A Llama that keeps the `logits_to_keep` of its last call."""

    def forward(self, *args, logits_to_keep=0, **kwargs):
        self.last_logits_to_keep = logits_to_keep
        return super().forward(*args, logits_to_keep=logits_to_keep, **kwargs)


@pytest.mark.parametrize("keep", [1, 3, 7, 20])
def test_logits_to_keep_gives_the_last_positions_logits(llama_experts: dict, keep: int) -> None:
    base = RecordingLlama(tiny_llama().config)
    base.load_state_dict(tiny_llama().state_dict())
    model = XLoraModel(base, XLoraConfig(hidden_size=32, adapters=llama_experts))
    randomize_gate(model)
    ids = random_ids(batch=3, tokens=7)
    with torch.no_grad():
        full = model(input_ids=ids).logits  # (B, T, vocab)
        last = model(input_ids=ids, logits_to_keep=keep).logits
    torch.testing.assert_close(last, full[:, -keep:], rtol=1e-5, atol=1e-6)
    passed = base.last_logits_to_keep  # an index where an int would slice part of T
    assert passed == keep if keep >= 7 else passed.tolist() == list(range(7 - keep, 7))


def test_last_positions_gathers_only_where_an_int_slices_part_on_the_cpu() -> None:
    ids = torch.zeros(2, 5, dtype=torch.long)
    assert last_positions(2, ids).tolist() == [3, 4]
    assert last_positions(1, torch.zeros(2, 5, 8)).tolist() == [4]  # input embeddings
    assert last_positions(0, ids) == 0  # every position
    assert last_positions(5, ids) == 5  # every position too: nothing to gather
    assert last_positions(1, ids[:, :1]) == 1  # one position (a decoding step) is contiguous
    assert last_positions(2, torch.zeros(2, 5, device="meta")) == 2  # not the CPU
    assert last_positions(2, None) == 2
    index = torch.tensor([0, 2])
    assert last_positions(index, ids) is index
