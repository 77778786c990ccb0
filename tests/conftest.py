"""Pytest fixtures shared by the test files; the plain helpers are in `helpers.py`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import GPT2_TARGETS, LLAMA_TARGETS, make_expert, tiny_gpt2, tiny_llama


@pytest.fixture
def llama_experts(tmp_path: Path) -> dict[str, str]:
    """Three experts on a tiny Llama with different ranks, alphas and targets."""
    return {
        "bio": str(make_expert(tiny_llama, tmp_path / "bio", 1, LLAMA_TARGETS, rank=4)),
        "chem": str(make_expert(tiny_llama, tmp_path / "chem", 2, LLAMA_TARGETS, rank=2, alpha=4)),
        "mech": str(
            make_expert(
                tiny_llama, tmp_path / "mech", 3, ["q_proj", "v_proj"], rank=3, use_rslora=True
            )
        ),
    }


@pytest.fixture
def gpt2_experts(tmp_path: Path) -> dict[str, str]:
    return {
        "a": str(make_expert(tiny_gpt2, tmp_path / "a", 1, GPT2_TARGETS, rank=4)),
        "b": str(make_expert(tiny_gpt2, tmp_path / "b", 2, GPT2_TARGETS, rank=2)),
    }


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`@pytest.mark.cuda` tests are skipped where torch sees no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
