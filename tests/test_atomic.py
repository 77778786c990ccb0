"""loramix.atomic: a write either replaces the target completely or leaves it as it was."""

from __future__ import annotations

from pathlib import Path

import pytest

from loramix.atomic import atomic_file, atomic_folder, write_text_atomic


def test_text_is_replaced_and_nothing_is_left_beside_it(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "a.txt"
    write_text_atomic(path, "one\n")
    write_text_atomic(path, "two\n")
    assert path.read_text() == "two\n"
    assert [p.name for p in path.parent.iterdir()] == ["a.txt"]


def test_a_failed_file_write_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "a.npz"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_file(path, ".npz") as tmp:
        assert tmp.suffix == ".npz" and tmp.parent == tmp_path
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.npz"]


def test_a_folder_is_replaced_whole(tmp_path: Path) -> None:
    target = tmp_path / "model"
    with atomic_folder(target) as staging:
        (staging / "a").write_text("1")
        (staging / "b").write_text("1")
    with atomic_folder(target) as staging:
        (staging / "a").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["a"]  # b went with the old folder
    assert (target / "a").read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_failed_folder_write_keeps_the_old_folder(tmp_path: Path) -> None:
    target = tmp_path / "model"
    with atomic_folder(target) as staging:
        (staging / "a").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_folder(target) as staging:
        (staging / "a").write_text("new")
        raise KeyboardInterrupt
    assert (target / "a").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_without_replace_an_existing_folder_is_kept(tmp_path: Path) -> None:
    target = tmp_path / "cache"
    with atomic_folder(target) as staging:
        (staging / "a").write_text("first")
    with pytest.raises(OSError), atomic_folder(target, replace=False) as staging:
        (staging / "a").write_text("second")
    assert (target / "a").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]
