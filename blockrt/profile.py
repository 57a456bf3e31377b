"""The Profile: the measures of design §4 over what a run recorded (``recording.py``), as a
:class:`Summary`, a Chrome trace event JSON for Perfetto, and a PNG timeline (``timeline.py``; matplotlib is
imported only when a plot is asked for).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .budget import format_bytes
from .files import write_atomic
from .recording import EVENT_KINDS, Event, Recording, Stage
from .timeline import plot_timeline

__all__ = ["EVENT_KINDS", "Event", "Profile", "Stage", "Summary"]


def _fmt_s(s: float) -> str:
    return f"{s:.3f} s" if abs(s) >= 1.0 else f"{s * 1e3:.1f} ms"


@dataclass(frozen=True)
class Summary:
    """The measures of design §4 over a selection of completed passes (see :meth:`Profile.summary`)."""

    passes: int
    wall_s: float  # sum of pass durations
    load_s: float  # sum of load durations of the selected passes
    compute_s: float
    stall_s: float  # sum of wait durations: compute waiting for loads
    stall_fraction: float  # stall_s / wall_s, 0 if wall_s == 0
    roofline_ratio: float  # wall_s / max(load_s, compute_s); 1.0 = perfect overlap; nan if both are 0
    bytes_loaded: int
    bytes_reused: int  # bytes served by blocks already resident
    reload_fraction: float  # bytes_loaded / (bytes_loaded + bytes_reused); nan if both are 0
    peak_ledger_bytes: int  # max of the "ledger_bytes" counter over the whole profile
    budget: int | None
    # Process memory (blockrt.memory): the peak of a counter minus its first sample, the baseline taken before
    # the runtime started; None without samples. rss = anon + file (+ shmem); see blockrt.memory for meanings.
    peak_rss_delta: int | None = None  # "rss_bytes" (and the kernel's high-water mark "rss_hwm_bytes")
    peak_anon_delta: int | None = None  # "rss_anon_bytes": heap and tensors, what iOS counts against an app
    peak_file_delta: int | None = None  # "rss_file_bytes": clean mapped file pages (mmap'd weights), droppable
    # what the loads put in slots, in the compute dtype; bytes_loaded counts what they read, as stored (less for
    # blocks stored as float16 or int8). None when no loader recorded it.
    bytes_materialised: int | None = None

    @property
    def load_bytes_per_s(self) -> float:
        """Load bandwidth: ``bytes_loaded / load_s`` (nan without load time)."""
        return self.bytes_loaded / self.load_s if self.load_s > 0 else math.nan

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (nan stays nan)."""
        return asdict(self)

    def __str__(self) -> str:
        bw = self.load_bytes_per_s
        per_pass = f"{_fmt_s(self.wall_s / self.passes)} per pass" if self.passes else ""
        if self.budget:
            pct = 100.0 * self.peak_ledger_bytes / self.budget
            ledger_note = f"of budget {format_bytes(self.budget)} ({pct:.1f}%)"
        else:
            ledger_note = "(no budget set)"
        rows = [
            ("wall_s", _fmt_s(self.wall_s), per_pass),
            ("load_s", _fmt_s(self.load_s), "" if math.isnan(bw) else f"at {format_bytes(bw)}/s"),
            ("compute_s", _fmt_s(self.compute_s), ""),
            ("stall_s", _fmt_s(self.stall_s), "compute waiting for loads"),
            ("stall_fraction", f"{self.stall_fraction:.3f}", "stall_s / wall_s"),
            ("roofline_ratio", f"{self.roofline_ratio:.2f}", "(1.00 = perfect overlap, 2.00 = sequential)"),
            ("bytes_loaded", format_bytes(self.bytes_loaded), ""),
            *([("bytes_materialised", format_bytes(self.bytes_materialised), "loaded, in the compute dtype")]
              if self.bytes_materialised not in (None, self.bytes_loaded) else []),
            ("bytes_reused", format_bytes(self.bytes_reused), "served by retained blocks"),
            ("reload_fraction", f"{self.reload_fraction:.3f}", "loaded / (loaded + reused)"),
            ("peak_ledger_bytes", format_bytes(self.peak_ledger_bytes), ledger_note),
        ]
        for name, note in (("peak_rss_delta", "peak RSS minus RSS at start"),
                           ("peak_anon_delta", "anon (counts on iOS)"),
                           ("peak_file_delta", "file-backed (clean, droppable)")):
            value = getattr(self, name)
            if value is not None:
                rows.append((name, format_bytes(value), note))
        lines = [f"blockrt profile: {self.passes} pass{'' if self.passes == 1 else 'es'}"]
        lines += [f"  {name:<18} {value:>10}  {note}".rstrip() for name, value, note in rows]
        return "\n".join(lines)


