"""File-safety guards for what blockrt reads and writes on disk.

- ``open_regular``: open a file for reading only when it is a regular file. A FIFO or a device named like a
  weight file would block the ``open`` (or the reads) forever; the open never blocks (``O_NONBLOCK``) and the
  ``fstat`` after it refuses anything else.
- ``read_json``: a manifest or an index read through ``open_regular``, refused with a ``StoreError`` when it is
  too large, not UTF-8, not JSON, nested too deep for the parser or repeats a key.
- ``inside``: a file name taken from a manifest or an index, checked to stay inside its root: no absolute path,
  no ``..``, and once resolved no symbolic link out of the root.
- ``WriteLock``: an advisory ``flock`` on ``.<name>.lock`` beside a store path, held while the store is written,
  so two processes writing one store coordinate; whoever holds it removes ``.<name>.tmp-*`` directories that a
  killed writer left. The lock file is removed by its holder.
- ``check_space`` / ``disk_full``: a full disk (``errors.DiskFullError``) named with the path, the bytes needed
  and the bytes free.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import stat
from pathlib import Path
from typing import Any, BinaryIO

from .errors import DiskFullError, StoreError

try:
    import fcntl
except ImportError:  # not POSIX: no locking (blockrt's readers need preadv anyway)
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)
MAX_JSON_BYTES = 100_000_000  # the safetensors header limit; no manifest or index comes near it


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"), (stat.S_ISDIR, "directory")):
        if test(mode):
            return name
    return "file that is not a regular file"


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """Open ``path`` for unbuffered binary reading if it is a regular file (symbolic links are followed).

    Raises ``StoreError`` for a FIFO, a device, a socket or a directory, without ever blocking on it; the
    usual ``OSError``s (``FileNotFoundError``, ...) propagate.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise StoreError(f"{os.fspath(path)}: expected a regular file, found a {_kind(mode)}; blockrt reads weights "
                             "and manifests only from regular files; fix: point at the file itself (copy it out of "
                             "the pipe or device)")
        return open(fd, "rb", buffering=0, closefd=True)
    except BaseException:
        os.close(fd)
        raise


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"the key {dup!r} appears twice in one object")
    return out


def parse_json(raw: bytes, where: str, fix: str) -> Any:
    """``raw`` as JSON; ``StoreError`` naming ``where`` and ``fix`` for anything that is not plain JSON."""
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise StoreError(f"{where}: expected JSON, found values nested too deep to parse; {fix}") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise StoreError(f"{where} is not valid JSON ({type(e).__name__}: {e}); {fix}") from None


