"""loramix.commands.flags: flags built from the settings dataclasses, and back."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass

import pytest
import torch

from loramix.cli import build_parser
from loramix.commands.flags import (
    DTYPES,
    add_fields,
    attribute_docs,
    dtype_from_args,
    field_flags,
    from_args,
)
from loramix.config import XLoraConfig
from loramix.training.expert import LoraSettings
from loramix.training.trainer import SCHEDULERS, TrainingConfig


@dataclass(frozen=True)
class Toy:
    """A settings class as the project writes them.

    Attributes:
        steps: How many steps; a long description that
            goes on over two lines.
        rate: A number that may be unset.
        fast: Off by default.
        shown: On by default.
        names: Several names.
    """

    steps: int = 3
    rate: float | None = None
    fast: bool = False
    shown: bool = True
    names: tuple[str, ...] = ("a", "b")


def test_attribute_docs_reads_the_docstring() -> None:
    docs = attribute_docs(Toy)
    assert docs["steps"] == "How many steps; a long description that goes on over two lines."
    assert list(docs) == ["steps", "rate", "fast", "shown", "names"]


def test_one_flag_per_field_and_back() -> None:
    parser = argparse.ArgumentParser()
    add_fields(parser, Toy)
    assert from_args(Toy, parser.parse_args([])) == Toy()
    argv = ["--steps", "7", "--rate", "0.5", "--fast", "--no-shown", "--names", "x", "y"]
    expected = Toy(steps=7, rate=0.5, fast=True, shown=False, names=("x", "y"))
    assert from_args(Toy, parser.parse_args(argv)) == expected
    with pytest.raises(SystemExit):
        parser.parse_args(["--steps", "many"])


def test_the_flags_of_a_settings_object_rebuild_it() -> None:
    parser = argparse.ArgumentParser()
    add_fields(parser, Toy)
    assert field_flags(Toy()) == []  # defaults need no flag
    changed = Toy(steps=7, rate=0.5, fast=True, shown=False, names=("x",))
    flags = field_flags(changed)
    assert flags == ["--steps", "7", "--rate", "0.5", "--fast", "--no-shown", "--names", "x"]
    assert from_args(Toy, parser.parse_args(flags)) == changed
    assert field_flags(changed, skip=("steps", "names")) == [
        "--rate",
        "0.5",
        "--fast",
        "--no-shown",
    ]


def test_a_value_no_flag_gives_is_refused_by_name() -> None:
    @dataclass(frozen=True)
    class Unsettable:
        limit: int | None = 5

    with pytest.raises(ValueError, match="limit=None"):
        field_flags(Unsettable(limit=None))
    with pytest.raises(ValueError, match="limit=True: --limit takes a number"):
        field_flags(Unsettable(limit=True))
    assert field_flags(Toy(names=["a", "b"])) == []  # a list equal to the default tuple


def test_every_field_of_the_training_settings_has_a_documented_flag() -> None:
    parser = argparse.ArgumentParser()
    add_fields(parser, TrainingConfig, choices={"lr_scheduler": SCHEDULERS})
    add_fields(parser, LoraSettings)
    add_fields(parser, XLoraConfig, skip={"adapters"})
    flags = {a.dest: a for a in parser._actions if a.dest != "help"}
    for cls in (TrainingConfig, LoraSettings):
        for name in cls.__dataclass_fields__:
            assert name in flags and flags[name].help, name
    assert flags["lr_scheduler"].choices == list(SCHEDULERS)
    assert "--no-progress" in flags["progress"].option_strings
    args = parser.parse_args(["--lr", "0.01", "--targets", "q_proj", "--top-k-lora", "2"])
    assert from_args(TrainingConfig, args) == TrainingConfig(lr=0.01)
    assert from_args(LoraSettings, args).targets == ("q_proj",)
    assert from_args(XLoraConfig, args, adapters={"a": "x", "b": "y"}).top_k_lora == 2


# ------------------------------------------------------------------ --dtype

COMMANDS = {  # the arguments each command needs besides --dtype
    "train-expert": ["train-expert", "--data", "d.jsonl", "--out", "o"],
    "train-gate": ["train-gate", "--data", "d.jsonl", "--out", "o", "--expert", "e=dir"],
    "generate": ["generate", "m", "--prompt", "p"],
    "eval": ["eval", "m", "--test", "a=b.jsonl", "--out", "o"],
    "science demo": ["science", "demo"],
    "serve": ["serve", "m"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_model_command_takes_the_same_dtype_flag(command: str) -> None:
    parser = build_parser()
    assert dtype_from_args(parser.parse_args(COMMANDS[command])) == torch.float32
    for name in DTYPES:
        args = parser.parse_args([*COMMANDS[command], "--dtype", name])
        assert dtype_from_args(args) == getattr(torch, name)
    with pytest.raises(SystemExit):
        parser.parse_args([*COMMANDS[command], "--dtype", "float64"])


@pytest.mark.parametrize("command", ["eval", "generate", "serve"])
def test_commands_that_load_a_model_take_a_threads_flag(command: str) -> None:
    from loramix.commands.flags import apply_threads

    parser = build_parser()
    assert parser.parse_args(COMMANDS[command]).threads is None
    args = parser.parse_args([*COMMANDS[command], "--threads", "0"])
    with pytest.raises(ValueError, match="--threads=0: use an int >= 1"):
        apply_threads(args)
    before = torch.get_num_threads()
    try:
        apply_threads(parser.parse_args([*COMMANDS[command], "--threads", "1"]))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------ science retrain


@pytest.mark.parametrize("action", [["retrain"], ["add-domain", "physics"]])
def test_every_retrain_setting_has_a_flag_with_help(action: list[str]) -> None:
    from loramix.science.pipeline import RetrainSettings

    sub = subcommand(build_parser(), "science", action[0])
    flags = {a.dest: a for a in sub._actions if a.dest != "help"}
    for name in RetrainSettings.__dataclass_fields__:
        if name == "gate_candidates":  # set through --gate-candidates and --gate-steps
            gate_flags = {"gate_candidates", "gate_steps"} & flags.keys()
            # add-domain's new gate takes the settings the run chose: no gate flags there
            expected = set() if action[0] == "add-domain" else {"gate_candidates", "gate_steps"}
            assert gate_flags == expected
            continue
        assert name in flags and flags[name].help, name


def test_retrain_flags_round_trip_into_the_settings() -> None:
    from loramix.commands.science import settings_from_args
    from loramix.science.pipeline import RetrainSettings

    parser = build_parser()
    assert settings_from_args(parser.parse_args(["science", "retrain"])) == RetrainSettings()
    args = parser.parse_args(
        ["science", "retrain", "--n-train", "12", "--alpha", "4", "--no-layerwise",
         "--train-dtype", "float32", "--eval-limit", "3", "--targets", "q_proj", "v_proj",
         "--gate-steps", "7", "--domains", "biology,chemistry", "proteins",
         "--multitask-candidates", "s400,s800-best", "s100"]
    )  # fmt: skip
    settings = settings_from_args(args)
    assert (settings.n_train, settings.alpha, settings.layerwise) == (12, 4.0, False)
    assert (settings.train_dtype, settings.eval_limit) == ("float32", 3)
    assert settings.multitask_candidates == ("s400", "s800-best", "s100")
    no_baseline = settings_from_args(parser.parse_args(["science", "retrain", "--no-multitask"]))
    assert not no_baseline.multitask
    assert settings.targets == ("q_proj", "v_proj")
    assert settings.domains == ("biology", "chemistry", "proteins")
    assert {c.steps for c in settings.gate_candidates} == {7}
    with pytest.raises(SystemExit):
        parser.parse_args(["science", "retrain", "--train-dtype", "float16"])


def test_gate_candidates_keeps_the_named_defaults_in_order() -> None:
    from loramix.commands.science import settings_from_args
    from loramix.science.selection import DEFAULT_CANDIDATES

    first, second = DEFAULT_CANDIDATES[-1].name, DEFAULT_CANDIDATES[0].name
    parser = build_parser()
    args = parser.parse_args(
        ["science", "retrain", "--gate-candidates", f"{first},{second}", "--gate-steps", "9"]
    )
    candidates = settings_from_args(args).gate_candidates
    assert [c.name for c in candidates] == [first, second]
    assert [c.steps for c in candidates] == [9, 9]
    assert candidates[0].layerwise == DEFAULT_CANDIDATES[-1].layerwise

    for names, problem in (([first, "nope"], r"unknown \['nope'\]"), ([first, first], "repeats")):
        args = parser.parse_args(["science", "retrain", "--gate-candidates", *names])
        known = re.escape(str([c.name for c in DEFAULT_CANDIDATES]))
        with pytest.raises(ValueError, match=rf"--gate-candidates: .*{problem}.*{known}"):
            settings_from_args(args)


def test_gate_candidates_spelled_by_their_settings() -> None:
    from loramix.commands.science import settings_from_args
    from loramix.science.selection import DEFAULT_CANDIDATES, GateCandidate, candidate_from_name

    parser = build_parser()
    args = parser.parse_args(
        ["science", "retrain", "--gate-candidates", "lr3e-3-s1200,lr1e-2-s1200-shared,lr0.5-s7"]
    )
    candidates = settings_from_args(args).gate_candidates
    assert candidates == (
        DEFAULT_CANDIDATES[0],
        GateCandidate("lr1e-2-s1200-shared", steps=1200, lr=1e-2, layerwise=False),
        GateCandidate("lr0.5-s7", steps=7, lr=0.5),
    )
    for default in DEFAULT_CANDIDATES:  # the defaults spell themselves
        assert candidate_from_name(default.name) == default
    for name in ("lr3e-3", "s600", "lr0-s600", "lr1e999-s6", "lr3e-3-s0", "lr3e-3-s600-x"):
        assert candidate_from_name(name) is None
        args = parser.parse_args(["science", "retrain", "--gate-candidates", name])
        with pytest.raises(ValueError, match=r"unknown .*lr<learning rate>-s<steps>"):
            settings_from_args(args)


def test_add_domain_defaults_to_every_other_domain() -> None:
    from loramix.commands.science import add_domain_settings
    from loramix.science.registry import DOMAINS

    parser = build_parser()
    args = parser.parse_args(["science", "add-domain", "biology", "--expert-steps", "5"])
    settings = add_domain_settings(args)
    assert settings.expert_steps == 5
    assert settings.domains == tuple(d for d in DOMAINS if d != "biology")
    args = parser.parse_args(["science", "add-domain", "biology", "--domains", "chemistry"])
    assert add_domain_settings(args).domains == ("chemistry",)
    with pytest.raises(SystemExit):  # argparse names the flag it does not know
        parser.parse_args(["science", "add-domain", "biology", "--gate-steps", "9"])


def subcommand(parser: argparse.ArgumentParser, *names: str) -> argparse.ArgumentParser:
    """The parser of `prog NAME NAME ...`."""
    for name in names:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        parser = actions[0].choices[name]
    return parser
