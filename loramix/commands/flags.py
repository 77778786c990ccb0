"""Command-line flags built from the settings dataclasses, so a new setting is one edit.

`add_fields(group, SettingsClass)` declares one flag per dataclass field: `--field-name`
with the field's type and default, the help text taken from the class docstring's
"Attributes:" entry, `nargs="+"` for tuples, `--no-field-name` for a setting that defaults to
True. `from_args(SettingsClass, args)` builds the object back from the parsed flags. Adding
a field (with its docstring line) to `TrainingConfig`, `LoraSettings`, `XLoraConfig` or
`GateRegularizer` adds its flag to `train-expert` / `train-gate`; nothing here changes.
(litgpt's CLI, generated from its `TrainArgs`/`EvalArgs` dataclasses, is the model.)
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import types
import typing
from collections.abc import Collection, Mapping
from typing import Any, TypeVar

T = TypeVar("T")

DTYPES = ("float32", "float16", "bfloat16")
DTYPE_HELP = (
    "dtype of the base model's and the experts' weights; the gate computes its softmax and "
    "scalings in float32 whatever this is"
)


def add_fields(
    group: argparse._ActionsContainer,
    cls: type,
    *,
    skip: Collection[str] = (),
    choices: Mapping[str, Collection[Any]] | None = None,
) -> None:
    """Declare one flag per field of the dataclass `cls` (see the module docstring).

    Args:
        group: A parser or argument group.
        cls: A dataclass whose fields all have defaults (except those in `skip`).
        skip: Fields that get no flag.
        choices: Field name -> allowed values.
    """
    hints = typing.get_type_hints(cls)
    docs = attribute_docs(cls)
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        default = _default(field)
        kind, optional = _unwrap(hints[field.name])
        flag = "--" + field.name.replace("_", "-")
        help_text = docs.get(field.name, "").replace("%", "%%")
        if kind is bool:
            if default:
                group.add_argument(
                    "--no-" + field.name.replace("_", "-"),
                    dest=field.name,
                    action="store_false",
                    help=f"turn off: {help_text}",
                )
            else:
                group.add_argument(flag, action="store_true", help=help_text)
            continue
        options: dict[str, Any] = {"dest": field.name, "default": default, "help": help_text}
        if typing.get_origin(kind) in (tuple, list):
            options |= {"nargs": "+", "type": typing.get_args(kind)[0], "metavar": "NAME"}
            options["default"] = list(default)
        else:
            options["type"] = kind
        if choices and field.name in choices:
            options["choices"] = list(choices[field.name])
        group.add_argument(flag, **options)


def from_args(cls: type[T], args: argparse.Namespace, **values: Any) -> T:
    """The dataclass `cls` built from the parsed flags of its fields, plus `values`."""
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    found = {name: getattr(args, name) for name in names if hasattr(args, name)}
    for name, value in found.items():
        if isinstance(value, list):
            found[name] = tuple(value)
    return cls(**(found | values))


def field_flags(settings: Any, *, skip: Collection[str] = ()) -> list[str]:
    """The flags of `add_fields` that rebuild the dataclass `settings` (the inverse of
    `from_args`): one per field whose value differs from its default, in field order.

    Raises:
        ValueError: If a field holds a value no flag can give (None where the default is
            not None, a bool in a field of numbers), naming the field.
    """
    words: list[str] = []
    hints = typing.get_type_hints(type(settings))
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        value = tuple(value) if isinstance(value, list) else value
        default = _default(field)
        default = tuple(default) if isinstance(default, list) else default
        if field.name in skip or value == default:
            continue
        name = field.name.replace("_", "-")
        if _unwrap(hints[field.name])[0] is bool:
            words.append(f"--{name}" if value else f"--no-{name}")
        elif isinstance(value, bool):
            raise ValueError(f"{field.name}={value!r}: --{name} takes a number, not a bool")
        elif isinstance(value, tuple):
            words += [f"--{name}", *(str(item) for item in value)]
        elif value is None:
            raise ValueError(f"{field.name}=None: no flag of --{name} gives it")
        else:
            words += [f"--{name}", str(value)]
    return words


def attribute_docs(cls: type) -> dict[str, str]:
    """Field name -> its description in the Google-style "Attributes:" docstring section."""
    docs: dict[str, str] = {}
    lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
    inside, name = False, None
    for line in lines:
        if line.strip() == "Attributes:":
            inside = True
            continue
        if not inside:
            continue
        if line and not line.startswith(" "):  # the next section
            break
        entry = re.match(r"^ {4}(\w+)(?: \(.*?\))?: (.*)$", line)
        if entry:
            name = entry.group(1)
            docs[name] = entry.group(2).strip()
        elif name and line.strip():
            docs[name] += " " + line.strip()
    return docs


def add_data_arguments(group: argparse._ArgumentGroup) -> None:
    """`--data`, `--out`, `--resume`, `--overwrite`."""
    group.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="FILE[:WEIGHT]",
        help="a .jsonl file, optionally with a sampling weight; repeat to mix files",
    )
    group.add_argument(
        "--out", required=True, help="output folder (checkpoints in OUT/checkpoints)"
    )
    group.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    group.add_argument("--overwrite", action="store_true", help="replace an earlier run in OUT")


def add_training_arguments(parser: argparse.ArgumentParser, skip: Collection[str] = ()) -> None:
    """The `TrainingConfig` flags (`--device`, `--report-to`, `--no-progress` among them) but
    those of the fields in `skip`, and `--dtype`."""
    from loramix.smollm2 import DEVICES
    from loramix.training.trainer import REPORTERS, SCHEDULERS, TrainingConfig

    training = parser.add_argument_group("training")
    choices = {"lr_scheduler": SCHEDULERS, "device": DEVICES, "report_to": REPORTERS}
    add_fields(training, TrainingConfig, skip=skip, choices=choices)
    add_dtype_argument(training)


def add_device_argument(group: argparse._ActionsContainer) -> None:
    """`--device auto|cpu|cuda|mps`: where the model runs (as `TrainingConfig.device`)."""
    from loramix.smollm2 import DEVICES

    group.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="where the model runs: auto = CUDA if available, else MPS, else the CPU",
    )


def add_threads_argument(group: argparse._ActionsContainer) -> None:
    """`--threads N`: torch CPU threads (`apply_threads`); fewer than the cores leaves room
    for another job beside this one."""
    group.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's)"
    )


def apply_threads(args: argparse.Namespace) -> None:
    """Set torch's CPU threads to `--threads`, if given.

    Raises:
        ValueError: If it is below 1.
    """
    if args.threads is None:
        return
    if args.threads < 1:
        raise ValueError(f"--threads={args.threads}: use an int >= 1")
    import torch

    torch.set_num_threads(args.threads)


def add_progress_argument(group: argparse._ActionsContainer) -> None:
    """`--no-progress` (sets `progress` to False, as `TrainingConfig.progress` does): the
    `loramix` command then shows no progress bar at all."""
    group.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="hide every progress bar (weight loading too)",
    )


def run_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments both trainers take besides the settings objects."""
    return {"resume": args.resume, "overwrite": args.overwrite, "dtype": dtype_from_args(args)}


def add_dtype_argument(group: argparse._ActionsContainer) -> None:
    """`--dtype {float32,float16,bfloat16}` (default float32), the same on every command that
    loads a model: train-expert, train-gate, generate, eval, science demo."""
    group.add_argument("--dtype", choices=DTYPES, default="float32", help=DTYPE_HELP)


def dtype_from_args(args: argparse.Namespace) -> Any:
    """The torch dtype that `--dtype` names."""
    import torch

    return getattr(torch, args.dtype)


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    raise TypeError(f"{field.name} has no default; pass it in `skip` and set it yourself")


def _unwrap(kind: Any) -> tuple[Any, bool]:
    """`X | None` -> (X, True); anything else -> (kind, False)."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return kind, False
