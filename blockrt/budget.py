"""Memory budgets: parsing ``"3.3GB"``-style strings into bytes, the smallest budget a run can work in
(``Floor``: the one formula the runtime and the predictions share), and formatting bytes for people."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from fractions import Fraction

from .errors import BudgetError

_UNITS: dict[str, int] = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
                          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)(?:[eE]([+-]?\d+))?\s*([a-zA-Z]+)?\s*$")

ACCEPTED = (
    "a positive int of bytes, or a string: a number and a unit "
    "(B, KB, MB, GB, TB = powers of 1000; KiB, MiB, GiB, TiB = powers of 1024), "
    "case-insensitive, with or without a space, e.g. '3.3GB', '3 GiB', '512MB', '700MiB'"
)


MAX_BUDGET = int(sys.float_info.max)  # bytes: budgets are also scaled as floats, so they must stay finite


def parse_budget(budget: int | str) -> int:
    """Return a budget in bytes.

    Args:
        budget: an int (bytes) or a string such as ``"3.3GB"`` (3.3e9 bytes) or ``"3GiB"`` (3 * 2**30).

    Raises:
        ValueError: for anything else (zero, negative, NaN, unknown units), listing the accepted forms.

    Example:
        >>> parse_budget("512MB")
        512000000
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, str)):
        raise ValueError(f"budget must be {ACCEPTED}; got {budget!r} of type {type(budget).__name__}")
    if isinstance(budget, int):
        if budget <= 0:
            raise ValueError(f"budget must be {ACCEPTED}; got {budget} bytes, which is not positive")
        if budget > MAX_BUDGET:  # sizes are also floats (fractions of the budget): keep them finite
            raise ValueError(f"budget must be {ACCEPTED}; got {str(budget)[:60]}... ({len(str(budget))} digits), "
                             "more bytes than any memory")
        return budget
    m = _PATTERN.match(budget)
    unit = (m.group(3) or "").lower() if m else ""
    if m is None or unit not in _UNITS:
        raise ValueError(f"budget must be {ACCEPTED}; got {budget!r}")
    mantissa, exponent = m.group(1), m.group(2) or "0"
    # Exact arithmetic: a float rounds "9007199254740993B" and overflows on "1e400GB". Beyond a float's range
    # (as the length limits make sure before any power is taken) no budget is plausible.
    if len(mantissa) > 400 or len(exponent.lstrip("+-")) > 3:
        raise ValueError(f"budget must be {ACCEPTED}; got {budget!r}, which is out of range")
    nbytes = Fraction(mantissa) * Fraction(10) ** int(exponent) * _UNITS[unit]
    if nbytes < 1 or nbytes > MAX_BUDGET:
        what = "less than one byte" if nbytes < 1 else "more bytes than any memory"
        raise ValueError(f"budget must be {ACCEPTED}; got {budget!r}, which is {what}")
    return round(nbytes)


def format_bytes(n: float) -> str:
    """Bytes (or bytes/s) in decimal units, the one byte formatter of blockrt: ``1_500_000`` -> ``"1.50 MB"``;
    below 1 kB whole bytes (``999.6`` -> ``"1000 B"``)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


@dataclass(frozen=True)
class Floor:
    """What a run holds before it retains anything, ``pinned + slots x the largest block + the loader's
    staging + the working set``: the smallest budget, for ``Runtime.minimum_budget``, ``blockrt.run`` and
    ``blockrt.predict`` alike. Before a pass has measured the working set (0) it is a lower bound."""

    pinned_bytes: int
    slot_bytes: int  # the largest block's slot bytes
    slots: int  # min(prefetch_depth + 1, number of blocks)
    staging_bytes: int = 0  # the loader's buffers for blocks stored narrower than computed
    working_set_bytes: int = 0  # measured activations (0 before the first pass)
    largest_block: str = ""
    prefetch_depth: int = 1

    @property
    def nbytes(self) -> int:
        return self.pinned_bytes + self.slots * self.slot_bytes + self.staging_bytes + self.working_set_bytes

    def check(self, budget: int) -> None:
        """Raise ``BudgetError`` naming each part and the fix when ``budget`` is below ``nbytes``."""
        need = self.nbytes
        if need <= budget:
            return
        ws = (f" and {format_bytes(self.working_set_bytes)} of measured working set" if self.working_set_bytes
              else ", before any activations (the first pass measures them; a run needs them on top)")
        raise BudgetError(
            f"budget {format_bytes(budget)} is below the smallest feasible {format_bytes(need)} ({need} bytes): "
            f"block {self.largest_block!r} needs {format_bytes(self.slot_bytes)} in each of {self.slots} slot(s) "
            f"(prefetch_depth={self.prefetch_depth}) plus {format_bytes(self.pinned_bytes)} pinned and "
            f"{format_bytes(self.staging_bytes)} of loader staging (storage dtypes narrower than computed){ws}; "
            f"fix: raise the budget to at least {need} bytes, lower prefetch_depth, or split the model into "
            "smaller blocks")
