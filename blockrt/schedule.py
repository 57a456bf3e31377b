"""The runtime's schedule, simulated: per-pass wall time of a streamed model from its block timings, the
paper's closed forms (Eq. 10, Eq. 11), and the retention decision made on the simulation.

Data: one ``BlockTiming`` per block, in execution order: its slot bytes, one load at the run's read
bandwidth (``nbytes / read_bytes_per_s``), its compute, and the pinned compute after it (``gap_s``); plus
``head_s``, pinned compute at the start of each pass. All times in seconds, per pass.

The schedule (``blockrt.runtime``; a pass is one model call, blocks 0..n-1 every pass, cyclically):

- one loader thread serves load requests FIFO, one at a time; a request takes one of ``d + 1`` slots
  (``d = prefetch_depth``) from the moment it is made until its block is released;
- before pass 0 the first ``d`` streamed blocks are requested; each pass runs ``head_s``, then per block
  ``i``: enter (wait for its load; with ``d = 0``, request it now), request the next ``d`` streamed blocks
  after ``i`` (cyclically: after the last comes block 0 of the next pass) not yet requested, while slots are
  free; compute ``compute_s``; release (its slot is free; the same window is requested again); ``gap_s``;
- retained blocks sit in their own buffers, loaded once before the first pass (not counted): no slot, no
  wait, and the prefetch window skips them, so the loader fetches the next streamed block meanwhile.

Assumptions: loads and compute do not contend (on a few CPU cores they do a little: the runtime's tests
compare prediction with measurement); load and compute times are the same every pass; nothing else reads.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from .budget import format_bytes

_REL_TOL = 1e-9  # pass times this close are ties (sums in different orders differ in the last bits)


@dataclass(frozen=True)
class BlockTiming:
    """One block: slot bytes, one load at the run's read bandwidth, compute, and pinned compute after it."""

    name: str
    nbytes: int
    load_s: float
    compute_s: float
    gap_s: float = 0.0  # pinned compute after this block (after the last block: until the pass ends)

    def __post_init__(self) -> None:
        for what in ("nbytes", "load_s", "compute_s", "gap_s"):
            v = getattr(self, what)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"block {self.name!r}: {what} must be a finite number >= 0; got {v!r}")

    @property
    def load_per_compute(self) -> float:
        """How hard the block's load is to hide: ``load_s / compute_s`` (inf without compute)."""
        return self.load_s / self.compute_s if self.compute_s > 0 else (math.inf if self.load_s > 0 else 0.0)


@dataclass(frozen=True)
class SimResult:
    """Per-pass times of a simulated run (the measures of the design's §4, per pass)."""

    wall_s: tuple[float, ...]  # (passes,)
    stall_s: tuple[float, ...]  # (passes,) compute waiting for loads
    load_s: float  # per pass: loads of the streamed blocks
    compute_s: float  # per pass: block compute (not head_s / gap_s, as the profile counts it)
    bytes_loaded: int  # per pass

    @property
    def steady_s(self) -> float:
        """The last pass's wall time: the steady state after a few passes."""
        return self.wall_s[-1]

    @property
    def roofline_ratio(self) -> float:
        """Steady ``wall_s / max(load_s, compute_s)``: 1.0 is perfect overlap."""
        slowest = max(self.load_s, self.compute_s)
        return self.steady_s / slowest if slowest > 0 else math.nan


def check_timings(timings: Sequence[BlockTiming], prefetch_depth: int, retained: Collection[int] = (),
           head_s: float = 0.0) -> None:
    if not (math.isfinite(head_s) and head_s >= 0):
        raise ValueError(f"head_s must be a finite number >= 0; got {head_s!r}")
    if not timings:
        raise ValueError("timings is empty: a model needs at least one block to predict")
    if isinstance(prefetch_depth, bool) or not isinstance(prefetch_depth, int) or prefetch_depth < 0:
        raise ValueError(f"prefetch_depth must be an int >= 0; got {prefetch_depth!r}")
    bad = [i for i in retained if not 0 <= i < len(timings)]
    if bad:
        raise ValueError(f"retained block indices {bad} are outside 0..{len(timings) - 1}")


