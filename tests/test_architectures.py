"""The architecture matrix: loramix on tiny random models of many decoder-only families.

For each model type, experts trained by peft on `target_modules="all-linear"` (random
non-zero A and B, so every check can fail):
    - one expert alone (fixed scaling 1) equals peft's `PeftModel`;
    - a batch equals its rows run alone (per-token scalings reach their own tokens, also in
      modules that see the activations flattened to `(B * T, D)`: OPT, Qwen2-MoE);
    - cached generation equals a full recomputation (sliding-window and hybrid caches too);
    - frozen and merged generation agree and put the base weights back bit for bit;
    - save and load give bit-identical logits;
    - the trainers' loss from the labelled positions' logits only (`loramix.training.loss`)
      equals the model's own.
One model build per architecture is shared by the checks (module-scoped fixture).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers as tf
from helpers import make_expert
from peft import PeftModel

from loramix import XLoraConfig, XLoraModel
from loramix.training.loss import LABELLED_LOGITS_MODEL_TYPES, forward_labelled

VOCAB = 97
NEW = 4  # generated tokens per call
PAD = 0
# Llama-style fields; models with other names get their own below.
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=PAD,
    eos_token_id=1,
    bos_token_id=2,
)
TOKENS = dict(pad_token_id=PAD, eos_token_id=1, bos_token_id=2)


@dataclass(frozen=True)
class Arch:
    config: Callable[..., tf.PreTrainedConfig]
    model: Callable[[tf.PreTrainedConfig], tf.PreTrainedModel]
    fields: dict
    tested: str  # what this architecture adds to the matrix (README table)
    targets: str | list[str] = "all-linear"


ARCHS: dict[str, Arch] = {
    "llama": Arch(tf.LlamaConfig, tf.LlamaForCausalLM, COMMON, "reference"),
    "mistral": Arch(
        tf.MistralConfig, tf.MistralForCausalLM, {**COMMON, "sliding_window": 4}, "sliding window"
    ),
    "qwen2": Arch(tf.Qwen2Config, tf.Qwen2ForCausalLM, COMMON, "q/k/v biases"),
    "qwen3": Arch(tf.Qwen3Config, tf.Qwen3ForCausalLM, {**COMMON, "head_dim": 8}, "q/k norms"),
    "granite": Arch(
        tf.GraniteConfig,
        tf.GraniteForCausalLM,
        {
            **COMMON,
            "embedding_multiplier": 2.0,
            "residual_multiplier": 0.5,
            "attention_multiplier": 0.3,
            "logits_scaling": 2.0,
        },
        "scaled embeddings, residuals, logits",
    ),
    "olmo2": Arch(tf.Olmo2Config, tf.Olmo2ForCausalLM, COMMON, "post-norms"),
    "gemma": Arch(
        tf.GemmaConfig, tf.GemmaForCausalLM, {**COMMON, "head_dim": 8}, "embedding scaling"
    ),
    "gemma2": Arch(
        tf.Gemma2Config,
        tf.Gemma2ForCausalLM,
        {**COMMON, "head_dim": 8, "sliding_window": 4},
        "hybrid sliding/full cache, soft-capping",
    ),
    "gemma3_text": Arch(
        tf.Gemma3TextConfig,
        tf.Gemma3ForCausalLM,
        {
            **COMMON,
            "head_dim": 8,
            "sliding_window": 4,
            "layer_types": ["sliding_attention", "full_attention"],
        },
        "scaled embedding module, hybrid cache",
    ),
    "phi": Arch(tf.PhiConfig, tf.PhiForCausalLM, COMMON, "parallel block, partial rotary"),
    "phi3": Arch(tf.Phi3Config, tf.Phi3ForCausalLM, COMMON, "fused qkv_proj, gate_up_proj"),
    "gpt2": Arch(
        tf.GPT2Config,
        tf.GPT2LMHeadModel,
        dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, **TOKENS),
        "Conv1D, fused c_attn",
    ),
    "gpt_neox": Arch(
        tf.GPTNeoXConfig,
        tf.GPTNeoXForCausalLM,
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            **TOKENS,
        ),
        "fused query_key_value",
    ),
    "falcon": Arch(
        tf.FalconConfig,
        tf.FalconForCausalLM,
        dict(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, **TOKENS
        ),
        "multi-query fused query_key_value",
    ),
    "opt": Arch(
        tf.OPTConfig,
        tf.OPTForCausalLM,
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            ffn_dim=48,
            word_embed_proj_dim=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
            **TOKENS,
        ),
        "(B*T, D) feed-forward inputs",
    ),
    "stablelm": Arch(tf.StableLmConfig, tf.StableLmForCausalLM, COMMON, "partial rotary"),
    "starcoder2": Arch(tf.Starcoder2Config, tf.Starcoder2ForCausalLM, COMMON, "biases, c_fc"),
    "mixtral": Arch(
        tf.MixtralConfig,
        tf.MixtralForCausalLM,
        {**COMMON, "num_local_experts": 4, "num_experts_per_tok": 2},
        "mixture of experts (attention adapted)",
        # "all-linear" here makes peft add target_parameters (the routed experts), refused
        # below; the attention projections are what all-linear adapts as modules.
        targets=["q_proj", "k_proj", "v_proj", "o_proj"],
    ),
    "qwen2_moe": Arch(
        tf.Qwen2MoeConfig,
        tf.Qwen2MoeForCausalLM,
        {
            **COMMON,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 16,
            "shared_expert_intermediate_size": 24,
        },
        "mixture of experts, (B*T, D) shared-expert inputs",
    ),
}


def build(arch: str, seed: int = 0) -> tf.PreTrainedModel:
    spec = ARCHS[arch]
    torch.manual_seed(seed)
    return spec.model(spec.config(**spec.fields)).eval()


@dataclass
class Case:
    arch: str
    factory: Callable[[], tf.PreTrainedModel]
    experts: dict[str, str]
    model: XLoraModel


@pytest.fixture(scope="module", params=list(ARCHS))
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    """Two all-linear peft experts and an X-LoRA model with a random layer-wise gate."""
    arch = request.param

    def factory() -> tf.PreTrainedModel:
        return build(arch)

    root = tmp_path_factory.mktemp(arch)
    targets = ARCHS[arch].targets
    experts = {
        "a": str(make_expert(factory, root / "a", 1, targets, rank=4)),
        "b": str(make_expert(factory, root / "b", 2, targets, rank=2, alpha=4)),
    }
    model = XLoraModel(factory(), XLoraConfig(adapters=experts, layerwise_scalings=True))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in model.gate.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 2.0)
    model.generation_config.eos_token_id = None  # always NEW tokens
    model.generation_config.pad_token_id = PAD
    return Case(arch, factory, experts, model)


def random_ids(batch: int, tokens: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, tokens), generator=generator)


def test_matrix_size() -> None:
    assert len(ARCHS) >= 15


def test_one_expert_equals_peft(case: Case) -> None:
    ids = random_ids(2, 7)
    reference = PeftModel.from_pretrained(case.factory(), case.experts["a"]).eval()
    assert {n for n, _ in reference.named_modules() if n.endswith(".lora_A")}  # peft adapted it
    with torch.no_grad():
        theirs = reference(input_ids=ids).logits
        base = case.factory()(input_ids=ids).logits
        with case.model.fixed_scalings(torch.tensor([1.0, 0.0])):
            ours = case.model(input_ids=ids).logits
    assert not torch.allclose(theirs, base, atol=1e-3)  # the expert matters
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    # every module peft adapted is mixed by loramix, and nothing else
    peft_modules = {
        n.removeprefix("base_model.model.").removesuffix(".lora_A")
        for n, _ in reference.named_modules()
        if n.endswith(".lora_A")
    }
    assert set(case.model.adapted_modules) == peft_modules


def test_batch_rows_equal_rows_alone(case: Case) -> None:
    ids = random_ids(2, 6, seed=1)
    with torch.no_grad():
        together = case.model(input_ids=ids)
        for row in range(2):
            alone = case.model(input_ids=ids[row : row + 1])
            torch.testing.assert_close(together.scalings[row], alone.scalings[0])
            torch.testing.assert_close(together.logits[row], alone.logits[0], atol=1e-5, rtol=0)


def full_logits(model: XLoraModel, sequences: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=sequences, use_cache=False).logits


def test_cached_generation_equals_recomputation(case: Case) -> None:
    ids = random_ids(2, 6, seed=2)  # 6 + NEW tokens go past the sliding windows (4)
    out = case.model.generate(
        ids, max_new_tokens=NEW, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    steps = torch.stack(out.logits, dim=1)  # (B, NEW, V)
    reference = full_logits(case.model, out.sequences[:, :-1])[:, ids.shape[1] - 1 :]
    torch.testing.assert_close(steps, reference, atol=1e-4, rtol=0)


def test_frozen_and_merged_agree_and_restore(case: Case) -> None:
    model = case.model
    before = {k: v.clone() for k, v in model.lm.state_dict().items()}
    modules = list(model.mixed_modules())
    ids = random_ids(1, 6, seed=4)
    kwargs = dict(
        max_new_tokens=NEW, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    frozen = model.generate(ids, scalings_mode="frozen", **kwargs)
    merged = model.generate(ids, scalings_mode="merged", **kwargs)
    assert torch.equal(frozen.sequences, merged.sequences)
    torch.testing.assert_close(
        torch.stack(merged.logits, 1), torch.stack(frozen.logits, 1), atol=1e-4, rtol=0
    )
    after = model.lm.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert list(model.mixed_modules()) == modules


def test_save_load_bit_identical(case: Case, tmp_path: Path) -> None:
    case.model.save_pretrained(tmp_path / "saved")
    reloaded = XLoraModel.from_pretrained(case.factory(), tmp_path / "saved")
    ids = random_ids(2, 5, seed=5)
    with torch.no_grad():
        first, second = case.model(input_ids=ids), reloaded(input_ids=ids)
    assert torch.equal(first.logits, second.logits)
    assert torch.equal(first.scalings, second.scalings)


# ------------------------------------------------ mixture of experts: routed parameters


def test_routed_expert_parameters_are_refused(tmp_path: Path) -> None:
    """peft's `target_parameters` (LoRA on the routed experts' 3-D weights, which peft adds
    itself for "all-linear" on Mixtral) is refused, naming the option and the fix; the
    attention modules of the same model, targeted by name, load."""
    routed = make_expert(build_mixtral, tmp_path / "routed", 1, "all-linear")
    with pytest.raises(ValueError, match="target_parameters") as error:
        XLoraModel(build("mixtral"), XLoraConfig(adapters={"r": str(routed)}))
    assert "Retrain without target_parameters" in str(error.value)
    assert "target_modules listed explicitly" in str(error.value)
    attention = make_expert(build_mixtral, tmp_path / "attention", 1, ARCHS["mixtral"].targets)
    model = XLoraModel(build("mixtral"), XLoraConfig(adapters={"a": str(attention)}))
    assert model.n_layers == 2 * 4


def build_mixtral() -> tf.PreTrainedModel:
    return build("mixtral")


@pytest.mark.parametrize("arch", ["gemma", "gemma3_text"])
def test_embedding_experts_with_embedding_scaling_equal_peft(arch: str, tmp_path: Path) -> None:
    """Gemma scales the embeddings by sqrt(D) (Gemma3 inside its embedding module): an
    embedding expert's rows must be scaled with them, as peft does."""

    def factory() -> tf.PreTrainedModel:
        return build(arch)

    folder = make_expert(factory, tmp_path / "e", 1, ["embed_tokens", "q_proj"], rank=4)
    model = XLoraModel(factory(), XLoraConfig(adapters={"e": str(folder)}))
    assert model.adapted_modules[0] == "model.embed_tokens"
    reference = PeftModel.from_pretrained(factory(), folder).eval()
    ids = random_ids(2, 5, seed=6)
    with torch.no_grad(), model.fixed_scalings(torch.tensor([1.0])):
        ours = model(input_ids=ids).logits
    with torch.no_grad():
        theirs = reference(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


# --------------------------------------------- modules that see a subset of the tokens


class RoutedMLP(torch.nn.Module):
    """A mixture-of-experts block with `Linear` experts, each called on its routed tokens only
    (as custom or older MoE code does): the case per-token scalings cannot reach."""

    def __init__(self, width: int = 32, n_experts: int = 2) -> None:
        super().__init__()
        self.router = torch.nn.Linear(width, n_experts, bias=False)
        self.experts = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(n_experts))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1])  # (B * T, D)
        choice = self.router(flat).argmax(-1)  # (B * T,) top-1 routing
        out = torch.zeros_like(flat)
        for index, expert in enumerate(self.experts):
            rows = (choice == index).nonzero().squeeze(-1)
            out[rows] = expert(flat[rows])  # (N_index, D): only this expert's tokens
        return out.view(hidden.shape)


