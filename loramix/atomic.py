"""Atomic file writes: a temporary file in the same folder, then one rename over the target.

A reader sees the old file or the new one, never half of either, and an interrupted write
leaves the old file untouched.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Writes `text` (UTF-8, `\\n` line ends) to `path`, creating its folder if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def move_files_into(
    staging: Path, target: Path, *, marker: str, remove: Iterable[Path] = ()
) -> None:
    """Moves every file under `staging` to the same place under `target`, marker last.

    For saving into a folder that holds other files too: only the staged files (and the
    `remove` ones) change; every move is a rename on the same file system, so each file is the
    old one or the new one, never half of either. The marker (e.g. `xlora_config.json`) is
    removed first and moved last: whenever it exists, the files beside it come from one
    complete save. `staging` is deleted afterwards.

    Args:
        staging: A folder on the same file system as `target` (e.g. inside it).
        target: An existing folder.
        marker: Relative path of the file that says the content is complete.
        remove: Relative paths of old files to delete (stale files of an earlier save);
            folders they leave empty are removed too.
    """
    files = sorted(p.relative_to(staging) for p in staging.rglob("*") if p.is_file())
    if Path(marker) not in files:
        raise ValueError(f"{staging}: nothing staged as {marker}; nothing was moved into {target}")
    (target / marker).unlink(missing_ok=True)
    for relative in remove:
        path = target / relative
        path.unlink(missing_ok=True)
        for parent in path.parents:
            if parent == target or not parent.is_dir() or any(parent.iterdir()):
                break
            parent.rmdir()
    for relative in [f for f in files if f != Path(marker)] + [Path(marker)]:
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / relative, target / relative)
    shutil.rmtree(staging, ignore_errors=True)