def simulate(timings: Sequence[BlockTiming], *, prefetch_depth: int, retained: Collection[int] = (),
             passes: int = 3, head_s: float = 0.0) -> SimResult:
    """Run the schedule in the module docstring for ``passes`` passes; pass 0 starts at t = 0.

    Pass 0 differs (only ``d`` blocks were prefetched before it); from pass 1 on every pass takes the same
    time (proved for d <= 1 by ``concurrent_closed_form``, observed for deeper prefetch in random tests).

    Example:
        >>> simulate([BlockTiming("b", 1, 2.0, 1.0)] * 4, prefetch_depth=1, passes=2).wall_s
        (9.0, 8.0)
    """
    check_timings(timings, prefetch_depth, retained, head_s)
    if passes < 1:
        raise ValueError(f"passes must be >= 1; got {passes}")
    n, d, keep = len(timings), prefetch_depth, frozenset(retained)
    L, C, G = [b.load_s for b in timings], [b.compute_s for b in timings], [b.gap_s for b in timings]
    streamed = [i for i in range(n) if i not in keep]
    ns, per_pass = len(streamed), dict(load_s=sum(L[i] for i in streamed), compute_s=sum(C),
                    bytes_loaded=sum(timings[i].nbytes for i in streamed))
    if ns == 0:
        return SimResult((head_s + sum(C) + sum(G),) * passes, (0.0,) * passes, **per_pass)
    # window[i]: the next d streamed blocks after i, cyclically (with ns <= d it wraps onto itself)
    window = [[streamed[(bisect_right(streamed, i) + j) % ns] for j in range(d)] for i in range(n)]
    finish: list[float | None] = [None] * n  # load end of each requested, not yet released block
    free, loader = min(d + 1, ns), 0.0

    def request(ids: list[int], t: float, active: int) -> None:
        nonlocal free, loader
        for j in ids:
            if j == active or finish[j] is not None:
                continue
            if not free:
                return
            free -= 1
            loader = (t if t > loader else loader) + L[j]
            finish[j] = loader

    request([streamed[j % ns] for j in range(d)], 0.0, -1)
    walls, stalls, t = [], [], 0.0
    for _ in range(passes):
        t0, stall = t, 0.0
        t += head_s
        for i in range(n):
            if i in keep:
                request(window[i], t, -1)
                t += C[i]
                request(window[i], t, -1)
                t += G[i]
                continue
            f = finish[i]
            if f is None:  # on demand (d = 0): a slot is always free here, the previous block is released
                request([i], t, -1)
                f = finish[i]
            assert f is not None
            if f > t:
                stall += f - t
                t = f
            request(window[i], t, i)
            t += C[i]
            finish[i] = None
            free += 1
            request(window[i], t, -1)
            t += G[i]
        walls.append(t - t0)
        stalls.append(stall)
    return SimResult(tuple(walls), tuple(stalls), **per_pass)


def sequential_closed_form(timings: Sequence[BlockTiming], *, head_s: float = 0.0) -> float:
    """Paper's Eq. 10, prefetch 0 and nothing retained: every pass is ``head + sum(load + compute + gap)``."""
    return head_s + sum(b.load_s + b.compute_s + b.gap_s for b in timings)


def concurrent_closed_form(timings: Sequence[BlockTiming], *, retained: Collection[int] = (),
                           head_s: float = 0.0) -> float:
    """Paper's Eq. 11 generalised: steady pass time with prefetch 1 (two slots), from pass 1 on.

    With prefetch 1 the loader holds at most one request: streamed block j is requested when the previous
    streamed block k starts computing (at R_k, after its wait), so with P_k = compute from k up to j
    (``compute + gap`` of k and of the retained blocks between, plus ``head_s`` where a pass starts)::

        R_j = R_k + max(P_k, L_j)        steady pass = sum over streamed j of max(P_k, L_j)

    Nothing retained: ``sum_i max(C_{i-1} + G_{i-1} (+ head at i = 0), L_i)``. One streamed block k is
    requested at its own release instead: ``C_k + max(L_k, rest of the pass)``.
    """
    n, keep = len(timings), frozenset(retained)
    streamed = [i for i in range(n) if i not in keep]
    full = head_s + sum(b.compute_s + b.gap_s for b in timings)
    if len(streamed) <= 1:
        one = timings[streamed[0]] if streamed else BlockTiming("", 0, 0.0, 0.0)
        return one.compute_s + max(one.load_s, full - one.compute_s)
    total, prev = 0.0, streamed[-1]
    for j in streamed:
        span = range(prev, j) if prev < j else [*range(prev, n), *range(j)]
        hide = sum(timings[m].compute_s + timings[m].gap_s for m in span) + (head_s if prev >= j else 0.0)
        total += max(hide, timings[j].load_s)
        prev = j
    return total


