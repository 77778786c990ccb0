"""Generation: cached equals uncached, batched equals one by one, frozen and merged modes."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from helpers import GPT2_TARGETS, MODEL_FACTORIES, make_expert, tiny_gpt2
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from loramix import XLoraConfig, XLoraModel
from loramix.gate import select_top_k
from loramix.generation import (
    MergedWeights,
    dominant_experts,
    generated_token_scalings,
    merge_problems,
)

NEW = 6  # new tokens per call
PAD = 0


@pytest.fixture(scope="module")
def expert_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    """Two experts per architecture, written once for the whole module."""
    folders = {}
    for arch, (factory, targets) in MODEL_FACTORIES.items():
        root = tmp_path_factory.mktemp(arch)
        folders[arch] = {
            "a": str(make_expert(factory, root / "a", 1, targets, rank=4)),
            "b": str(make_expert(factory, root / "b", 2, targets, rank=2, alpha=4)),
        }
    return folders


def make_model(arch: str, folders: dict[str, dict[str, str]], **options) -> XLoraModel:
    """Layer-wise gate with random weights, so scalings differ per token and module."""
    factory, _ = MODEL_FACTORIES[arch]
    options.setdefault("layerwise_scalings", True)
    model = XLoraModel(factory(), XLoraConfig(adapters=folders[arch], **options))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in model.gate.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 2.0)
    model.generation_config.eos_token_id = None  # always generate NEW tokens
    model.generation_config.pad_token_id = PAD
    return model


def left_padded(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`(B, max)` prompt ids, left-padded with PAD, and the attention mask."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, width - length :] = torch.randint(3, 97, (length,), generator=generator)
        mask[row, width - length :] = 1
    return ids, mask


def full_logits(model: XLoraModel, sequences: torch.Tensor, prompt_mask: torch.Tensor):
    """No-cache recomputation of the whole sequence, positions as generate computes them."""
    ones = torch.ones(len(sequences), sequences.shape[1] - prompt_mask.shape[1], dtype=torch.long)
    mask = torch.cat([prompt_mask, ones], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=sequences, attention_mask=mask, position_ids=positions).logits


def step_logits(out) -> torch.Tensor:
    return torch.stack(out.logits, dim=1)  # (B, N, V)


@pytest.fixture
def merges(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> list[int]:
    """Records every real merge, so a merged-mode test fails if the call fell back to frozen."""
    calls: list[int] = []
    original = MergedWeights.merge

    def counted(self: MergedWeights, expert_scalings: torch.Tensor) -> None:
        calls.append(1)
        original(self, expert_scalings)

    monkeypatch.setattr(MergedWeights, "merge", counted)
    caplog.set_level(logging.WARNING, logger="loramix.generation")
    return calls


def assert_merged(merges: list[int], caplog: pytest.LogCaptureFixture, expected: int) -> None:
    """Merged mode merged `expected` times and never warned about running in frozen mode."""
    assert len(merges) == expected
    assert "frozen mode" not in caplog.text


def generate(model: XLoraModel, ids, mask, **kwargs):
    kwargs.setdefault("max_new_tokens", NEW)
    kwargs.setdefault("do_sample", False)
    return model.generate(ids, attention_mask=mask, **kwargs)


# -------------------------------------------------------- cached equals uncached


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("lengths", [[7], [7, 4, 5]], ids=["batch1", "batch3-padded"])
def test_cached_logits_equal_full_recomputation(arch, lengths, expert_folders) -> None:
    model = make_model(arch, expert_folders)
    ids, mask = left_padded(lengths)
    out = generate(model, ids, mask, output_logits=True, return_dict_in_generate=True)
    assert out.sequences.shape == (len(lengths), ids.shape[1] + NEW)
    reference = full_logits(model, out.sequences[:, :-1], mask)[:, ids.shape[1] - 1 :]
    torch.testing.assert_close(step_logits(out), reference, atol=1e-4, rtol=0)
    uncached = generate(model, ids, mask, use_cache=False)
    assert torch.equal(out.sequences, uncached)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", ["granular", "frozen", "merged"])
def test_batched_padded_equals_one_by_one(arch, mode, expert_folders, merges, caplog) -> None:
    model = make_model(arch, expert_folders)
    lengths = [7, 3, 5]
    ids, mask = left_padded(lengths)
    batched = generate(model, ids, mask, scalings_mode=mode)
    for row, length in enumerate(lengths):
        alone = generate(model, ids[row : row + 1, -length:], None, scalings_mode=mode)
        assert torch.equal(batched[row, -length - NEW :], alone[0]), f"row {row}"
    # merged: the batch is merged row by row (3), then each row alone (3)
    assert_merged(merges, caplog, 6 if mode == "merged" else 0)


def test_beam_search_cached_equals_uncached(expert_folders) -> None:
    model = make_model("llama", expert_folders)
    ids, mask = left_padded([6, 4])
    beams = dict(num_beams=3, num_return_sequences=2)
    cached = generate(model, ids, mask, **beams)
    assert cached.shape == (4, ids.shape[1] + NEW)
    assert torch.equal(cached, generate(model, ids, mask, use_cache=False, **beams))


def test_sampling_cached_equals_uncached(expert_folders) -> None:
    model = make_model("gpt2", expert_folders)
    ids, mask = left_padded([5, 3])
    torch.manual_seed(11)
    cached = generate(model, ids, mask, do_sample=True, top_k=20)
    torch.manual_seed(11)
    assert torch.equal(
        cached, generate(model, ids, mask, do_sample=True, top_k=20, use_cache=False)
    )


class Collect(BaseStreamer):
    def __init__(self) -> None:
        self.chunks: list[torch.Tensor] = []
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        self.chunks.append(value.reshape(-1))

    def end(self) -> None:
        self.ended = True


class StopAtLength(StoppingCriteria):
    def __init__(self, length: int) -> None:
        self.length = length

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length)


@pytest.mark.parametrize("mode", ["granular", "merged"])
def test_streamer_and_stopping_criteria(mode, expert_folders) -> None:
    model = make_model("llama", expert_folders)
    ids, _ = left_padded([5])
    streamer = Collect()
    stop = StoppingCriteriaList([StopAtLength(5 + 3)])
    out = generate(model, ids, None, streamer=streamer, stopping_criteria=stop, scalings_mode=mode)
    assert out.shape == (1, 8)
    assert streamer.ended
    assert torch.equal(torch.cat(streamer.chunks), out[0])


# -------------------------------------------------------------------- frozen


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_frozen_uses_the_prompt_mean_and_skips_the_scaling_pass(arch, expert_folders) -> None:
    model = make_model(arch, expert_folders, top_k_lora=1)
    ids, mask = left_padded([6, 3])
    cache = model.new_cache()
    model.enable_scalings_logging()
    out = generate(
        model,
        ids,
        mask,
        scalings_mode="frozen",
        cache=cache,
        output_logits=True,
        return_dict_in_generate=True,
    )
    log = model.get_scalings_log()
    width = ids.shape[1]
    assert len(log) == NEW and log[0].shape[:2] == (2, width)
    # fixed = mean of the prompt's scalings over real tokens (padding left out)
    real = mask[:, :, None, None].float()
    expected_fixed = (log[0] * real).sum(1) / real.sum(1)  # (B, L, E)
    for entry in log[1:]:
        torch.testing.assert_close(entry[:, 0], expected_fixed, atol=1e-6, rtol=0)
    # the scaling pass ran over the prompt only
    assert cache.scaling_cache.get_seq_length() == width
    assert cache.get_seq_length() == width + NEW - 1
    assert cache.freeze_plan is None and cache.sequence_state == {}
    # logits equal a no-cache X-LoRA pass with the prompt's own scalings, then fixed ones
    scalings = torch.cat(
        [log[0], expected_fixed[:, None].expand(-1, NEW - 1, -1, -1)], dim=1
    )  # (B, width + NEW - 1, L, E)
    mixing = select_top_k(scalings, model.top_k_lora, model.enable_softmax_topk)
    full_mask = torch.cat([mask, torch.ones(2, NEW - 1, dtype=torch.long)], dim=1)
    with torch.no_grad(), model.mixing_state.using(mixing):
        reference = model.lm(
            input_ids=out.sequences[:, :-1],
            attention_mask=full_mask,
            position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0),
        ).logits[:, width - 1 :]
    torch.testing.assert_close(step_logits(out), reference, atol=1e-4, rtol=0)


def test_freeze_after_k_generated_tokens(expert_folders) -> None:
    model = make_model("llama", expert_folders)
    ids, _ = left_padded([5])
    cache = model.new_cache()
    model.enable_scalings_logging()
    generate(model, ids, None, scalings_mode="frozen", freeze_after=2, cache=cache)
    log = model.get_scalings_log()
    expected_fixed = torch.cat([log[1], log[2]], dim=1).mean(dim=1)  # tokens 1 and 2
    assert not torch.allclose(log[0][:, -1], expected_fixed)  # not the prompt's
    for entry in log[3:]:
        torch.testing.assert_close(entry[:, 0], expected_fixed, atol=1e-6, rtol=0)
    assert cache.scaling_cache.get_seq_length() == 5 + 2


def test_frozen_differs_from_granular(expert_folders) -> None:
    """The modes must not silently fall back to one another."""
    model = make_model("llama", expert_folders)
    ids, _ = left_padded([6])
    kwargs = dict(output_logits=True, return_dict_in_generate=True)
    granular = step_logits(generate(model, ids, None, **kwargs))
    frozen = step_logits(generate(model, ids, None, scalings_mode="frozen", **kwargs))
    torch.testing.assert_close(granular[:, 0], frozen[:, 0])  # same prompt processing
    assert (granular[:, 1:] - frozen[:, 1:]).abs().max() > 1e-3


# -------------------------------------------------------------------- merged


def weight_snapshot(model: XLoraModel) -> list[tuple]:
    return [
        (m.base_layer.weight, m.base_layer.weight.data_ptr(), m.base_layer.weight.detach().clone())
        for m in model.mixed_modules()
    ] + [(model, list(model.mixed_modules()))]


def assert_restored(snapshot) -> None:
    *weights, (model, modules) = snapshot
    for weight, pointer, copy in weights:
        assert weight.data_ptr() == pointer  # the original tensor itself is back
        assert torch.equal(weight, copy)
    assert [model.lm.get_submodule(name) for name in model.adapted_modules] == modules


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merged_equals_frozen_and_restores_exactly(arch, expert_folders, merges, caplog) -> None:
    model = make_model(arch, expert_folders)
    ids, _ = left_padded([7])
    snapshot = weight_snapshot(model)
    kwargs = dict(output_logits=True, return_dict_in_generate=True, num_beams=1)
    frozen = generate(model, ids, None, scalings_mode="frozen", **kwargs)
    model.enable_scalings_logging()
    merged = generate(model, ids, None, scalings_mode="merged", **kwargs)
    assert_merged(merges, caplog, 1)
    assert torch.equal(frozen.sequences, merged.sequences)
    torch.testing.assert_close(step_logits(merged), step_logits(frozen), atol=1e-4, rtol=0)
    assert len(model.get_scalings_log()) == NEW  # the fixed scalings are logged per step
    assert_restored(snapshot)


def test_merged_beams_share_one_merge(expert_folders, merges, caplog) -> None:
    model = make_model("gpt2", expert_folders)
    ids, _ = left_padded([5])
    beams = dict(num_beams=3, num_return_sequences=3)
    frozen = generate(model, ids, None, scalings_mode="frozen", **beams)
    merged = generate(model, ids, None, scalings_mode="merged", **beams)
    assert_merged(merges, caplog, 1)
    assert torch.equal(frozen, merged)


class InterruptAfterMerge(StoppingCriteria):
    """Raises KeyboardInterrupt at the third step, after checking the weights are merged."""

    def __init__(self, snapshot) -> None:
        self.snapshot = snapshot
        self.calls = 0
        self.saw_merged = False

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        self.calls += 1
        if self.calls == 3:
            weight, _, original = self.snapshot[0]
            model, modules = self.snapshot[-1]
            in_tree = model.lm.get_submodule(model.adapted_modules[0])
            # merged: the weights changed and the base module stands in for the mixing one
            self.saw_merged = not torch.equal(weight, original) and in_tree is not modules[0]
            raise KeyboardInterrupt
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def test_merged_weights_restored_on_interrupt(expert_folders) -> None:
    model = make_model("llama", expert_folders)
    ids, _ = left_padded([5])
    snapshot = weight_snapshot(model)
    stop = InterruptAfterMerge(snapshot)
    with pytest.raises(KeyboardInterrupt):
        generate(model, ids, None, scalings_mode="merged", stopping_criteria=[stop])
    assert stop.saw_merged
    assert_restored(snapshot)


def test_merged_weights_restored_when_merging_fails(expert_folders, monkeypatch) -> None:
    model = make_model("llama", expert_folders)
    snapshot = weight_snapshot(model)
    cls = type(next(model.mixed_modules()))
    original = cls.merged_weight
    merged_before_failure = []

    def fail_at_module_3(self, scalings):
        if self.layer_index == 3:
            merged_before_failure.extend(
                w.data_ptr() != p for w, p, _ in snapshot[:3]
            )  # modules 0-2 are merged by now
            raise RuntimeError("out of memory")
        return original(self, scalings)

    monkeypatch.setattr(cls, "merged_weight", fail_at_module_3)
    merged = MergedWeights(model)
    with pytest.raises(RuntimeError, match="out of memory"):
        merged.merge(torch.full((model.n_layers, model.n_experts), 0.5))
    assert merged_before_failure == [True, True, True]
    assert not merged.merged
    assert_restored(snapshot)


def test_merged_different_prompts_run_one_by_one(expert_folders, merges, caplog) -> None:
    model = make_model("llama", expert_folders)
    ids, mask = left_padded([6, 4, 5])
    frozen = generate(model, ids, mask, scalings_mode="frozen")
    model.enable_scalings_logging()
    merged = generate(model, ids, mask, scalings_mode="merged")
    assert_merged(merges, caplog, 3)
    assert torch.equal(frozen, merged)
    log = model.get_scalings_log()
    assert len(log) == 3 * NEW and {entry.shape[0] for entry in log} == {1}  # one row per call


def test_merged_falls_back_to_frozen_where_it_must(expert_folders, caplog) -> None:
    model = make_model("llama", expert_folders)
    ids, mask = left_padded([6, 4])
    frozen = generate(model, ids, mask, scalings_mode="frozen")
    with caplog.at_level(logging.WARNING, logger="loramix.generation"):
        merged = generate(model, ids, mask, scalings_mode="merged", return_dict_in_generate=True)
    assert "frozen mode" in caplog.text and "return_dict_in_generate" in caplog.text
    assert torch.equal(frozen, merged.sequences)


def test_tied_weights_are_not_merged(tmp_path: Path, caplog) -> None:
    """GPT-2 ties wte and lm_head: merging wte's update would change the head too."""
    folder = make_expert(tiny_gpt2, tmp_path / "wte", 4, ["wte", *GPT2_TARGETS])
    model = XLoraModel(tiny_gpt2(), XLoraConfig(adapters={"wte": str(folder)}))
    model.generation_config.eos_token_id = None
    assert any("wte" in problem for problem in merge_problems(model))
    ids, _ = left_padded([5])
    snapshot = weight_snapshot(model)
    frozen = generate(model, ids, None, scalings_mode="frozen")
    with caplog.at_level(logging.WARNING, logger="loramix.generation"):
        merged = generate(model, ids, None, scalings_mode="merged")
    assert "tied weights" in caplog.text
    assert torch.equal(frozen, merged)
    assert_restored(snapshot)


