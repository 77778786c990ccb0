"""Atomic writes of files and folders: everything is written beside the target, then renamed.

A reader sees the old file (or folder) or the new one, never half of either, and an
interrupted write leaves the old one untouched. Every write of a result in loramix goes
through this module:

    write_text_atomic(path, text)       a text file
    with atomic_file(path) as tmp:      any file a library writes to a path (PNG, .npz)
    with atomic_folder(path) as tmp:    a whole folder (a saved model, the bundle, a cache)
    save_into(folder, write, ...)       a saved model: a new folder appears whole; into an
                                        existing one only the model's own files move, the
                                        stale ones of an earlier save go, the rest stays
    move_files_into(tmp, folder, ...)   files into a folder that holds other files too
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_file(path: str | os.PathLike[str], suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside `path`; renamed over `path` when the block ends without error.

    Args:
        path: The file to write; its folder is created if needed.
        suffix: The temporary file's suffix (some writers insist on one, e.g. `.npz`).

    Yields:
        The temporary path to write; it is removed if the block raises.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Writes `text` (UTF-8, `\\n` line ends) to `path`, creating its folder if needed."""
    path = Path(path)
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as handle:
        handle.write(text)
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


def save_into(
    target: Path,
    write: Callable[[Path], None],
    *,
    marker: str,
    own_files: Callable[[Path], Iterable[Path]],
) -> set[Path]:
    """Writes a model's folder with `write(staging)` into a staging folder beside `target`.

    A new `target` is the staging folder renamed. Into an existing folder (the caller has
    checked that it holds nothing of another kind) the staged files are moved one rename each,
    `marker` last (`move_files_into`); the files `own_files(target)` lists that this save does
    not write (stale files of an earlier save) are removed, and every other file stays.

    Args:
        target: The folder to write.
        write: Writes the files into the empty folder it is given.
        marker: Relative path of the file that says the save is complete.
        own_files: The relative paths of the files an earlier save left in a folder.

    Returns:
        The relative paths of the files written.

    Raises:
        ValueError: If a file of `target` stands where a folder is written or a folder where a
            file is (naming it); nothing in `target` has changed then.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    existing = target.exists()
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp"))
    try:
        write(staging)
        written = {p.relative_to(staging) for p in staging.rglob("*") if p.is_file()}
        if existing:
            _check_nothing_in_the_way(target, written)
            stale = [p for p in own_files(target) if p not in written]
            move_files_into(staging, target, marker=marker, remove=stale)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return written


def _check_nothing_in_the_way(target: Path, written: set[Path]) -> None:
    for relative in sorted(written):
        for path in [target / parent for parent in reversed(relative.parents[:-1])]:
            if path.exists() and not path.is_dir():
                raise ValueError(
                    f"{path} is in the way (a file where the save writes a folder); move it "
                    "away. Nothing was written."
                )
        if (target / relative).is_dir():
            raise ValueError(
                f"{target / relative} is in the way (a folder where the save writes a file); "
                "move it away. Nothing was written."
            )


@contextmanager
def atomic_folder(path: str | os.PathLike[str], *, replace: bool = True) -> Iterator[Path]:
    """A fresh staging folder beside `path`; it becomes `path` when the block ends.

    Args:
        path: The folder to write; its parent is created if needed.
        replace: Replace an existing `path` (the old folder is renamed aside, then deleted);
            False lets the final rename fail with `OSError` if `path` exists and is not empty.

    Yields:
        The staging folder; it is deleted if the block (or the rename) raises.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp"))
    try:
        yield staging
        if replace:
            replace_folder(staging, target)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def replace_folder(staging: Path, target: Path) -> None:
    """Moves `staging` to `target`; an existing `target` is renamed aside and deleted after."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        os.replace(target, old / target.name)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