def steady_pass_s(timings: Sequence[BlockTiming], d: int, keep: Collection[int], head_s: float) -> float:
    """Steady pass time; the closed forms for d <= 1 (equal to ``simulate``, tested), cheap for the greedy."""
    if d == 0:
        return head_s + sum(b.compute_s + b.gap_s + (0.0 if i in keep else b.load_s) for i, b in enumerate(timings))
    if d == 1:
        return concurrent_closed_form(timings, retained=keep, head_s=head_s)
    return simulate(timings, prefetch_depth=d, retained=keep, passes=3, head_s=head_s).steady_s


def same_time(a: float, b: float) -> bool:
    return abs(a - b) <= _REL_TOL * max(abs(a), abs(b), 1e-300)


@dataclass(frozen=True)
class RetentionDecision:
    """Blocks kept resident across passes, within ``free_bytes``."""

    retained: tuple[int, ...]  # sorted block indices
    nbytes: int
    free_bytes: int
    steady_s: float  # predicted steady pass time with them retained
    baseline_s: float  # ... and with nothing retained
    reasons: dict[int, str]

    def __str__(self) -> str:
        head = (f"retain {len(self.retained)} block(s), {format_bytes(self.nbytes)} of {format_bytes(self.free_bytes)} "
                f"free: {self.baseline_s * 1e3:.1f} -> {self.steady_s * 1e3:.1f} ms/pass")
        return "\n".join([head, *(f"  block {i}: {self.reasons[i]}" for i in self.retained)])


def choose_retained(timings: Sequence[BlockTiming], *, prefetch_depth: int, free_bytes: int, head_s: float = 0.0,
                    start: Collection[int] = ()) -> RetentionDecision:
    """Greedy on the simulator: add the block that fits and gives the lowest steady pass time (ties: higher
    ``load_s / compute_s``, then lower index), while any block fits (retaining still saves reads).

    Any set of the same bytes reloads the same volume, but with limited prefetch depth *where* retained blocks
    sit decides how much loading hides behind compute: spread out, hard-to-hide loads first. ``start`` seeds
    the set (``sweep`` carries a smaller budget's set forward).
    """
    check_timings(timings, prefetch_depth, start, head_s)
    chosen = set(start)
    used = sum(timings[i].nbytes for i in chosen)
    if used > free_bytes:
        raise ValueError(f"start blocks take {used} bytes, more than free_bytes={free_bytes}")
    floor = head_s + sum(b.compute_s + b.gap_s for b in timings)  # no pass is faster than its compute
    baseline = steady_pass_s(timings, prefetch_depth, (), head_s)
    now = steady_pass_s(timings, prefetch_depth, chosen, head_s)
    reasons = {i: "retained at a smaller budget" for i in chosen}
    while True:
        fits = [i for i in range(len(timings)) if i not in chosen and timings[i].nbytes <= free_bytes - used]
        if not fits:
            break
        if same_time(now, floor) or now < floor:  # compute-bound: nothing can get faster, only reads drop
            times = dict.fromkeys(fits, now)
        else:
            times = {i: steady_pass_s(timings, prefetch_depth, chosen | {i}, head_s) for i in fits}
        best = min(times.values())
        pick = min((i for i in fits if same_time(times[i], best)), key=lambda i: (-timings[i].load_per_compute, i))
        b = timings[pick]
        reasons[pick] = (f"load {b.load_s * 1e3:.1f} ms vs compute {b.compute_s * 1e3:.1f} ms: retaining saves "
                         f"{max(0.0, now - times[pick]) * 1e3:.1f} ms/pass and {format_bytes(b.nbytes)} of reads")
        chosen.add(pick)
        used += b.nbytes
        now = times[pick]
    return RetentionDecision(tuple(sorted(chosen)), used, free_bytes, now, baseline, reasons)
