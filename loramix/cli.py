"""The `loramix` command line: a thin layer over the library's typed functions.

Each subcommand lives in its own module under `loramix.commands` and exposes
`add_parser(subparsers)` (declares its flags) and `run(args) -> int` (calls the library).
This module collects them and owns the command's manners:

* a mistake in the input (`UsageError`, and the library's `ValueError`s, missing files and
  missing optional packages, whose messages name the fix) is one message on stderr, with no
  traceback, and exit status 2: one line, or a first line followed by one line per problem
  when the library found several (every bad line of a data file, every invalid setting).
  `-v` adds the traceback. Any other exception is a bug and keeps its traceback.
* Ctrl-C is one line and exit status 130; during training it says where the run stopped,
  which checkpoint is safe and the exact command that resumes it.
* stdout is line-buffered, so that its lines and the log lines on stderr keep their order
  when both go to one pipe or file.
* the import-time notices of optional quantization backends (torchao's and bitsandbytes'
  kernels that this machine lacks), which peft triggers on import and which nobody can act
  on, are dropped by exact logger and message (`loramix.import_noise`); every other record
  passes.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import shlex
import sys
import traceback
from collections.abc import Iterator, Sequence

from loramix.commands.help_format import DefaultsHelpFormatter
from loramix.errors import TrainingInterrupted
from loramix.import_noise import quiet_import_noise

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

USER_ERRORS = (ValueError, OSError, ImportError)
"""Exceptions whose message is the whole story: shown as one line, exit status 2."""


EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loramix",
        description="Build, train, run and evaluate X-LoRA mixtures of LoRA experts.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log debug messages; tracebacks on errors"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMANDS.values():
        module = importlib.import_module(f"loramix.commands.{module_name}")
        module.add_parser(subparsers)
    _set_formatter(parser)
    return parser


def _set_formatter(parser: argparse.ArgumentParser) -> None:
    """Every (sub)command's help shows real defaults only (see `DefaultsHelpFormatter`)."""
    parser.formatter_class = DefaultsHelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _set_formatter(sub)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _line_buffered_stdout()
    quiet_import_noise()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    action = getattr(args, "science_command", None)  # commands with actions: name both
    name = f"loramix {args.command}" + (f" {action}" if action else "")
    try:
        module = importlib.import_module(f"loramix.commands.{SUBCOMMANDS[args.command]}")
        with _progress_bars(getattr(args, "progress", True)):
            return int(module.run(args) or 0)
    except TrainingInterrupted as stop:
        print(f"{name}: {interrupted_message(stop, argv)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print(f"{name}: interrupted (Ctrl-C)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except USER_ERRORS as error:
        if args.verbose:
            traceback.print_exc()
        print(f"{name}: error: {error_text(error)}", file=sys.stderr)
        return EXIT_USAGE


def error_text(error: BaseException) -> str:
    """The error's message without blank lines; a list of problems keeps one per line."""
    text = str(error)
    if isinstance(error, KeyError) and error.args:  # str() of a KeyError is its repr
        text = str(error.args[0])
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    return "\n".join(lines) or type(error).__name__


def interrupted_message(stop: TrainingInterrupted, argv: Sequence[str]) -> str:
    """`stopped at step N; checkpoint X is safe; resume with: loramix ... --resume`."""
    resume = [arg for arg in argv if arg != "--overwrite"]
    if "--resume" not in resume:
        resume.append("--resume")
    if stop.checkpoint is None:
        again = [arg for arg in argv if arg != "--resume"]
        if "--overwrite" not in again:
            again.append("--overwrite")
        return (
            f"interrupted at step {stop.step}, before the first checkpoint, so there is "
            f"nothing to resume in {stop.out}. Start again with: loramix {shlex.join(again)}"
        )
    return (
        f"interrupted at step {stop.step}; the last checkpoint {stop.checkpoint} is safe. "
        f"Resume with: loramix {shlex.join(resume)}"
    )


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """With `--no-progress`, no progress bar at all (weight loading, saving) while it runs."""
    if enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if before:
            hf_logging.enable_progress_bar()


def _line_buffered_stdout() -> None:
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        with contextlib.suppress(ValueError):  # a stream that cannot change (e.g. detached)
            reconfigure(line_buffering=True)


if __name__ == "__main__":
    sys.exit(main())
