"""The README's Python example runs as written (on a tiny model in place of SmolLM2)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from helpers import LLAMA_TARGETS, make_expert
from tiny_tokenizer import save_tiny_model, tiny_llama, tiny_tokenizer

from loramix import XLoraConfig, XLoraModel
from loramix.smollm2 import load_base_model

README = Path(__file__).parents[1] / "README.md"


def python_example() -> str:
    section = README.read_text().split("\n## Python\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_readme_python_example_runs(tmp_path: Path, monkeypatch, capsys) -> None:
    """The same files as in the repository (a bundle with biology and chemistry experts)."""
    base = save_tiny_model(tmp_path / "tiny-llama")
    vocab = len(tiny_tokenizer())
    experts = {
        name: str(make_expert(lambda: tiny_llama(vocab), tmp_path / name, seed, LLAMA_TARGETS))
        for seed, name in enumerate(["biology", "chemistry"], start=1)
    }
    bundle = tmp_path / "models" / "science-xlora"
    XLoraModel(load_base_model(base)[0], XLoraConfig(adapters=experts)).save_pretrained(bundle)
    monkeypatch.chdir(tmp_path)

    code = python_example()
    assert code.count('"smollm2"') == 2  # the only change: the tiny model for SmolLM2
    namespace: dict = {}
    exec(compile(code.replace('"smollm2"', repr(str(base))), "README.md", "exec"), namespace)

    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("tensor(") and "torch.Size([2, " in printed[0]
    assert printed[1].startswith("[") and (tmp_path / "my-xlora" / "xlora_config.json").is_file()
    merged = namespace["merged"]
    assert type(merged).__name__ == "LlamaForCausalLM"
    ids = namespace["ids"]
    assert (ids[:, -1] != namespace["tokenizer"].pad_token_id).all()  # padded on the left
    with torch.no_grad():
        assert torch.isfinite(merged(input_ids=ids).logits).all()
