"""Files that appear whole or not at all: atomic writes, fsync, directories renamed into place.

Everywhere blockrt, its pipelines and benchmarks write something a reader may open meanwhile (a trace, a
PNG, results, a video, a store, an export): write under a temporary name in the target's directory, give it
the usual permissions, fsync, rename. A reader sees the old file or the whole new one; a failed write
leaves no temporary behind.
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
    """A temporary file name beside ``path`` (the file exists, empty) for a writer that needs a name, such as
    ffmpeg; on a clean exit it is fsynced and renamed over ``path``, on an error removed.

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
    """Write ``path`` atomically through ``write(fileobj)`` (see ``atomic_path``).

    Example:
        >>> write_atomic("results.json", lambda f: f.write(json.dumps(rows).encode()))
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


def replace_dir(staged: str | os.PathLike[str], final: str | os.PathLike[str]) -> None:
    """Rename the directory ``staged`` to ``final`` (same parent), replacing an existing ``final``: that one is
    first renamed aside (``.<name>.old-*``, whole if the process dies between the renames), put back if the
    second rename fails, and deleted once the new one is in place. The parent is fsynced."""
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
