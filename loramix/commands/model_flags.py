"""Flags of every command that loads a model: `--dtype`.

Defined once here so that `train-expert`, `train-gate`, `generate`, `eval` and
`science demo` accept the same choices with the same meaning.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DTYPES = ("float32", "float16", "bfloat16")
DTYPE_HELP = (
    "dtype of the base model's and the experts' weights; the gate "
    "computes its softmax and scalings in float32 whatever this is"
)


def add_dtype_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """`--dtype {float32,float16,bfloat16}`, default float32."""
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help=DTYPE_HELP)


def dtype_from_args(args: argparse.Namespace) -> torch.dtype:
    """The torch dtype that `--dtype` names."""
    import torch

    return getattr(torch, args.dtype)
