"""Tests of the `loramix` command's manners: one-line input errors, Ctrl-C, buffering."""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from tiny_tokenizer import save_tiny_model
from transformers import Trainer

from loramix.cli import build_parser, main

LINE = '{"prompt": "what is two plus two? ", "completion": "four."}\n'


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path]:
    """(tiny Llama folder, a 12-line prompt/completion file)."""
    root = tmp_path_factory.mktemp("cli")
    (root / "qa.jsonl").write_text(LINE * 12)
    return save_tiny_model(root / "tiny-llama"), root / "qa.jsonl"


QUICK = ["--batch-size", "4", "--rank", "2", "--targets", "q_proj", "--eval-fraction", "0"]


def train_expert_argv(files: tuple[Path, Path], out: Path) -> list[str]:
    base, data = files
    return ["train-expert", "--base", str(base), "--data", str(data), "--out", str(out)]


def interrupt_at(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Make Trainer raise KeyboardInterrupt (as Ctrl-C does) when it reaches `step`."""
    original = Trainer.training_step

    def training_step(self, *args, **kwargs):
        if self.state.global_step == step:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", training_step)


def test_ctrl_c_in_training_says_where_it_stopped_and_how_to_resume(
    files, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "expert"
    argv = train_expert_argv(files, out)
    argv += [*QUICK, "--max-steps", "5", "--save-steps", "2", "--no-progress", "--overwrite"]
    interrupt_at(monkeypatch, 3)
    assert main(argv) == 130
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    checkpoint = out / "checkpoints" / "checkpoint-2"
    assert "interrupted at step 3" in err
    assert f"the last checkpoint {checkpoint} is safe" in err
    command = err.split("Resume with: ", 1)[1]
    resume = shlex.split(command)
    assert resume[0] == "loramix" and "--resume" in resume and "--overwrite" not in resume

    monkeypatch.undo()
    assert main(resume[1:]) == 0  # the printed command resumes the run
    assert (out / "adapter_config.json").is_file()
    state = json.loads((out / "checkpoints" / "checkpoint-5" / "trainer_state.json").read_text())
    assert state["global_step"] == 5


def test_ctrl_c_before_the_first_checkpoint_says_to_start_again(
    files, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "expert"
    argv = train_expert_argv(files, out)
    argv += [*QUICK, "--max-steps", "5", "--save-steps", "4", "--no-progress"]
    interrupt_at(monkeypatch, 1)
    assert main(argv) == 130
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "before the first checkpoint" in err
    again = shlex.split(err.split("Start again with: ", 1)[1])
    assert again[1:] == [*argv, "--overwrite"]


def test_ctrl_c_outside_training_is_one_line(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr("loramix.commands.generate.run", interrupted)
    assert main(["generate", "folder", "--prompt", "hi"]) == 130
    assert capsys.readouterr().err == "loramix generate: interrupted (Ctrl-C)\n"


def test_library_input_errors_are_one_message_with_status_2(files, tmp_path, capsys):
    argv = train_expert_argv(files, tmp_path)
    assert main([*argv, "--lr", "0", "--epochs", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "loramix train-expert: error: Invalid TrainingConfig:",
        "  lr=0.0: use a positive learning rate, e.g. 2e-4.",
        "  epochs=-1.0: use a positive number, e.g. 1 or 3.",
    ]


def test_verbose_adds_the_traceback(files, tmp_path, capsys):
    argv = train_expert_argv(files, tmp_path)
    assert main(["-v", *argv, "--lr", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and "\nloramix train-expert: error: Invalid Train" in err


def test_bugs_keep_their_traceback(monkeypatch):
    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr("loramix.commands.generate.run", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["generate", "folder", "--prompt", "hi"])


def test_piped_output_keeps_stdout_and_stderr_in_order(tmp_path):
    """With both streams on one pipe, a line printed before a log line comes before it."""
    script = (
        "import logging, sys\n"
        "import loramix.commands.generate as g\n"
        "def run(args):\n"
        "    print('first, on stdout')\n"
        "    logging.getLogger('loramix').info('second, on stderr')\n"
        "    return 0\n"
        "g.run = run\n"
        "from loramix.cli import main\n"
        "sys.exit(main(['generate', 'folder', '--prompt', 'hi']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=Path(__file__).parents[1],
        check=True,
    )
    lines = [line for line in done.stdout.splitlines() if "first" in line or "second" in line]
    assert lines == ["first, on stdout", "INFO loramix: second, on stderr"]


def test_training_prints_no_warning_and_no_progress_bar_with_no_progress(
    files, tmp_path, capfd, caplog
):
    argv = train_expert_argv(files, tmp_path)
    argv += [*QUICK, "--max-steps", "3", "--save-steps", "1", "--no-progress", "--overwrite"]
    argv[argv.index("--eval-fraction") + 1] = "0.2"
    capfd.readouterr()
    caplog.set_level("INFO")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(argv) == 0
    assert [str(w.message) for w in caught] == []
    err = capfd.readouterr().err
    assert "it/s" not in err and "Loading weights" not in err and "Writing" not in err
    assert "mtime" not in err and "Warning" not in err
    assert "trained 3 step(s)" in caplog.text  # the log lines stay


def all_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += all_parsers(sub)
    return found


def test_help_shows_real_defaults_only():
    parsers = all_parsers(build_parser())[1:]
    assert {p.prog for p in parsers} >= {"loramix train-gate", "loramix science demo"}
    for parser in parsers:
        text = " ".join(parser.format_help().split())  # one line: wrapped help joined
        for noise in ("(default: None)", "(default: False)", "(default: [])", "same name) (def"):
            assert noise not in text, (parser.prog, noise)
        for action in parser._actions:
            if action.option_strings and action.nargs != 0 and not action.required:
                assert action.help, f"{parser.prog} {action.option_strings[0]} has no help"
    helps = {p.prog: " ".join(p.format_help().split()) for p in parsers}
    assert "--lr LR Peak learning rate. (default: 0.0002)" in helps["loramix train-gate"]
    targets = "(default: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj)"
    assert targets in helps["loramix train-expert"]


def test_importing_peft_through_the_cli_prints_no_backend_notices():
    code = (
        "import logging; from loramix.cli import quiet_import_noise; "
        "logging.basicConfig(); quiet_import_noise(); import loramix.model, peft"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "Failed to load" not in done.stderr
    assert "register_constant" not in done.stderr
