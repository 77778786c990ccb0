"""`--dtype`: one definition, the same choices on every command that loads a model."""

from __future__ import annotations

import pytest
import torch

from loramix.cli import build_parser
from loramix.commands.model_flags import DTYPES, dtype_from_args

COMMANDS = {  # the arguments each command needs besides --dtype
    "train-expert": ["train-expert", "--data", "d.jsonl", "--out", "o"],
    "train-gate": ["train-gate", "--data", "d.jsonl", "--out", "o", "--expert", "e=dir"],
    "generate": ["generate", "m", "--prompt", "p"],
    "eval": ["eval", "m", "--test", "a=b.jsonl", "--out", "o"],
    "science demo": ["science", "demo"],
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