# ----------------------------------------------------------- logs and errors


def test_token_scalings_and_dominant_experts(expert_folders) -> None:
    model = make_model("llama", expert_folders)
    ids, _ = left_padded([5])
    model.enable_scalings_logging()
    generate(model, ids, None)
    token_scalings = generated_token_scalings(model.get_scalings_log(), NEW)
    assert token_scalings.shape == (1, NEW, model.n_layers, model.n_experts)
    torch.testing.assert_close(token_scalings[:, 1], model.get_scalings_log()[1][:, 0])
    dominant = dominant_experts(token_scalings)
    assert torch.equal(dominant, token_scalings.mean(2).argmax(-1))
    with pytest.raises(ValueError, match="clear the log"):
        generated_token_scalings(model.get_scalings_log(), NEW + 1)


def test_bad_options_name_the_fix(expert_folders) -> None:
    model = make_model("llama", expert_folders)
    ids, _ = left_padded([4])
    with pytest.raises(ValueError, match="granular, frozen, merged") as error:
        model.generate(ids, scalings_mode="fast", freeze_after=-1)
    assert "freeze_after=-1" in str(error.value)
    with pytest.raises(ValueError, match="freeze_after=2 applies to scalings_mode 'frozen'"):
        model.generate(ids, scalings_mode="granular", freeze_after=2)
    with pytest.raises(ValueError, match="use_cache=False"):
        model.generate(ids, scalings_mode="frozen", use_cache=False)
    with pytest.raises(ValueError, match="new_cache"):
        model.generate(ids, cache=DynamicCache())
    with pytest.raises(ValueError, match="cache_implementation='static'"):
        model.generate(ids, cache_implementation="offloaded")
    model.generation_config.max_length = None
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(ids, cache_implementation="static")


