"""blockrt.files: a file or directory appears whole or not at all, and a failure leaves no temporary behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from blockrt.files import atomic_path, current_umask, replace_dir, write_atomic


def test_write_atomic_replaces_with_the_usual_permissions(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text("old")
    write_atomic(path, lambda f: f.write(b"new"))
    assert path.read_text() == "new"
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~current_umask()
    assert os.listdir(tmp_path) == ["a.json"]


def test_atomic_path_failure_keeps_the_old_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "clip.mp4"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="encoder failed"):
        with atomic_path(path, suffix=".tmp.mp4") as tmp:
            Path(tmp).write_text("half")
            raise RuntimeError("encoder failed")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["clip.mp4"]


def test_replace_dir_swaps_in_the_new_directory_and_drops_the_old(tmp_path: Path) -> None:
    final, staged = tmp_path / "store", tmp_path / ".store.tmp"
    final.mkdir()
    (final / "old.txt").write_text("old")
    staged.mkdir()
    (staged / "new.txt").write_text("new")
    replace_dir(staged, final)
    assert os.listdir(final) == ["new.txt"]
    assert os.listdir(tmp_path) == ["store"]


def test_replace_dir_puts_the_old_directory_back_when_the_rename_fails(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    final, staged = tmp_path / "store", tmp_path / ".store.tmp"
    final.mkdir()
    (final / "old.txt").write_text("old")
    staged.mkdir()
    rename = os.rename

    def failing(src, dst) -> None:
        if Path(src) == staged:
            raise OSError("disk full")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(OSError, match="disk full"):
        replace_dir(staged, final)
    assert os.listdir(final) == ["old.txt"]
    assert sorted(os.listdir(tmp_path)) == [".store.tmp", "store"]