def _peak_delta(series: Sequence[float], also: Sequence[float] = ()) -> int | None:
    """The peak of ``series`` (and of ``also``, other readings of the same quantity) minus its first value."""
    if not series:
        return None
    return int(max(max(series), max(also, default=series[0])) - series[0])


class Profile(Recording):
    """Events, counters and passes of one runtime (recorded by :class:`~blockrt.recording.Recording`) and
    what they measure.

    Args:
        budget: the memory budget in bytes (shown against ``peak_ledger_bytes``), or None.
        device: the compute device's name, for the trace's metadata.

    Example:
        >>> p = Profile(budget=3_300_000_000)
        >>> p.begin_pass(0, p.now()); t = p.now(); p.record("compute", "block.0", 0, t, p.now())
        >>> p.end_pass(0, p.now()); print(p.summary().passes)
        1
    """

    def summary(self, passes: Iterable[int] | None = None) -> Summary:
        """The measures over all completed passes, or over the given completed pass indices.

        Events and reuses count when their ``pass_idx`` is selected; a prefetch tagged with a pass that has
        not completed is left out. ``peak_ledger_bytes`` is over the whole profile.
        """
        with self._lock:
            events, reuse, mat = list(self._events), list(self._reuse), list(self._materialised)
            done = {idx: (s, e) for idx, s, e in self._passes}
            ledger = [v for _, v in self._counters.get("ledger_bytes", [])]
            rss, anon, file, hwm = ([v for _, v in self._counters.get(name, [])] for name in
                                    ("rss_bytes", "rss_anon_bytes", "rss_file_bytes", "rss_hwm_bytes"))
        if passes is None:
            sel = set(done)
        else:
            sel = set(passes)
            missing = sorted(sel - set(done))
            if missing:
                raise ValueError(f"passes {missing} have not completed; completed passes: {sorted(done)}")
        wall = sum(done[i][1] - done[i][0] for i in sel)
        dur = {k: 0.0 for k in EVENT_KINDS}
        loaded = 0
        for ev in events:
            if ev.pass_idx in sel:
                dur[ev.kind] += ev.end - ev.start
                if ev.kind == "load":
                    loaded += ev.nbytes
        reused = sum(n for _, i, n in reuse if i in sel)
        slowest = max(dur["load"], dur["compute"])
        return Summary(
            passes=len(sel), wall_s=wall, load_s=dur["load"], compute_s=dur["compute"],
            stall_s=dur["wait"], stall_fraction=dur["wait"] / wall if wall > 0 else 0.0,
            roofline_ratio=wall / slowest if slowest > 0 else math.nan,
            bytes_loaded=loaded, bytes_reused=reused,
            reload_fraction=loaded / (loaded + reused) if loaded + reused > 0 else math.nan,
            peak_ledger_bytes=int(max(ledger, default=0)), budget=self.budget,
            peak_rss_delta=_peak_delta(rss, hwm), peak_anon_delta=_peak_delta(anon),
            peak_file_delta=_peak_delta(file),
            bytes_materialised=sum(n for _, i, n in mat if i in sel) if mat else None,
        )

    def __str__(self) -> str:
        return str(self.summary())

    def trace_events(self) -> list[dict[str, Any]]:
        """The Chrome trace events (metadata, complete and counter events), times in microseconds.

        Process 1 is the whole run (its counters, and a ``stages`` track when stages were absorbed); each absorbed
        stage (``T5``, ``STDiT3``, ...) is a process of its own holding its blocks' lanes and passes."""
        events, passes, counters, stages = self.events, self.passes, self.counters, self.stages
        lanes = sorted({ev.lane for ev in events} | {"compute"}, key=lambda n: (n != "compute", n))
        tids = {name: i + 1 for i, name in enumerate(lanes)}
        tids["passes"] = len(lanes) + 1
        names = {1: f"blockrt ({self.device})", **{i + 2: st.name for i, st in enumerate(stages)}}
        by_prefix = sorted(((st.prefix, i + 2) for i, st in enumerate(stages) if st.prefix), key=lambda x: -len(x[0]))

        def pid_of_block(block: str) -> int:
            return next((pid for prefix, pid in by_prefix if block.startswith(prefix)), 1)

        def pid_of_span(s: float, e: float) -> int:
            return next((i + 2 for i, st in enumerate(stages) if st.start <= s and e <= st.end), 1)

        body: list[dict[str, Any]] = []
        thread_names = {tid: lane for lane, tid in tids.items()}
        if stages:
            thread_names[len(lanes) + 2] = "stages"
            body += [{"name": st.name, "cat": "stage", "ph": "X", "pid": 1, "tid": len(lanes) + 2,
                      "ts": st.start * 1e6, "dur": (st.end - st.start) * 1e6, "args": {"prefix": st.prefix}}
                     for st in stages]
        for idx, s, e in passes:
            body.append({"name": f"pass {idx}", "cat": "pass", "ph": "X", "pid": pid_of_span(s, e),
                         "tid": tids["passes"], "ts": s * 1e6, "dur": (e - s) * 1e6, "args": {"pass": idx}})
        for ev in events:
            body.append({"name": f"{ev.kind} {ev.block}", "cat": ev.kind, "ph": "X", "pid": pid_of_block(ev.block),
                         "tid": tids[ev.lane], "ts": ev.start * 1e6, "dur": (ev.end - ev.start) * 1e6,
                         "args": {"pass": ev.pass_idx, "bytes": ev.nbytes}})
        # every process is named; its threads are named where they hold events (all lanes of a single run)
        used = {(ev["pid"], ev["tid"]) for ev in body} | ({(1, tid) for tid in tids.values()} if not stages else set())
        out: list[dict[str, Any]] = []
        for pid, name in names.items():
            out.append({"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": name}})
            out.append({"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0, "args": {"sort_index": pid}})
            for tid in sorted(t for p, t in used if p == pid):
                out.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid,
                            "args": {"name": thread_names[tid]}})
                out.append({"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": tid,
                            "args": {"sort_index": tid}})
        out += body
        for name, series in counters.items():
            key = "bytes" if name.endswith("bytes") else "value"
            for t, v in series:
                out.append({"name": name, "ph": "C", "pid": 1, "ts": t * 1e6, "args": {key: v}})
        return out

    def save_trace(self, path: str | os.PathLike[str]) -> None:
        """Write a Chrome trace event JSON (open it in Perfetto or chrome://tracing), atomically."""
        summary = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)  # strict JSON: no NaN
                   for k, v in self.summary().to_dict().items()}
        doc = {"traceEvents": self.trace_events(), "displayTimeUnit": "ms",
               "otherData": {"device": self.device, **summary}}
        data = json.dumps(doc, allow_nan=False).encode()
        write_atomic(path, lambda f: f.write(data))

    def plot(self, path: str | os.PathLike[str], title: str | None = None) -> None:
        """Write a PNG timeline: loader and compute lanes, memory under the budget (needs matplotlib)."""
        plot_timeline(self, path, title=title)