def test_frozen_cache_cannot_continue_granular(expert_folders) -> None:
    model = make_model("llama", expert_folders)
    ids, _ = left_padded([4])
    cache = model.new_cache()
    out = generate(model, ids, None, scalings_mode="frozen", cache=cache)
    with pytest.raises(ValueError, match="new_cache"):
        generate(model, out, None, cache=cache)


def test_scaled_lora_b_equals_the_scalings_path(expert_folders, tmp_path: Path) -> None:
    """Frozen steps fold fixed scalings into B; that must equal mixing with the scalings."""
    folder = make_expert(tiny_gpt2, tmp_path / "wte", 4, ["wte", *GPT2_TARGETS])
    models = [
        make_model("llama", expert_folders),
        XLoraModel(tiny_gpt2(), XLoraConfig(adapters={"wte": str(folder)})),  # embedding too
    ]
    ids, _ = left_padded([5, 5])
    for model in models:
        fixed = torch.rand(model.n_layers, model.n_experts)  # (L, E)
        scaled_b = [None] * model.n_layers
        for module in model.mixed_modules():
            scaled_b[module.layer_index] = module.scaled_lora_b(fixed[module.layer_index])
        mixing = fixed.expand(2, 1, -1, -1)  # (B, 1, L, E): every row the same
        with torch.no_grad():
            with model.mixing_state.using(mixing):
                expected = model.lm(input_ids=ids).logits
            with model.mixing_state.using(None, scaled_b):
                folded = model.lm(input_ids=ids).logits
            assert (expected - model.lm(input_ids=ids).logits).abs().max() > 1e-3
        torch.testing.assert_close(folded, expected, atol=1e-5, rtol=1e-5)


