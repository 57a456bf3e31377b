"""glibc's allocator, tuned so the process RSS follows what is in use (opt-in: ``RunConfig.exact_rss``).

Both calls act on the whole process and are never undone, so the runtime makes them only when asked; the
benchmarks and ``make test`` get the same thresholds from process start through the environment
(``MALLOC_MMAP_THRESHOLD_=131072 MALLOC_TRIM_THRESHOLD_=131072``). Elsewhere (macOS, musl) nothing happens.
"""

from __future__ import annotations

import ctypes
import functools
import sys

__all__ = ["pin_malloc_mmap_threshold", "trim_malloc"]

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers
_M_MMAP_THRESHOLD = -3


@functools.lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    """glibc, looked up once (``find_library`` forks ``ldconfig``: milliseconds); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def pin_malloc_mmap_threshold(nbytes: int = 128 * 1024) -> bool:
    """Fix glibc's mmap and trim thresholds at ``nbytes`` (the documented default, 128 KiB); False without glibc.

    glibc raises them each time a large mmap'd chunk is freed (up to 32 MiB, and 64 MiB of heap top), after
    which freed activations stay in RSS, tens of MB no ledger sees; setting them explicitly turns that off.
    """
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(nbytes))) and bool(libc.mallopt(_M_TRIM_THRESHOLD, int(nbytes)))


def trim_malloc() -> bool:
    """``malloc_trim(0)``: give glibc's free heap memory back to the OS, so RSS shows what is in use (False
    without glibc)."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
