"""The ledger: the single source of truth for the memory a runtime holds, by kind, against the budget.

Every allocation the runtime makes is reserved here first; a reservation that would pass the budget
raises ``BudgetError`` instead of allocating. The running total is reported to the profile as the
``ledger_bytes`` counter, and its peak is ``peak_ledger_bytes``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from .budget import format_bytes
from .errors import BudgetError

KINDS = ("pinned", "slots", "retained", "in_flight", "working_set", "rows", "state", "mapped")  # rows:
# embedding_rows.py; state: tensors that outlive a pass, such as a KV cache (state.py); mapped: the window of
# blocks bound to their files' pages (mapping.py), clean and file-backed where every other kind is anonymous
FILE_BACKED = ("mapped",)


class Ledger:
    """Bytes held by kind; thread-safe.

    Args:
        budget: bytes the total may never exceed.
        on_change: called with the new total after each change (the profile's counter).
    """

    def __init__(self, budget: int, on_change: Callable[[int], None] | None = None) -> None:
        self.budget = budget
        self._held = dict.fromkeys(KINDS, 0)
        self._peak = 0
        self._lock = threading.Lock()
        self._on_change = on_change

    def reserve(self, kind: str, nbytes: int, what: str) -> None:
        """Add ``nbytes`` of ``kind``; raise BudgetError (holding nothing more) if the budget would pass."""
        if kind not in self._held:
            raise ValueError(f"unknown ledger kind {kind!r}; expected one of {KINDS}")
        with self._lock:
            total = sum(self._held.values()) + nbytes
            if total > self.budget:
                raise BudgetError(
                    f"{what} needs {format_bytes(nbytes)} but only {format_bytes(self.budget - total + nbytes)} "
                    f"of the {format_bytes(self.budget)} budget is free ({self.describe_locked()})"
                )
            self._held[kind] += nbytes
            self._peak = max(self._peak, total)
        if self._on_change:
            self._on_change(total)

    def release(self, kind: str, nbytes: int) -> None:
        with self._lock:
            if nbytes > self._held[kind]:
                raise RuntimeError(f"ledger: releasing {nbytes} bytes of {kind} but only {self._held[kind]} held")
            self._held[kind] -= nbytes
            total = sum(self._held.values())
        if self._on_change:
            self._on_change(total)

    def move(self, src: str, dst: str, nbytes: int) -> None:
        """Re-label ``nbytes`` held as ``src`` as ``dst`` (e.g. a slot while a load fills it); total unchanged."""
        with self._lock:
            if nbytes > self._held[src]:
                raise RuntimeError(f"ledger: moving {nbytes} bytes from {src} but only {self._held[src]} held")
            self._held[src] -= nbytes
            self._held[dst] += nbytes

    def correct(self, truth: dict[str, int]) -> None:
        """Set the named kinds to the bytes their owner counted (after an interrupt cut a change in half: a Ctrl-C
        can land between any two lines, inside this class too); the peak keeps any total this reaches."""
        with self._lock:
            self._held.update(truth)
            total = sum(self._held.values())
            self._peak = max(self._peak, total)
        if self._on_change:
            self._on_change(total)

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self._held.values())

    @property
    def peak(self) -> int:
        return self._peak

    def held(self) -> dict[str, int]:
        with self._lock:
            return dict(self._held)

    def describe_locked(self) -> str:
        return ", ".join(f"{k} {format_bytes(v)}" for k, v in self._held.items() if v)
