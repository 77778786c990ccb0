"""Saving an X-LoRA into a folder that may exist already, in any format; one path for all.

As transformers and peft do, a save into an existing folder replaces only the format's own
files and keeps every other file there (a user's notes, results, plots):

    new folder           written beside it, then renamed: it appears whole
    existing folder      the format's files are written beside it, then moved in one rename
                         each, the marker last (`MARKERS`: whenever it exists, the files
                         beside it come from one complete save); files of an earlier save of
                         the same format that this one does not write (experts no longer in
                         the config) are removed; nothing else is touched
    refused              a file; a folder that holds another kind of model (a transformers
                         model, a PEFT adapter) or an X-LoRA in another format: nothing is
                         written, and the message names what was found and the fix

Which files an earlier save wrote is each format module's `own_files`; the moves are
`loramix.atomic.save_into`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from loramix.atomic import save_into
from loramix.config import CONFIG_NAME
from loramix.experts import ADAPTER_CONFIG_NAME
from loramix.formats import mistralrs, native, peft, xlora

MARKERS = {
    "loramix": CONFIG_NAME,
    "peft": ADAPTER_CONFIG_NAME,
    "xlora": CONFIG_NAME,
    "mistralrs": CONFIG_NAME,
}
"""Per format: the file moved last, that says the save is complete."""
OWN_FILES: dict[str, Callable[[Path], list[Path]]] = {
    "loramix": native.own_files,
    "peft": peft.own_files,
    "xlora": xlora.own_files,
    "mistralrs": mistralrs.own_files,
}
"""Per format: the files of an earlier save in a folder (relative paths)."""
FOREIGN_MARKERS = {
    "config.json": "a transformers model (config.json)",
    ADAPTER_CONFIG_NAME: f"a PEFT adapter ({ADAPTER_CONFIG_NAME})",
}
"""Files that say a folder holds another kind of model (a PEFT X-LoRA's adapter_config.json
is its own format's, see `formats_found`)."""


def save(target: Path, format: str, write: Callable[[Path], None], caller: str) -> set[Path]:
    """Checks `target` (`check_target`), then saves with `write(staging)` (module docstring).

    Returns:
        The relative paths of the files written.
    """
    check_target(target, format, caller)
    return save_into(target, write, marker=MARKERS[format], own_files=OWN_FILES[format])


def check_target(target: Path, format: str, caller: str) -> None:
    """Refuse a file, or a folder that holds another kind of model or another format's X-LoRA.

    Raises:
        ValueError: Naming `caller` (unless empty), the folder, what it holds and the fix;
            nothing is written.
    """
    if not target.exists():
        return
    prefix = f"{caller}: " if caller else ""
    if not target.is_dir():
        raise ValueError(f"{prefix}{target} is a file; pass a folder path.")
    found = formats_found(target)
    others = {kind: what for kind, what in found.items() if kind != format}
    if not others:
        return
    fixes = ["save to another folder"] + [
        f"save with format={kind!r} (convert: --to {kind}) to replace that X-LoRA"
        for kind in others
        if kind in MARKERS
    ]
    raise ValueError(
        f"{prefix}{target} holds {' and '.join(others.values())}; an X-LoRA saved beside it "
        f"in the {format} format would make a folder that no loader reads as either. Nothing "
        f"was written: {', or '.join(fixes)}."
    )


def formats_found(folder: Path) -> dict[str, str]:
    """What the folder holds, by kind (a format of `MARKERS`, or another kind of model): each
    with the file that says so."""
    found = {}
    is_peft = peft.is_peft_folder(folder)
    for name, what in FOREIGN_MARKERS.items():
        if (folder / name).exists() and not (name == ADAPTER_CONFIG_NAME and is_peft):
            found[name] = what
    if is_peft:
        found["peft"] = f"an X-LoRA in peft's format ({ADAPTER_CONFIG_NAME}, peft_type XLORA)"
    for name in (native.GATE_WEIGHTS_NAME, native.GATE_BIN_NAME):
        if (folder / name).exists():
            found["loramix"] = f"an X-LoRA in loramix's format ({name})"
    if (folder / mistralrs.ORDERING_NAME).exists():
        found["mistralrs"] = f"an X-LoRA in mistral.rs's format ({mistralrs.ORDERING_NAME})"
    else:
        for name in (xlora.CLASSIFIER_NAME, xlora.CLASSIFIER_PT_NAME):
            if (folder / name).exists():
                found["xlora"] = f"an X-LoRA in the xlora package's format ({name})"
    return found
