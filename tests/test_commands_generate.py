"""`loramix generate`: output text, expert colours, chat template, modes and errors."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from helpers import LLAMA_TARGETS, make_expert
from tiny_tokenizer import save_tiny_model, tiny_llama, tiny_tokenizer

from loramix import XLoraConfig, XLoraModel
from loramix.cli import main
from loramix.commands.generate import (
    RESET,
    colour,
    colour_tokens,
    encode_prompt,
    legend,
    plain_legend,
    tagged_tokens,
    token_pieces,
    use_colour,
)
from loramix.generation import dominant_experts, generated_token_scalings
from loramix.smollm2 import load_base_model

PROMPT = "what is two plus two?"


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(base model folder, X-LoRA folder) for a tiny Llama with two experts."""
    root = tmp_path_factory.mktemp("cli")
    base_dir = save_tiny_model(root / "base")
    vocab = len(tiny_tokenizer())

    def factory() -> torch.nn.Module:
        return tiny_llama(vocab)

    experts = {
        name: str(make_expert(factory, root / name, seed, LLAMA_TARGETS, rank=4))
        for seed, name in enumerate(["math", "chem"], start=1)
    }
    model = XLoraModel(load_base_model(base_dir)[0], XLoraConfig(adapters=experts))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.gate.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 3)
    model.save_pretrained(root / "xlora")
    return base_dir, root / "xlora"


