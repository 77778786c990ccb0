"""Tests of loramix.records: reading the base and prompt records, and the defaults they give."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from tiny_tokenizer import tiny_tokenizer

from loramix.records import (
    CANONICAL_NAME,
    base_to_load,
    choose_chat,
    default_base,
    prompt_record,
    prompt_rendering,
)


def write(folder: Path, name: str, data: object) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(data))


def test_nothing_recorded_keeps_the_old_defaults(tmp_path) -> None:
    assert prompt_rendering(tmp_path) is None and default_base(tmp_path) is None
    assert base_to_load(tmp_path, None) == "smollm2"
    assert choose_chat(tmp_path, None, tiny_tokenizer(), fallback=True) is True
    assert choose_chat(tmp_path, False, tiny_tokenizer(), fallback=True) is False


def test_the_recorded_rendering_is_the_default_and_another_template_warns(tmp_path, caplog) -> None:
    tokenizer = tiny_tokenizer()
    write(tmp_path, "training_args.json", {"prompts": prompt_record(tokenizer, True)})
    with caplog.at_level(logging.WARNING, logger="loramix.records"):
        assert choose_chat(tmp_path, None, tokenizer, fallback=False) is True
    assert caplog.text == ""
    write(tmp_path, "training_args.json", {"prompts": {"chat": True, "chat_template": "{{ x }}"}})
    with caplog.at_level(logging.WARNING, logger="loramix.records"):
        assert choose_chat(tmp_path, None, tokenizer, fallback=False) is True
    assert "another chat template than this tokenizer's" in caplog.text


def test_recorded_bases(tmp_path, caplog) -> None:
    write(tmp_path / "a", "base_model.json", {"name": CANONICAL_NAME, "fingerprint": {}})
    assert base_to_load(tmp_path / "a", None) == "smollm2"  # the embedded model's hub name
    with caplog.at_level(logging.WARNING, logger="loramix.records"):
        assert base_to_load(tmp_path / "a", str(tmp_path)) == str(tmp_path)
    assert f"was trained on {CANONICAL_NAME} but --base {tmp_path} was given" in caplog.text
    # An expert folder: the adapter config names the base (older experts say "smollm2").
    write(tmp_path / "e", "adapter_config.json", {"base_model_name_or_path": "smollm2"})
    assert default_base(tmp_path / "e") == "smollm2"


def test_a_broken_record_names_the_file(tmp_path) -> None:
    (tmp_path / "training_args.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"training_args.json: cannot read it as JSON"):
        prompt_rendering(tmp_path)
