"""Recording a run: events on a clock, counters and passes, written by the loader and compute threads.

The reading side (the :class:`~blockrt.profile.Summary` of design §4, the Chrome trace, the PNG) is in
``profile.py``, which a run never needs.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

EVENT_KINDS = ("load", "compute", "wait", "evict")


@dataclass(frozen=True)
class Event:
    """One interval on the timeline. Times are seconds since the profile's t0."""

    kind: str  # one of EVENT_KINDS
    block: str  # block name
    pass_idx: int  # the pass this event serves (a prefetch for pass p+1 is tagged p+1)
    start: float
    end: float
    nbytes: int = 0  # bytes read, for load events
    thread: str = ""  # lane name: "loader" or "compute"

    @property
    def lane(self) -> str:
        """The lane the event is drawn on: its thread, else ``loader`` for loads and ``compute`` otherwise."""
        return self.thread or ("loader" if self.kind == "load" else "compute")


@dataclass(frozen=True)
class Stage:
    """One stage of a multi-stage run (a model of a pipeline, absorbed with :meth:`Recording.absorb`): its label,
    the prefix its block names carry, and its extent in seconds since t0."""

    name: str  # label for people: "T5", "STDiT3", "VAE temporal"
    prefix: str  # block-name prefix of its events: "t5/"
    start: float
    end: float