def reference(folders: tuple[Path, Path], mode: str, chat: bool = False):
    """What the library gives: (tokenizer, new token ids, dominant experts, expert names)."""
    base_dir, model_dir = folders
    base, tokenizer = load_base_model(base_dir)
    model = XLoraModel.from_pretrained(base, model_dir)
    ids = encode_prompt(tokenizer, PROMPT, chat=chat)
    model.enable_scalings_logging()
    out = model.generate(
        ids,
        max_new_tokens=8,
        do_sample=False,
        scalings_mode=mode,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    new_ids = out[0, ids.shape[1] :].tolist()
    scalings = generated_token_scalings(model.get_scalings_log(), len(new_ids))
    return tokenizer, new_ids, dominant_experts(scalings)[0].tolist(), model.expert_names


def run_cli(folders: tuple[Path, Path], *flags: str) -> int:
    base_dir, model_dir = folders
    argv = ["generate", str(model_dir), "--prompt", PROMPT, "--base", str(base_dir)]
    return main([*argv, "--max-new-tokens", "8", *flags])


@pytest.mark.parametrize("mode", ["granular", "merged"])
def test_show_experts_colours_each_token(folders, mode, capsys, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="loramix.generation")
    assert run_cli(folders, "--show-experts", "--mode", mode, "--colour", "always") == 0
    tokenizer, new_ids, experts, names = reference(folders, mode)
    assert "frozen mode" not in caplog.text  # merged mode really merged, no fallback
    assert len(set(experts)) >= 1 and len(experts) == len(new_ids)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == legend(names)
    assert f"{colour(0)}\u25a0 math{RESET}" in lines[0] and "chem" in lines[0]
    expected = colour_tokens(token_pieces(tokenizer, new_ids), experts)
    assert "\n".join(lines[1:]) == expected


def test_show_experts_in_a_pipe_tags_tokens_without_colours(folders, capsys) -> None:
    assert run_cli(folders, "--show-experts") == 0  # capsys: stdout is not a terminal
    tokenizer, new_ids, experts, names = reference(folders, "granular")
    out = capsys.readouterr().out
    assert "\x1b[" not in out
    pieces = token_pieces(tokenizer, new_ids)
    assert out == f"{plain_legend(names)}\n{tagged_tokens(pieces, experts)}\n"


class Terminal:
    def isatty(self) -> bool:
        return True


def test_colours_only_on_a_terminal_without_no_color(monkeypatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert use_colour("auto", Terminal())
    assert not use_colour("auto", object())  # no isatty: a pipe-like stream
    monkeypatch.setenv("NO_COLOR", "1")
    assert not use_colour("auto", Terminal())
    assert use_colour("always", object()) and not use_colour("never", Terminal())


@pytest.mark.parametrize("mode", ["granular", "frozen"])
def test_plain_output_is_the_decoded_continuation(folders, mode, capsys) -> None:
    assert run_cli(folders, "--mode", mode, "--chat") == 0
    tokenizer, new_ids, _, _ = reference(folders, mode, chat=True)
    printed = capsys.readouterr().out
    assert printed == tokenizer.decode(new_ids, skip_special_tokens=True) + "\n"
    assert "\x1b[" not in printed


def test_chat_prompt_uses_the_template() -> None:
    tokenizer = tiny_tokenizer()
    text = tokenizer.decode(encode_prompt(tokenizer, PROMPT, chat=True)[0])
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    assert PROMPT in text
    with pytest.raises(ValueError, match="pass --no-chat"):
        encode_prompt(tiny_tokenizer(chat_template=None), PROMPT, chat=True)


def test_token_pieces_rebuild_the_text() -> None:
    tokenizer = tiny_tokenizer()
    ids = tokenizer("héllo wörld, the quick fox").input_ids
    pieces = token_pieces(tokenizer, ids)
    assert len(pieces) == len(ids)
    assert "".join(pieces) == tokenizer.decode(ids)


def test_errors_name_the_fix(folders, tmp_path: Path, capsys) -> None:
    base_dir, _ = folders
    code = main(["generate", str(tmp_path / "missing"), "--prompt", "x", "--base", str(base_dir)])
    assert code == 2
    assert "save_pretrained" in capsys.readouterr().err
    assert run_cli(folders, "--max-new-tokens", "0", "--top-p", "2") == 2
    err = capsys.readouterr().err
    assert "--max-new-tokens=0" in err and "--top-p=2" in err


@pytest.mark.parametrize(
    ("flags", "fix"),
    [
        (["--temperature", "nan"], "--temperature=nan: use 0 (greedy) or a number > 0"),
        (["--temperature", "inf"], "--temperature=inf: use 0 (greedy) or a number > 0"),
        (["--temperature", "-1"], "--temperature=-1.0: use 0 (greedy) or a number > 0"),
        (["--top-p", "nan"], "--top-p=nan: use a number in (0, 1]"),
        (["--freeze-after", "3"], "--freeze-after=3 needs --mode frozen or --mode merged"),
    ],
)
def test_bad_sampling_flags_are_refused_before_loading(tmp_path, flags, fix, capsys) -> None:
    assert main(["generate", str(tmp_path / "unread"), "--prompt", PROMPT, *flags]) == 2
    assert fix in capsys.readouterr().err


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt_is_a_one_line_error(folders, prompt, capsys) -> None:
    base_dir, model_dir = folders
    argv = ["generate", str(model_dir), "--prompt", prompt, "--base", str(base_dir)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--prompt is empty" in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where there is no GPU")
def test_unavailable_device_is_a_one_line_error(folders, capsys) -> None:
    assert run_cli(folders, "--device", "cuda") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA device is available" in err


def test_no_progress_hides_the_weight_loading_bar(folders, capfd) -> None:
    capfd.readouterr()
    assert run_cli(folders, "--no-progress") == 0
    assert "Loading weights" not in capfd.readouterr().err
    assert run_cli(folders) == 0  # and only for that command
    assert "Loading weights" in capfd.readouterr().err


def test_base_and_prompt_rendering_default_to_training(folders, tmp_path, capsys, caplog) -> None:
    import json
    import logging
    import shutil

    base_dir, model_dir = folders
    trained = tmp_path / "trained"
    shutil.copytree(model_dir, trained)
    tokenizer = tiny_tokenizer()
    record = {
        "command": "train-gate",
        "prompts": {"chat": True, "chat_template": tokenizer.chat_template},
    }
    (trained / "training_args.json").write_text(json.dumps(record))
    # No --base: the base recorded in base_model.json; no --chat: as training rendered prompts.
    assert main(["generate", str(trained), "--prompt", PROMPT, "--max-new-tokens", "8"]) == 0
    _, new_ids, _, _ = reference((base_dir, trained), "granular", chat=True)
    assert capsys.readouterr().out == tokenizer.decode(new_ids, skip_special_tokens=True) + "\n"
    with caplog.at_level(logging.WARNING, logger="loramix.records"):
        argv = ["generate", str(trained), "--prompt", PROMPT, "--max-new-tokens", "8", "--no-chat"]
        assert main(argv) == 0
    assert (
        "training rendered prompts with the chat template, but they are rendered plain"
        in caplog.text
    )
    _, plain_ids, _, _ = reference((base_dir, trained), "granular", chat=False)
    assert capsys.readouterr().out == tokenizer.decode(plain_ids, skip_special_tokens=True) + "\n"


def test_a_recorded_base_that_is_missing_is_named(folders, tmp_path, capsys) -> None:
    import json
    import shutil

    _, model_dir = folders
    moved = tmp_path / "moved"
    shutil.copytree(model_dir, moved)
    record = json.loads((moved / "base_model.json").read_text())
    record["name"] = str(tmp_path / "gone")
    (moved / "base_model.json").write_text(json.dumps(record))
    assert main(["generate", str(moved), "--prompt", PROMPT]) == 2
    err = capsys.readouterr().err
    assert f"records its base model as {tmp_path / 'gone'}" in err and "pass --base" in err