def test_merged_weight_equals_base_plus_delta(expert_folders, tmp_path: Path) -> None:
    folder = make_expert(tiny_gpt2, tmp_path / "wte", 4, ["wte", *GPT2_TARGETS])
    models = [
        make_model("llama", expert_folders),  # nn.Linear
        make_model("gpt2", expert_folders),  # Conv1D, weight (in, out)
        XLoraModel(tiny_gpt2(), XLoraConfig(adapters={"wte": str(folder)})),  # embedding
    ]
    kinds = set()
    for model in models:
        scalings = torch.rand(model.n_experts)
        for module in model.mixed_modules():
            weight = module.base_layer.weight
            merged = module.merged_weight(scalings)
            assert merged.shape == weight.shape and merged.data_ptr() != weight.data_ptr()
            expected = weight + module.delta_weight(scalings)
            torch.testing.assert_close(merged, expected, atol=1e-6, rtol=1e-6)
            kinds.add((type(module.base_layer).__name__, module.weight_is_transposed))
    assert kinds == {("Linear", False), ("Conv1D", True), ("Embedding", True)}


def test_merged_beams_with_different_fixed_scalings_stay_frozen(expert_folders, caplog) -> None:
    """freeze_after > 0 with beams: each beam averages its own tokens, so no joint merge."""
    model = make_model("llama", expert_folders)
    ids, _ = left_padded([5])
    beams = dict(num_beams=3, num_return_sequences=3, freeze_after=2)
    frozen = generate(model, ids, None, scalings_mode="frozen", **beams)
    snapshot = weight_snapshot(model)
    with caplog.at_level(logging.WARNING, logger="loramix.generation"):
        merged = generate(model, ids, None, scalings_mode="merged", **beams)
    assert "different fixed scalings" in caplog.text
    assert torch.equal(frozen, merged)
    assert_restored(snapshot)