class Recording:
    """Events, counters and passes of one runtime, recorded from the loader and compute threads (thread-safe);
    ``budget`` and ``device`` as :class:`~blockrt.profile.Profile`, which adds the reading side."""

    def __init__(self, budget: int | None = None, device: str = "cpu") -> None:
        self.budget = budget
        self.device = device
        self._t0 = time.perf_counter()
        self._lock = threading.Lock()
        self._events: list[Event] = []
        self._counters: dict[str, list[tuple[float, float]]] = {}
        self._reuse: list[tuple[str, int, int]] = []  # (block, pass_idx, nbytes)
        self._materialised: list[tuple[str, int, int]] = []  # (block, pass_idx, nbytes) of each load
        self._open: dict[int, float] = {}  # pass_idx -> start of a begun pass
        self._passes: list[tuple[int, float, float]] = []
        self._stages: list[Stage] = []

    def now(self) -> float:
        """Seconds since this profile's t0 (``time.perf_counter`` based)."""
        return time.perf_counter() - self._t0

    def record(self, kind: str, block: str, pass_idx: int, start: float, end: float,
               nbytes: int = 0, thread: str = "") -> None:
        """Add one event (thread-safe). Times are seconds since t0, as returned by :meth:`now`."""
        if kind not in EVENT_KINDS:
            raise ValueError(f"event kind {kind!r} is not one of {EVENT_KINDS}")
        if not (0.0 <= start <= end and math.isfinite(end)):
            raise ValueError(f"{kind} {block!r}: expected 0 <= start <= end in seconds since t0 "
                             f"(use Profile.now()), got start={start!r} end={end!r}")
        if nbytes < 0 or pass_idx < 0:
            raise ValueError(f"{kind} {block!r}: nbytes and pass_idx must be >= 0, got {nbytes}, {pass_idx}")
        ev = Event(kind, block, int(pass_idx), float(start), float(end), int(nbytes), thread)
        with self._lock:
            self._events.append(ev)

    def record_reuse(self, block: str, pass_idx: int, nbytes: int) -> None:
        """Note that pass ``pass_idx`` used ``block`` (``nbytes``) while resident, without loading it."""
        if nbytes < 0:
            raise ValueError(f"reuse of {block!r}: nbytes must be >= 0, got {nbytes}")
        with self._lock:
            self._reuse.append((block, int(pass_idx), int(nbytes)))

    def record_materialised(self, block: str, pass_idx: int, nbytes: int) -> None:
        """Note the bytes a load of ``block`` for ``pass_idx`` put in its slot (its load event has the bytes read)."""
        with self._lock:
            self._materialised.append((block, int(pass_idx), int(nbytes)))

    def counter(self, name: str, t: float, value: float) -> None:
        """Add a sample ``value`` at time ``t`` to the counter series ``name`` (thread-safe)."""
        if not (t >= 0.0 and math.isfinite(t) and math.isfinite(value)):
            raise ValueError(f"counter {name!r}: expected t >= 0 (seconds since t0) and a finite value, "
                             f"got t={t!r} value={value!r}")
        with self._lock:
            self._counters.setdefault(name, []).append((float(t), value))

    def begin_pass(self, pass_idx: int, t: float) -> None:
        """Mark the start of pass ``pass_idx`` at time ``t``."""
        with self._lock:
            self._open[pass_idx] = float(t)

    def end_pass(self, pass_idx: int, t: float) -> None:
        """Mark the end of pass ``pass_idx`` at time ``t``; the pass then counts in summaries."""
        with self._lock:
            if pass_idx not in self._open:
                raise ValueError(f"end_pass({pass_idx}) without begin_pass({pass_idx}); "
                                 f"open passes: {sorted(self._open)}")
            start = self._open.pop(pass_idx)
            if t < start:
                raise ValueError(f"pass {pass_idx} ends at {t!r} before it began at {start!r}")
            self._passes.append((pass_idx, start, float(t)))

    def absorb(self, other: "Recording", prefix: str = "", stage: str | None = None) -> None:
        """Add ``other``'s events, reuses, counters and passes to this profile, on this profile's clock, with
        block names prefixed and pass indices placed after this profile's (a whole run made of stages).

        ``stage`` (default: ``prefix`` without its trailing ``/``, when there is one) names the absorbed run as a
        :class:`Stage` spanning its passes and events: the timeline labels it, the trace makes it a process."""
        shift = other._t0 - self._t0
        with self._lock:
            offset = 1 + max([i for i, _, _ in self._passes] + [i for i in self._open] + [-1])
        with other._lock:
            events, reuse, mat = list(other._events), list(other._reuse), list(other._materialised)
            counters = {k: list(v) for k, v in other._counters.items()}
            passes = list(other._passes)
        if shift < 0 and (events or passes):
            raise ValueError("absorb: the other profile started before this one; create the whole-run profile first")
        with self._lock:
            self._events += [Event(e.kind, prefix + e.block, e.pass_idx + offset, e.start + shift, e.end + shift,
                                   e.nbytes, e.thread) for e in events]
            self._reuse += [(prefix + b, p + offset, n) for b, p, n in reuse]
            self._materialised += [(prefix + b, p + offset, n) for b, p, n in mat]
            self._passes += [(p + offset, a + shift, b + shift) for p, a, b in passes]
            for name, series in counters.items():
                self._counters.setdefault(name, []).extend((t + shift, v) for t, v in series)
            label = stage if stage is not None else prefix.rstrip("/")
            times = [t for _, a, b in passes for t in (a, b)] + [t for e in events for t in (e.start, e.end)]
            if label and times:
                self._stages.append(Stage(label, prefix, min(times) + shift, max(times) + shift))

    @property
    def events(self) -> list[Event]:
        """A copy of the events, in recording order."""
        with self._lock:
            return list(self._events)

    @property
    def passes(self) -> list[tuple[int, float, float]]:
        """``(pass_idx, start, end)`` of the completed passes, in completion order."""
        with self._lock:
            return list(self._passes)

    @property
    def stages(self) -> list[Stage]:
        """The absorbed stages, in absorption order (empty for a single run)."""
        with self._lock:
            return list(self._stages)

    @property
    def counters(self) -> dict[str, list[tuple[float, float]]]:
        """A copy of the counter series: name -> ``[(t, value), ...]`` in recording order."""
        with self._lock:
            return {k: list(v) for k, v in self._counters.items()}

    def reset(self) -> None:
        """Drop all events, counters, reuses and passes; t0 stays, so later times remain comparable."""
        with self._lock:
            for store in (self._events, self._counters, self._reuse, self._materialised, self._open, self._passes,
                          self._stages):
                store.clear()