def read_json(path: str | os.PathLike, fix: str, limit: int = MAX_JSON_BYTES) -> Any:
    """Read a small JSON file (a manifest, an index) safely; see ``parse_json``."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise StoreError(f"{os.fspath(path)}: expected a JSON file of at most {limit} bytes, found {size} bytes; {fix}")
        raw = read_upto(f, limit + 1)
    if len(raw) > limit:
        raise StoreError(f"{os.fspath(path)}: expected a JSON file of at most {limit} bytes, found more (it grew "
                         f"while read); {fix}")
    return parse_json(raw, os.fspath(path), fix)


def read_upto(f: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes from ``f``, fewer only at the end of the file (a raw read may return less)."""
    parts, got = [], 0
    while got < n:
        chunk = f.read(n - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def inside(root: Path, name: object, what: str, fix: str, also: tuple[Path, ...] = ()) -> Path:
    """``root / name`` for a relative ``name`` that stays inside ``root``, else ``StoreError``.

    ``name`` must be a relative path without ``..``; resolved (symbolic links followed) it must lie inside
    ``root`` resolved, or inside one of ``also`` (resolved directories that are allowed too).
    """
    if not isinstance(name, str) or not name or "\0" in name:
        raise StoreError(f"{what}: expected a relative file name, found {name!r}; {fix}")
    rel = Path(name)
    if rel.is_absolute() or rel.anchor or ".." in rel.parts:
        raise StoreError(f"{what} names {name!r}: expected a file inside {root}, found "
                         f"{'an absolute path' if rel.anchor else 'a path that climbs out with ..'}; {fix}")
    path = root / rel
    try:
        real = path.resolve()
        roots = [root.resolve(), *(r.resolve() for r in also)]
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise StoreError(f"{what} names {name!r}, which cannot be resolved ({e}); {fix}") from None
    if not any(real == r or real.is_relative_to(r) for r in roots):
        raise StoreError(f"{what} names {name!r}, a symbolic link to {real}, outside {root}; blockrt reads only "
                         f"files inside the directory it was given; {fix}")
    return path


class WriteLock:
    """An exclusive advisory lock on ``<parent>/.<name>.lock`` while a store named ``name`` is written.

    Example:
        >>> with WriteLock(root) as lock:      # waits while another process writes the same store
        ...     lock.remove_stale()             # directories a killed writer left
        ...     if not root.exists():
        ...         write(root)
    """

    def __init__(self, root: Path, wait: bool = True) -> None:
        self.root = root
        self.path = root.parent / f".{root.name}.lock"
        self.wait = wait
        self.fd: int | None = None

    def __enter__(self) -> "WriteLock":
        if fcntl is None:
            return self
        told = False
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0), 0o666)
            except OSError:  # a read-only parent: nothing can be written there, and the write says so
                return self
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise StoreError(f"{self.path}: expected blockrt's lock file, found a {_kind(os.fstat(fd).st_mode)}; "
                                     "fix: remove it")
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    if not self.wait:
                        os.close(fd)
                        return self
                    if not told:
                        log.info("waiting for another process that is writing %s", self.root)
                        told = True
                    fcntl.flock(fd, fcntl.LOCK_EX)
                try:  # the holder before us may have removed the file: then lock the new one
                    same = os.path.samestat(os.fstat(fd), os.stat(self.path))
                except FileNotFoundError:
                    same = False
                if same:
                    self.fd = fd
                    return self
                os.close(fd)
            except BaseException:
                os.close(fd)
                raise

    @property
    def held(self) -> bool:
        return self.fd is not None or fcntl is None

    def remove_stale(self) -> list[str]:
        """Remove ``.<name>.tmp-*`` directories beside the store (only while the lock is held: no live writer
        owns them). Returns their names."""
        if self.fd is None:
            return []
        gone = []
        for p in self.root.parent.glob(f".{self.root.name}.tmp-*"):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
                gone.append(p.name)
        if gone:
            log.info("removed %d unfinished store director%s a stopped writer left: %s", len(gone),
                     "y" if len(gone) == 1 else "ies", gone)
        return gone

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.path)  # while still locked: a waiter notices and locks a fresh file
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None


def remove_stale(root: Path) -> None:
    """Remove what a killed writer of ``root`` left, unless a writer is at work now (then it is left alone)."""
    with WriteLock(root, wait=False) as lock:
        lock.remove_stale()


def free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def disk_full(path: Path, needed: int, written: int | None = None) -> DiskFullError:
    """The error for a store of ``needed`` bytes that does not fit at ``path``."""
    free = free_bytes(path.parent)
    done = "" if written is None else f", {written} were written when the disk filled"
    return DiskFullError(errno.ENOSPC, f"No space left on device for the store {path}: it needs {needed} bytes"
                         f"{done}, {'an unknown number of' if free is None else free} bytes are free there; fix: free "
                         "space on that disk, or pass another store path (store=, RunConfig(store_path=...))")


def check_space(path: Path, needed: int) -> None:
    """Raise ``DiskFullError`` now, before writing anything, when the disk of ``path`` has less than ``needed``."""
    free = free_bytes(path.parent)
    if free is not None and free < needed:
        raise disk_full(path, needed)


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
