"""The `loramix` command line: a thin layer over the library's typed functions.

Each subcommand lives in its own module under `loramix.commands` and exposes
`add_parser(subparsers)` (declares its flags) and `run(args) -> int` (calls the library).
This module only collects them; it holds no logic of its own.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# Subcommand name -> module under loramix.commands. Imported lazily so that
# `loramix --help` stays fast and optional dependencies load only when used.
SUBCOMMANDS: dict[str, str] = {
    "train-expert": "train_expert",
    "train-gate": "train_gate",
    "eval": "eval",
    "science": "science",
    "generate": "generate",
    "serve": "serve",
    "convert": "convert",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loramix",
        description="Build, train, run and evaluate X-LoRA mixtures of LoRA experts.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMANDS.values():
        module = importlib.import_module(f"loramix.commands.{module_name}")
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(f"loramix.commands.{SUBCOMMANDS[args.command]}")
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