# ------------------------------------------------------------------ half precision

# Logit tolerances, relative to the largest logit: float16 keeps 11 bits, bfloat16 8.
HALF_TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 6e-2}


def assert_close_for(dtype: torch.dtype, actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.float().abs().max().item()
    torch.testing.assert_close(
        actual.float(), expected.float(), atol=HALF_TOLERANCE[dtype] * scale, rtol=0
    )


def half_model(dtype: torch.dtype, folders, **options) -> XLoraModel:
    model = make_model("llama", folders, **options)
    model.lm.to(dtype)  # the base and the stacked experts; the gate stays float32
    return model


@pytest.mark.parametrize("dtype", list(HALF_TOLERANCE), ids=str)
def test_half_precision_cached_equals_recompute_and_float32(dtype, expert_folders) -> None:
    model = half_model(dtype, expert_folders)
    assert model.gate.layers[-1].weight.dtype == torch.float32
    assert next(model.mixed_modules()).lora_b.dtype == model.expert_dtype == dtype
    ids, mask = left_padded([7, 4, 5])
    out = generate(model, ids, mask, output_logits=True, return_dict_in_generate=True)
    recomputed = full_logits(model, out.sequences[:, :-1], mask)  # (B, T, V)
    assert_close_for(dtype, step_logits(out), recomputed[:, ids.shape[1] - 1 :])
    assert model.get_latest_scalings().dtype == torch.float32
    float32 = full_logits(make_model("llama", expert_folders), out.sequences[:, :-1], mask)
    real = torch.cat([mask, torch.ones(3, NEW - 1, dtype=torch.long)], dim=1).bool()
    assert_close_for(dtype, recomputed[real], float32[real])  # padding rows are not compared


@pytest.mark.parametrize("dtype", list(HALF_TOLERANCE), ids=str)
@pytest.mark.parametrize("mode", ["granular", "frozen", "merged"])
def test_half_precision_batched_equals_one_by_one(dtype, mode, expert_folders) -> None:
    model = half_model(dtype, expert_folders)
    lengths = [7, 3, 5]
    ids, mask = left_padded(lengths)
    options = dict(output_logits=True, return_dict_in_generate=True, scalings_mode=mode)
    batched = generate(model, ids, mask, **options)
    for row, length in enumerate(lengths):
        alone = generate(model, ids[row : row + 1, -length:], None, **options)
        assert torch.equal(batched.sequences[row, -length - NEW :], alone.sequences[0])
        assert_close_for(dtype, step_logits(batched)[row], step_logits(alone)[0])


@pytest.mark.parametrize("dtype", list(HALF_TOLERANCE), ids=str)
def test_half_precision_merged_equals_frozen(dtype, expert_folders) -> None:
    model = half_model(dtype, expert_folders)
    ids, _ = left_padded([6])
    options = dict(output_logits=True, return_dict_in_generate=True)
    frozen = generate(model, ids, None, scalings_mode="frozen", **options)
    merged = generate(model, ids, None, scalings_mode="merged", **options)
    assert torch.equal(frozen.sequences, merged.sequences)
    assert_close_for(dtype, step_logits(merged), step_logits(frozen))


# ------------------------------------------------------- one fixed mix per sequence


@pytest.mark.parametrize("dtype", [torch.float32, *HALF_TOLERANCE], ids=str)
@pytest.mark.parametrize("layerwise_mix", [False, True], ids=["(B,E)", "(B,L,E)"])
def test_per_sequence_fixed_mixes_equal_each_sequence_alone(
    dtype, layerwise_mix, expert_folders
) -> None:
    model = half_model(dtype, expert_folders) if dtype != torch.float32 else None
    model = model or make_model("llama", expert_folders)
    lengths = [7, 3, 5, 6]
    ids, mask = left_padded(lengths)
    generator = torch.Generator().manual_seed(5)
    shape = (4, model.n_layers, 2) if layerwise_mix else (4, 2)
    mixes = torch.rand(shape, generator=generator)
    options = dict(output_logits=True, return_dict_in_generate=True)
    with model.fixed_scalings(mixes, per_sequence=True):
        batched = generate(model, ids, mask, scalings_mode="frozen", **options)
        scalings = model.get_latest_scalings()  # (B, 1, L, E) of the last step
    expected = mixes if layerwise_mix else mixes[:, None].expand(-1, model.n_layers, -1)
    assert torch.equal(scalings[:, -1], expected)
    for row, length in enumerate(lengths):
        with model.fixed_scalings(mixes[row]):
            alone = generate(model, ids[row : row + 1, -length:], None, **options)
        tokens, alone_tokens = batched.sequences[row, -NEW:], alone.sequences[0, -NEW:]
        if dtype != torch.bfloat16:
            assert torch.equal(tokens, alone_tokens)
        # bfloat16 (8 bits) may flip a near tie of the tiny model: compare up to the flip.
        same = int((tokens != alone_tokens).int().cumsum(0).eq(0).sum())
        assert same >= 1, f"row {row}"
        batched_logits, alone_logits = (
            step_logits(batched)[row, :same],
            step_logits(alone)[0, :same],
        )
        if dtype == torch.float32:
            torch.testing.assert_close(batched_logits, alone_logits, atol=1e-4, rtol=0)
        else:
            assert_close_for(dtype, batched_logits, alone_logits)


def test_per_sequence_fixed_mixes_check_their_shape_and_batch(expert_folders) -> None:
    model = make_model("llama", expert_folders)
    ids, mask = left_padded([4, 4, 4])
    with (
        pytest.raises(ValueError, match=r"per_sequence=True"),
        model.fixed_scalings(torch.rand(3, 2, 2)),
    ):
        pass
    with (
        pytest.raises(ValueError, match=r"\(B, 2\)"),
        model.fixed_scalings(torch.rand(3, 5), per_sequence=True),
    ):
        pass
    two_mixes = model.fixed_scalings(torch.rand(2, 2), per_sequence=True)
    with two_mixes, pytest.raises(ValueError, match="one row per sequence"):
        model(input_ids=ids, attention_mask=mask)
