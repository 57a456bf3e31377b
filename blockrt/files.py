"""Files that appear whole or not at all: atomic writes, fsync, directories renamed into place.

One idiom everywhere blockrt, its pipelines and its benchmarks write something a reader may open at the same
time (a trace, a PNG, results, a video, a store, an export): write under a temporary name in the target's own
directory, give it the usual permissions, fsync, then rename. A reader sees the old file or the whole new
one; a failed write leaves no temporary behind.

- :func:`write_atomic` writes a file through a callback; :func:`atomic_path` lends a temporary path to a
  writer that needs a name (another process such as ffmpeg).
- :func:`replace_dir` renames a staged directory into place, moving an old one aside first.
- :func:`fsync_dir` and :func:`fsync_tree` make renames and staged trees durable.
- :func:`current_umask` gives the permissions ``mkstemp``/``mkdtemp`` (0600/0700) leave out.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

__all__ = ["atomic_path", "current_umask", "fsync_dir", "fsync_tree", "replace_dir", "write_atomic"]


def current_umask() -> int:
    """The process umask, read without changing it (Linux); else the usual 022."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _fsync_path(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so a rename inside it is durable."""
    _fsync_path(path)


def fsync_tree(root: str | os.PathLike[str]) -> None:
    """fsync every file and directory under ``root`` (bottom-up), so a rename publishes whole files."""
    for dirpath, _, files in os.walk(root, topdown=False):
        for name in files:
            _fsync_path(os.path.join(dirpath, name))
        fsync_dir(dirpath)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = ".tmp") -> Iterator[str]:
    """A temporary file name beside ``path`` for the caller to write; on a clean exit it becomes ``path``.

    The temporary file exists (empty) when the block starts. On leaving the block it gets the usual
    permissions (``mkstemp`` makes 0600), is fsynced and renamed over ``path``; on any error it is removed
    and the error propagates.

    Example:
        >>> with atomic_path("out/video.mp4", suffix=".tmp.mp4") as tmp:
        ...     subprocess.run(["ffmpeg", ..., tmp], check=True)
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=suffix, dir=directory)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give the usual permissions
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_atomic(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> None:
    """Write a file through ``write(fileobj)`` into a temporary name in the same directory, then rename.

    The file is fsynced before ``os.replace``, so ``path`` is either the old file or the whole new one; on any
    error the temporary file is removed and the error propagates.

    Example:
        >>> write_atomic("results.json", lambda f: f.write(json.dumps(rows).encode()))
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


def replace_dir(staged: str | os.PathLike[str], final: str | os.PathLike[str]) -> None:
    """Rename the directory ``staged`` to ``final`` (same parent directory), replacing an existing ``final``.

    An existing ``final`` is first renamed aside to a temporary sibling ``.<name>.old-*``, and deleted once
    the new one is in place: if the process dies between the two renames the old directory is still whole
    there. When the second rename fails the old one is put back and the error propagates. The parent is
    fsynced after the rename. Whether ``final`` may be replaced at all is the caller's decision.
    """
    staged, final = Path(staged), Path(final)
    old: Path | None = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.rename(final, old / final.name)
    try:
        os.rename(staged, final)
    except BaseException:
        if old is not None:
            os.rename(old / final.name, final)  # put the previous directory back
            shutil.rmtree(old, ignore_errors=True)
        raise
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