def routed_llama() -> tf.PreTrainedModel:
    model = build("llama")
    torch.manual_seed(1)
    for layer in model.model.layers:
        layer.mlp = RoutedMLP()
    return model.eval()


def test_linear_experts_on_routed_tokens_are_refused_by_name(tmp_path: Path) -> None:
    targets = ["q_proj", "experts.0", "experts.1"]
    folder = make_expert(routed_llama, tmp_path / "e", 1, targets)
    other = make_expert(routed_llama, tmp_path / "f", 2, targets)
    model = XLoraModel(routed_llama(), XLoraConfig(adapters={"e": str(folder), "f": str(other)}))
    ids = random_ids(2, 6, seed=7)
    with torch.no_grad():  # a gate whose scalings differ from token to token
        model.gate.layers[-1].weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts\.\d was called on"):
        model(input_ids=ids)
    # the same tokens with one fixed mix (every token alike) are exact: peft's LoRA
    reference = PeftModel.from_pretrained(routed_llama(), folder).eval()
    with torch.no_grad(), model.fixed_scalings(torch.tensor([1.0, 0.0])):
        ours = model(input_ids=ids).logits
    with torch.no_grad():
        torch.testing.assert_close(ours, reference(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def labelled_batch() -> dict[str, torch.Tensor]:
    """Two right-padded rows with labels on their last tokens only."""
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    ids[1, 6:] = PAD
    labels = torch.full_like(ids, -100)
    labels[0, 5:] = ids[0, 5:]
    labels[1, 3:6] = ids[1, 3:6]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_labelled_training_loss_equals_the_models_own(arch):
    """The loss from the labelled positions' logits (`loramix.training.loss`) equals the
    model's own for every architecture here, soft-capped and scaled logits included."""
    model = build(arch)
    batch = labelled_batch()
    with torch.no_grad():
        own = model(**batch).loss
        mine, output = forward_labelled(model, batch)
    assert output.logits.shape == (int((batch["labels"][:, 1:] != -100).sum()), VOCAB)
    torch.testing.assert_close(mine, own, rtol=1e-5, atol=1e-6)


def test_the_labelled_logits_list_is_the_architecture_matrix():
    assert {build(arch).config.model_type for arch in ARCHS} == LABELLED_LOGITS_MODEL_TYPES


def test_labelled_training_loss_keeps_a_soft_cap():
    """With a soft cap that random logits reach, Gemma 2's capped loss is still matched: the
    model applies its cap to the kept positions (Granite above shows the same for scaling)."""
    spec = ARCHS["gemma2"]
    torch.manual_seed(0)
    capped = spec.model(spec.config(**{**spec.fields, "final_logit_softcapping": 0.05})).eval()
    batch = labelled_batch()
    with torch.no_grad():
        own = capped(**batch).loss
        uncapped_logits = capped.get_output_embeddings()(capped.model(batch["input_ids"])[0])
        mine, _ = forward_labelled(capped, batch)
    uncapped = torch.nn.functional.cross_entropy(
        uncapped_logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100
    )
    assert abs(float(uncapped) - float(own)) > 1e-3  # the cap matters here
    torch.testing.assert_close(mine, own, rtol=1e-5, atol=1e-6)
