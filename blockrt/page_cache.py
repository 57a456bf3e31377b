"""Cold reads: evict files from the OS page cache (``drop_page_cache``, ``posix_fadvise(POSIX_FADV_DONTNEED)``,
no root, unlike ``/proc/sys/vm/drop_caches``) and tell how much of a file is cached (``cached_fraction``,
``mincore``)."""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import sys
from collections.abc import Iterable
from pathlib import Path

__all__ = ["cached_fraction", "drop_page_cache"]

logger = logging.getLogger(__name__)


def _files(paths: Iterable[str | os.PathLike[str]] | str | os.PathLike[str]) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file())
        elif p.is_file():
            out.append(p)
        elif p.exists():
            raise ValueError(f"drop_page_cache: {str(p)!r} is neither a regular file nor a directory")
        else:
            raise FileNotFoundError(f"drop_page_cache: no such file or directory: {str(p)!r}")
    return out


def drop_page_cache(paths: Iterable[str | os.PathLike[str]] | str | os.PathLike[str]) -> int:
    """Evict files from the OS page cache, so the next read comes from the disk. Returns the bytes covered.

    Each file (a directory: every file under it) is ``fdatasync``-ed (dirty pages cannot be dropped), then
    advised ``POSIX_FADV_DONTNEED``. Pages some process has mapped (a live mmap tensor) stay cached.

    Raises:
        FileNotFoundError: naming the first missing path (before anything is dropped).
        NotImplementedError: where the OS has no ``posix_fadvise`` (macOS: ``sudo purge`` drops all caches).

    Example:
        >>> drop_page_cache(["store/block_000.safetensors"])
        134217728
    """
    files = _files(paths)
    if not hasattr(os, "posix_fadvise"):
        raise NotImplementedError(f"drop_page_cache needs os.posix_fadvise, which {sys.platform} lacks; "
                                  f"on macOS 'sudo purge' drops the whole page cache")
    total = 0
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            try:
                os.fdatasync(fd)
            except OSError as e:  # e.g. EINVAL on a file system without sync support: nothing dirty to write
                logger.debug("fdatasync(%s) failed: %s", path, e)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            total += os.fstat(fd).st_size
        finally:
            os.close(fd)
    return total


def cached_fraction(path: str | os.PathLike[str]) -> float:
    """The fraction (0..1) of a file's pages that are in the page cache, read without touching the file.

    Uses ``mincore`` on a fresh mapping (Linux, macOS); Linux claims every page resident for files the caller
    neither owns nor may write, so those raise.

    Raises:
        FileNotFoundError: for a missing file.
        PermissionError: for a file this process neither owns nor may write (the answer would be wrong).
        NotImplementedError: where there is no ``mincore`` (Windows).
    """
    path = Path(path)
    st = path.stat()
    if sys.platform.startswith("linux") and not (st.st_uid == os.geteuid() or os.geteuid() == 0
                                                  or os.access(path, os.W_OK)):
        raise PermissionError(f"cached_fraction({str(path)!r}): Linux's mincore reports page cache residency "
                              f"only for files the caller owns or may write")
    if st.st_size == 0:
        return 1.0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        mincore = libc.mincore
    except (OSError, AttributeError):
        raise NotImplementedError(f"cached_fraction needs mincore, which {sys.platform} lacks") from None
    mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    mincore.restype = ctypes.c_int
    npages = (st.st_size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = (ctypes.c_ubyte * npages)()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as mm:
        # ACCESS_COPY (MAP_PRIVATE) makes the mapping's buffer exportable to ctypes; nothing is read or
        # written, so no page is faulted in or copied.
        anchor = ctypes.c_char.from_buffer(mm)
        try:
            if mincore(ctypes.addressof(anchor), st.st_size, vec) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"mincore on {str(path)!r}: {os.strerror(err)}")
        finally:
            del anchor  # release the buffer export so the mapping can close
    data = bytes(vec)
    resident = len(data) - len(data.translate(None, bytes(range(1, 256, 2))))  # bit 0 = in core
    return resident / npages
