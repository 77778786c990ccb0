"""loramix.evaluation.plots: PNG files of the requested pixel size, labels, clear errors."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import LLAMA_TARGETS, make_expert
from tiny_tokenizer import tiny_llama, tiny_tokenizer

from loramix import XLoraConfig, XLoraModel
from loramix.evaluation.plots import (
    block_index,
    plot_expert_usage,
    plot_layer_scalings,
    plot_token_scalings,
    short_module_name,
    token_labels,
    write_eval_plots,
)

EXPERTS = ["biology", "chemistry", "proteins"]
MODULES = [f"model.layers.{b}.{m}" for b in range(3) for m in ("self_attn.q_proj", "mlp.up_proj")]


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG header, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def scalings(tokens: int = 5, layers: int = len(MODULES), experts: int = 3) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.dirichlet(np.ones(experts), size=(tokens, layers))  # (T, L, E)


def test_short_module_names() -> None:
    assert short_module_name("model.layers.12.self_attn.q_proj") == "12.q"
    assert short_module_name("model.layers.3.mlp.down_proj") == "3.down"
    assert short_module_name("transformer.h.0.attn.c_attn") == "0.c_attn"
    assert short_module_name("model.embed_tokens") == "embed_tokens"
    assert block_index("model.layers.7.mlp.up_proj") == 7
    assert block_index("lm_head") is None


def test_layer_heatmap_has_the_requested_pixel_size(tmp_path: Path) -> None:
    path = plot_layer_scalings(
        scalings(), EXPERTS, MODULES, tmp_path / "layers.png", size=(6, 3), dpi=50
    )
    assert path.stat().st_size > 1000
    assert png_size(path) == (300, 150)
    assert [p.name for p in tmp_path.iterdir()] == ["layers.png"]  # no temporary file left


def test_layer_heatmap_accepts_torch_and_a_token_mean(tmp_path: Path) -> None:
    values = torch.tensor(scalings())  # (T, L, E)
    path = plot_layer_scalings(values.mean(0), EXPERTS, MODULES, tmp_path / "a.png", dpi=40)
    width, height = png_size(path)
    assert width >= 6 * 40 and height >= 2.5 * 40  # the default size grows from a minimum


def test_token_heatmap_over_a_block_range(tmp_path: Path) -> None:
    labels = ["The", "·", "AT", "G", "\\n"]
    path = plot_token_scalings(
        scalings(),
        EXPERTS,
        labels,
        tmp_path / "tokens.png",
        module_names=MODULES,
        blocks=(1, 3),
        size=(5, 2.5),
        dpi=60,
    )
    assert png_size(path) == (300, 150)
    with pytest.raises(ValueError, match="blocks 0 to 2"):
        plot_token_scalings(
            scalings(), EXPERTS, labels, tmp_path / "x.png", module_names=MODULES, blocks=(5, 9)
        )
    with pytest.raises(ValueError, match="tokens has 2 entries"):
        plot_token_scalings(scalings(), EXPERTS, labels[:2], tmp_path / "x.png")


def test_expert_usage_heatmap(tmp_path: Path) -> None:
    usage = {
        "biology": {"biology": 0.7, "chemistry": 0.2, "proteins": 0.1},
        "mixed": [0.3, 0.3, 0.4],
    }
    path = plot_expert_usage(usage, EXPERTS, tmp_path / "usage.png", size=(4, 2), dpi=80)
    assert png_size(path) == (320, 160)
    with pytest.raises(ValueError, match="E \\(one value per expert\\)"):
        plot_expert_usage({"x": [0.5, 0.5]}, EXPERTS, tmp_path / "bad.png")


def test_wrong_shapes_name_the_axes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"expected a non-empty \(L, E\) or \(T, L, E\)"):
        plot_layer_scalings(np.zeros(4), EXPERTS, MODULES, tmp_path / "x.png")
    with pytest.raises(ValueError, match="module_names has 2 entries"):
        plot_layer_scalings(scalings(), EXPERTS, MODULES[:2], tmp_path / "x.png")


def test_missing_matplotlib_names_the_extra(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails
    with pytest.raises(ImportError, match=r"loramix\[plots\]"):
        plot_expert_usage({"a": [1.0, 0.0, 0.0]}, EXPERTS, tmp_path / "x.png")


def test_token_labels_are_printable() -> None:
    tokenizer = tiny_tokenizer()
    ids = tokenizer("hello\n world", add_special_tokens=False)["input_ids"]
    labels = token_labels(tokenizer, ids)
    assert "".join(labels).replace("·", "") == "hello\\nworld"
    assert all(label and "\n" not in label for label in labels)


def test_eval_plots_for_a_model(tmp_path: Path) -> None:
    tokenizer = tiny_tokenizer()
    vocab = len(tokenizer)
    folder = make_expert(lambda: tiny_llama(vocab), tmp_path / "e", 1, LLAMA_TARGETS)
    model = XLoraModel(
        tiny_llama(vocab),
        XLoraConfig(adapters={"a": str(folder), "b": str(folder)}, xlora_size=8),
    )
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello world"}], tokenize=False
    )
    other = chat.replace("hello world", "the lazy dog")
    samples = {
        "one": tokenizer(chat, add_special_tokens=False)["input_ids"],
        "two two": tokenizer(other, add_special_tokens=False)["input_ids"],
    }
    written = write_eval_plots(
        model, tokenizer, samples, tmp_path / "out", usage={"one": {"a": 0.4, "b": 0.6}}, dpi=30
    )
    names = sorted(p.name for p in written)
    assert names == [
        "expert_usage.png",
        "layers_one.png",
        "layers_two_two.png",
        "tokens_one.png",
        "tokens_two_two.png",
    ]
    assert all(png_size(p)[0] > 0 for p in written)
