"""Reading PEFT adapter folders: scales, layouts, file formats and every refusal's message."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import LLAMA_TARGETS, make_expert, tiny_gpt2, tiny_llama
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

from loramix.experts import load_expert

Q0 = "model.layers.0.self_attn.q_proj"
Q1 = "model.layers.1.self_attn.q_proj"
WEIGHTS = "adapter_model.safetensors"


def peft_scales(folder: Path) -> dict[str, float]:
    """Module path -> the scaling peft itself applies to this adapter."""
    model = PeftModel.from_pretrained(tiny_llama(), folder)
    prefix = "base_model.model."
    return {
        name.removeprefix(prefix): module.scaling["default"]
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer)
    }


def edit_config(folder: Path, **changes: object) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def edit_weights(folder: Path, drop: str = "", add: dict | None = None) -> None:
    state = load_file(folder / WEIGHTS)
    state = {k: v for k, v in state.items() if not (drop and drop in k)}
    state.update(add or {})
    save_file(state, folder / WEIGHTS)


# ------------------------------------------------------------------ scales, ranks


@pytest.mark.parametrize(
    ("rank", "alpha", "rslora", "expected"),
    [(4, 8, False, 2.0), (2, 16, False, 8.0), (4, 8, True, 4.0), (3, 6, True, 6 / math.sqrt(3))],
)
def test_scale(tmp_path: Path, rank: int, alpha: int, rslora: bool, expected: float) -> None:
    folder = make_expert(
        tiny_llama,
        tmp_path / "e",
        1,
        ["q_proj", "v_proj"],
        rank=rank,
        alpha=alpha,
        use_rslora=rslora,
    )
    expert = load_expert("e", folder)
    assert set(expert.modules) == {Q0, Q1, Q0.replace("q_", "v_"), Q1.replace("q_", "v_")}
    for lora in expert.modules.values():
        assert lora.rank == rank
        assert lora.scale == pytest.approx(expected, rel=1e-12)
        assert not lora.is_embedding


def test_alpha_and_rank_patterns_match_peft(tmp_path: Path) -> None:
    folder = make_expert(
        tiny_llama,
        tmp_path / "p",
        1,
        LLAMA_TARGETS,
        rank=4,
        alpha=8,
        alpha_pattern={"q_proj": 16, r"model.layers.1.self_attn.k_proj": 2},
        rank_pattern={"v_proj": 2},
    )
    expert = load_expert("p", folder)
    k0, k1 = Q0.replace("q_", "k_"), Q1.replace("q_", "k_")
    v0 = Q0.replace("q_", "v_")
    assert expert.modules[Q0].scale == 4.0  # alpha_pattern 16 / r 4
    assert expert.modules[Q1].scale == 4.0
    assert expert.modules[k0].scale == 2.0  # default alpha 8 / 4: the pattern is layer 1's
    assert expert.modules[k1].scale == 0.5  # 2 / 4
    assert expert.modules[v0].rank == 2
    assert expert.modules[v0].scale == 4.0  # 8 / 2
    assert {name: lora.scale for name, lora in expert.modules.items()} == pytest.approx(
        peft_scales(folder)
    )


def test_rslora_with_patterns_matches_peft(tmp_path: Path) -> None:
    folder = make_expert(
        tiny_llama,
        tmp_path / "r",
        1,
        ["q_proj", "down_proj"],
        rank=4,
        alpha=8,
        use_rslora=True,
        alpha_pattern={"down_proj": 3},
        rank_pattern={"q_proj": 3},
    )
    expert = load_expert("r", folder)
    assert expert.modules[Q0].scale == pytest.approx(8 / math.sqrt(3))
    assert {name: lora.scale for name, lora in expert.modules.items()} == pytest.approx(
        peft_scales(folder)
    )


def test_weights_and_config_are_the_files(tmp_path: Path) -> None:
    folder = make_expert(tiny_llama, tmp_path / "w", 1, ["q_proj"], rank=3)
    state = load_file(folder / WEIGHTS)
    expert = load_expert("w", folder)
    assert expert.name == "w" and expert.path == folder
    assert expert.peft_config == json.loads((folder / "adapter_config.json").read_text())
    lora = expert.modules[Q1]
    assert torch.equal(lora.lora_a, state[f"base_model.model.{Q1}.lora_A.weight"])
    assert torch.equal(lora.lora_b, state[f"base_model.model.{Q1}.lora_B.weight"])
    assert lora.lora_a.shape == (3, 32) and lora.lora_b.shape == (32, 3)


def test_gpt2_conv1d_layout(tmp_path: Path) -> None:
    folder = make_expert(tiny_gpt2, tmp_path / "g", 1, ["c_attn"], rank=2)
    expert = load_expert("g", folder)
    assert expert.fan_in_fan_out
    lora = expert.modules["transformer.h.0.attn.c_attn"]
    assert lora.lora_a.shape == (2, 32) and lora.lora_b.shape == (96, 2)  # (r, in), (out, r)
    assert not load_expert(
        "l", make_expert(tiny_llama, tmp_path / "l", 1, ["q_proj"])
    ).fan_in_fan_out


def test_embedding_expert_skips_base_layer(tmp_path: Path) -> None:
    folder = make_expert(tiny_llama, tmp_path / "emb", 1, ["embed_tokens", "q_proj"], rank=2)
    state = load_file(folder / WEIGHTS)
    assert "base_model.model.model.embed_tokens.base_layer.weight" in state  # peft saved it
    expert = load_expert("emb", folder)
    assert set(expert.modules) == {"model.embed_tokens", Q0, Q1}
    embedding = expert.modules["model.embed_tokens"]
    assert embedding.is_embedding
    assert embedding.lora_a.shape == (2, 97) and embedding.lora_b.shape == (32, 2)  # (r, V), (D, r)
    assert torch.equal(
        embedding.lora_a, state["base_model.model.model.embed_tokens.lora_embedding_A"]
    )


def test_bin_weights(tmp_path: Path) -> None:
    folder = make_expert(tiny_llama, tmp_path / "b", 1, ["q_proj"])
    state = load_file(folder / WEIGHTS)
    torch.save(state, folder / "adapter_model.bin")
    (folder / WEIGHTS).unlink()
    expert = load_expert("b", folder)
    assert torch.equal(expert.modules[Q0].lora_b, state[f"base_model.model.{Q0}.lora_B.weight"])
    assert expert.modules[Q0].scale == 2.0


class _RunsCode:
    def __reduce__(self) -> tuple:
        return (print, ("UNPICKLED CODE RAN",))


def test_bin_is_loaded_weights_only(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = make_expert(tiny_llama, tmp_path / "evil", 1, ["q_proj"])
    (folder / WEIGHTS).unlink()
    torch.save({"payload": _RunsCode()}, folder / "adapter_model.bin")
    with pytest.raises(ValueError) as error:
        load_expert("evil", folder)
    assert "UNPICKLED CODE RAN" not in capsys.readouterr().out
    assert str(folder / "adapter_model.bin") in str(error.value)


def test_bin_that_is_not_a_state_dict(tmp_path: Path) -> None:
    folder = make_expert(tiny_llama, tmp_path / "list", 1, ["q_proj"])
    (folder / WEIGHTS).unlink()
    torch.save([torch.zeros(2)], folder / "adapter_model.bin")
    with pytest.raises(ValueError, match="not a state dict") as error:
        load_expert("list", folder)
    assert str(folder / "adapter_model.bin") in str(error.value)


# -------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("options", "fixes"),
    [
        ({"use_dora": True}, ["use_dora", "retrain without DoRA"]),
        ({"bias": "lora_only"}, ["bias is 'lora_only'", "bias='none'"]),
        ({"bias": "all"}, ["bias is 'all'", "bias='none'"]),
        ({"lora_bias": True}, ["lora_bias", "lora_bias=False"]),
        ({"modules_to_save": ["lm_head"]}, ["modules_to_save", "retrain without modules_to_save"]),
    ],
    ids=["dora", "bias-lora-only", "bias-all", "lora-bias", "modules-to-save"],
)
def test_unmixable_adapter_refused_with_fix(
    tmp_path: Path, options: dict, fixes: list[str]
) -> None:
    folder = make_expert(tiny_llama, tmp_path / "x", 1, ["q_proj"], **options)
    with pytest.raises(ValueError) as error:
        load_expert("x", folder)
    message = str(error.value)
    assert "expert 'x'" in message and str(folder / "adapter_config.json") in message
    for fix in fixes:
        assert fix in message


def test_all_config_problems_in_one_error(tmp_path: Path) -> None:
    folder = make_expert(tiny_llama, tmp_path / "x", 1, ["q_proj"])
    edit_config(folder, use_dora=True, bias="all", modules_to_save=["lm_head"])
    with pytest.raises(ValueError) as error:
        load_expert("x", folder)
    assert all(word in str(error.value) for word in ("use_dora", "bias", "modules_to_save"))


def test_config_numbers_of_the_wrong_type_are_named(tmp_path: Path) -> None:
    folder = make_expert(tiny_llama, tmp_path / "x", 1, ["q_proj"])
    edit_config(folder, lora_alpha="16", use_rslora="false", alpha_pattern={"q_proj": None})
    with pytest.raises(ValueError) as error:
        load_expert("x", folder)
    for problem in ("lora_alpha is '16'", "use_rslora is 'false'", "alpha_pattern is"):
        assert problem in str(error.value)


def test_non_lora_peft_type_refused(tmp_path: Path) -> None:
    folder = make_expert(tiny_llama, tmp_path / "ia3", 1, ["q_proj"])
    edit_config(folder, peft_type="IA3")
    with pytest.raises(ValueError, match="peft_type is 'IA3'; only LoRA adapters"):
        load_expert("ia3", folder)


def lora_variant(option: str) -> dict:
    """The LoraConfig arguments that switch on a peft LoRA variant."""
    from peft.tuners.lora.config import BdLoraConfig, KasaConfig

    return {
        # aLoRA: the update is active only from the invocation tokens on
        "alora_invocation_tokens": {"alora_invocation_tokens": [5, 6], "task_type": "CAUSAL_LM"},
        # BD-LoRA: A is stored as diagonal blocks, (r, in / nblocks)
        "use_bdlora": {"use_bdlora": BdLoraConfig(target_modules_bd_a=["q_proj"], nblocks=2)},
        # KaSA: a learned diagonal between A and B, and a truncated base weight
        "kasa_config": {"kasa_config": KasaConfig()},
    }[option]


@pytest.mark.parametrize("option", ["alora_invocation_tokens", "use_bdlora", "kasa_config"])
def test_lora_variants_that_change_the_update_refused(tmp_path: Path, option: str) -> None:
    """peft adapters whose update is not `scale * B @ A @ x` must be refused by option name."""
    folder = make_expert(tiny_llama, tmp_path / "v", 1, ["q_proj"], **lora_variant(option))
    with pytest.raises(ValueError, match=option) as error:
        load_expert("v", folder)
    assert str(folder / "adapter_config.json") in str(error.value)


def test_dora_weights_without_dora_flag(tmp_path: Path) -> None:
    folder = make_expert(tiny_llama, tmp_path / "d", 1, ["q_proj"], use_dora=True)
    edit_config(folder, use_dora=None)  # a hand-edited config: the weights still say DoRA
    with pytest.raises(ValueError) as error:
        load_expert("d", folder)
    message = str(error.value)
    assert "DoRA" in message and "use_dora=False" in message
    assert f"{Q0}.lora_magnitude_vector" in message
    assert str(folder / WEIGHTS) in message


def test_bias_weight_without_bias_flag(tmp_path: Path) -> None:
    folder = make_expert(tiny_llama, tmp_path / "b", 1, ["q_proj"])
    edit_weights(folder, add={f"base_model.model.{Q0}.lora_B.bias": torch.zeros(32)})
    with pytest.raises(ValueError, match="not a LoRA weight") as error:
        load_expert("b", folder)
    assert f"{Q0}.lora_B.bias" in str(error.value)


def test_non_lora_key_named(tmp_path: Path) -> None:
    folder = make_expert(tiny_llama, tmp_path / "n", 1, ["q_proj"])
    edit_weights(folder, add={"base_model.model.lm_head.weight": torch.zeros(97, 32)})
    with pytest.raises(ValueError) as error:
        load_expert("n", folder)
    message = str(error.value)
    assert "'base_model.model.lm_head.weight'" in message and "not a LoRA weight" in message
    assert "modules_to_save" in message  # the fix


def test_a_without_b_named(tmp_path: Path) -> None:
    folder = make_expert(tiny_llama, tmp_path / "half", 1, ["q_proj"])
    edit_weights(folder, drop=f"{Q1}.lora_B")
    with pytest.raises(ValueError) as error:
        load_expert("half", folder)
    message = str(error.value)
    assert f"{Q1!r}" in message and "['lora_A']" in message
    assert "needs both lora_A and lora_B" in message and "incomplete" in message


def test_rank_mismatch_named(tmp_path: Path) -> None:
    folder = make_expert(tiny_llama, tmp_path / "r", 1, ["q_proj"], rank=4)
    edit_weights(folder, add={f"base_model.model.{Q0}.lora_B.weight": torch.zeros(32, 3)})
    with pytest.raises(ValueError, match=r"lora_A \(4, 32\) and lora_B \(32, 3\)") as error:
        load_expert("r", folder)
    assert Q0 in str(error.value)


def test_no_lora_weights(tmp_path: Path) -> None:
    folder = make_expert(tiny_llama, tmp_path / "empty", 1, ["q_proj"])
    save_file(
        {"base_model.model.model.embed_tokens.base_layer.weight": torch.zeros(2)}, folder / WEIGHTS
    )
    with pytest.raises(ValueError, match="holds no LoRA weights"):
        load_expert("empty", folder)


# ---------------------------------------------------------------- missing, corrupt


def test_missing_folder_config_and_weights(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist") as error:
        load_expert("m", tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(error.value)

    folder = make_expert(tiny_llama, tmp_path / "m", 1, ["q_proj"])
    (folder / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="save_pretrained") as error:
        load_expert("m", folder)
    assert str(folder / "adapter_config.json") in str(error.value)

    folder = make_expert(tiny_llama, tmp_path / "w", 1, ["q_proj"])
    (folder / WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError) as error:
        load_expert("w", folder)
    assert WEIGHTS in str(error.value) and "adapter_model.bin" in str(error.value)


@pytest.mark.parametrize("content", [b"{oops", b"\xff\xfe\x81", b"[1, 2]"])
def test_corrupt_config_names_the_file(tmp_path: Path, content: bytes) -> None:
    folder = make_expert(tiny_llama, tmp_path / "c", 1, ["q_proj"])
    (folder / "adapter_config.json").write_bytes(content)
    with pytest.raises(ValueError) as error:
        load_expert("c", folder)
    assert str(folder / "adapter_config.json") in str(error.value)
    assert "expert 'c'" in str(error.value)


@pytest.mark.parametrize("name", [WEIGHTS, "adapter_model.bin"])
def test_truncated_weights_name_the_file(tmp_path: Path, name: str) -> None:
    folder = make_expert(tiny_llama, tmp_path / "t", 1, ["q_proj"])
    if name != WEIGHTS:
        torch.save(load_file(folder / WEIGHTS), folder / name)
        (folder / WEIGHTS).unlink()
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated") as error:
        load_expert("t", folder)
    assert str(folder / name) in str(error.value)
