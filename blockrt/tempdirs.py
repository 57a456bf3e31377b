"""Temporary stores (an in-memory model spilled without ``store=``): never left behind.

- A temporary store is ``<tmp>/blockrt-<pid>-<random>``; ``remove`` deletes it (``Runtime.close``, garbage
  collection, interpreter exit: the runtime's ``weakref.finalize``).
- SIGTERM ends a Python process without running any of that. While a temporary store exists and SIGTERM
  still has its default action, SIGTERM raises ``SystemExit`` in the main thread instead, so the cleanup
  runs and the process still exits (status 128 + 15). The default action is restored when the last
  temporary store is removed; a handler the application installed is never replaced.
- SIGKILL (or a power cut) cannot be caught: the next temporary store created by any process removes the
  ones whose process is gone.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import tempfile
import threading

log = logging.getLogger(__name__)

PREFIX = "blockrt-"
_NAME = re.compile(rf"^{PREFIX}(\d+)-")
_lock = threading.Lock()
_live: set[str] = set()
_installed = False


def create() -> str:
    """A new temporary directory for a store (after removing those of processes that no longer run)."""
    remove_orphans()
    path = tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-")
    with _lock:
        _live.add(path)
        _install_term_handler()
    return path


def remove(path: str) -> None:
    """Delete a temporary store made by ``create``; idempotent."""
    shutil.rmtree(path, ignore_errors=True)
    with _lock:
        _live.discard(path)
        if not _live:
            _restore_term_handler()


def remove_orphans(root: str | None = None) -> list[str]:
    """Delete temporary stores whose process has exited (a SIGKILL left them); returns what was removed."""
    root = root or tempfile.gettempdir()
    removed = []
    try:
        names = os.listdir(root)
    except OSError:
        return removed
    for name in names:
        m = _NAME.match(name)
        if m is None or _alive(int(m.group(1))):
            continue
        path = os.path.join(root, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            log.info("removed %s, a temporary store left by process %s", path, m.group(1))
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _on_term(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds the main thread: finally blocks, finalizers and atexit run


def _install_term_handler() -> None:
    global _installed
    if _installed or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_term)
        _installed = True


def _restore_term_handler() -> None:
    global _installed
    if not _installed or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is _on_term:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _installed = False
