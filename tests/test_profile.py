"""Tests of blockrt.profile and blockrt.timeline: the measures on synthetic timelines, thread safety, the
Chrome trace format, the PNG, and atomic writes. Fast: no model, no disk beyond tmp_path."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from blockrt.profile import EVENT_KINDS, Event, Profile, Summary

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BUDGET = 1000  # bytes
BLOCK_BYTES = 100
N_THREADS = 8
N_PER_THREAD = 500
MEASURES = ("wall_s", "load_s", "compute_s", "stall_s", "stall_fraction", "roofline_ratio",
            "bytes_loaded", "bytes_reused", "reload_fraction", "peak_ledger_bytes")


def two_pass_profile() -> Profile:
    """Pass 0 perfectly overlapped, pass 1 sequential, plus a prefetch for a pass 2 that never ran.

    Pass 0, [0, 3]: compute a, b, c for 1 s each while the loader reads three blocks for 1 s each.
    Pass 1, [3, 9]: load, wait and compute one block after another; block d is reused, not loaded.
    """
    p = Profile(budget=BUDGET)
    p.begin_pass(0, 0.0)
    for i, blk in enumerate("abc"):
        p.record("compute", blk, 0, float(i), i + 1.0, thread="compute")
        p.record("load", blk, 0, float(i), i + 1.0, nbytes=BLOCK_BYTES, thread="loader")
    p.end_pass(0, 3.0)
    p.begin_pass(1, 3.0)
    for i, blk in enumerate("abc"):
        t = 3.0 + 2 * i
        p.record("load", blk, 1, t, t + 1, nbytes=BLOCK_BYTES, thread="loader")
        p.record("wait", blk, 1, t, t + 1, thread="compute")
        p.record("compute", blk, 1, t + 1, t + 2, thread="compute")
        p.record("evict", blk, 1, t + 2, t + 2, thread="compute")
    p.record_reuse("d", 1, BLOCK_BYTES)
    p.end_pass(1, 9.0)
    p.record("load", "a", 2, 9.0, 9.5, nbytes=BLOCK_BYTES, thread="loader")  # prefetch for pass 2
    p.record_reuse("d", 2, BLOCK_BYTES)
    for t, v in [(0.0, 100), (1.0, 300), (5.0, 250), (9.5, 150)]:
        p.counter("ledger_bytes", t, v)
    for t, v in [(0.0, 5000), (2.0, 5600), (9.0, 5200)]:
        p.counter("rss_bytes", t, v)
    return p


def test_overlapped_pass_is_at_the_roofline() -> None:
    s = two_pass_profile().summary([0])
    assert (s.passes, s.wall_s, s.load_s, s.compute_s, s.stall_s) == (1, 3.0, 3.0, 3.0, 0.0)
    assert s.stall_fraction == 0.0
    assert s.roofline_ratio == 1.0
    assert (s.bytes_loaded, s.bytes_reused, s.reload_fraction) == (300, 0, 1.0)


def test_sequential_pass_is_twice_the_roofline() -> None:
    s = two_pass_profile().summary([1])
    assert (s.passes, s.wall_s, s.load_s, s.compute_s, s.stall_s) == (1, 6.0, 3.0, 3.0, 3.0)
    assert s.stall_fraction == 0.5
    assert s.roofline_ratio == 2.0
    assert (s.bytes_loaded, s.bytes_reused, s.reload_fraction) == (300, 100, 0.75)


def test_summary_over_all_completed_passes_excludes_the_pending_prefetch() -> None:
    p = two_pass_profile()
    s = p.summary()
    assert s == p.summary([0, 1]) == p.summary(iter([1, 0]))
    assert (s.passes, s.wall_s, s.load_s, s.compute_s, s.stall_s) == (2, 9.0, 6.0, 6.0, 3.0)
    assert s.stall_fraction == 3.0 / 9.0
    assert s.roofline_ratio == 1.5
    assert (s.bytes_loaded, s.bytes_reused) == (600, 100)
    assert s.reload_fraction == 600 / 700
    assert (s.peak_ledger_bytes, s.budget, s.peak_rss_delta) == (300, BUDGET, 600)
    assert s.load_bytes_per_s == 100.0
    assert s.to_dict()["roofline_ratio"] == 1.5 and set(MEASURES) <= set(s.to_dict())
    assert str(p) == str(s)


def test_summary_edge_cases() -> None:
    p = two_pass_profile()
    with pytest.raises(ValueError, match=r"\[2\].*completed passes: \[0, 1\]"):
        p.summary([2])
    empty = Profile().summary()
    assert (empty.passes, empty.wall_s, empty.stall_fraction, empty.peak_ledger_bytes) == (0, 0.0, 0.0, 0)
    assert math.isnan(empty.roofline_ratio) and math.isnan(empty.reload_fraction)
    assert empty.budget is None and empty.peak_rss_delta is None
    assert empty.peak_anon_delta is None and empty.peak_file_delta is None
    assert "roofline_ratio" in str(empty)


def test_rss_by_kind_is_peak_minus_first_sample() -> None:
    p = two_pass_profile()
    for name, series in (("rss_anon_bytes", [(0.0, 3000), (2.0, 3500), (9.0, 3100)]),
                         ("rss_file_bytes", [(0.0, 2000), (2.0, 2100), (9.0, 2100)]),
                         ("rss_hwm_bytes", [(0.0, 5000), (9.5, 5800)])):  # the kernel saw a higher peak
        for t, v in series:
            p.counter(name, t, v)
    s = p.summary()
    assert (s.peak_rss_delta, s.peak_anon_delta, s.peak_file_delta) == (800, 500, 100)
    text = str(s)
    assert re.search(r"peak_anon_delta +500 B +anon \(counts on iOS\)", text)
    assert re.search(r"peak_file_delta +100 B +file-backed \(clean, droppable\)", text)
    assert two_pass_profile().summary().peak_anon_delta is None  # rss alone: no split rows
    assert "peak_anon_delta" not in str(two_pass_profile().summary())


def test_record_validates_and_events_are_copies() -> None:
    p = Profile()
    with pytest.raises(ValueError, match="kind"):
        p.record("read", "a", 0, 0.0, 1.0)
    with pytest.raises(ValueError, match="start <= end"):
        p.record("load", "a", 0, 2.0, 1.0)
    with pytest.raises(ValueError, match="begin_pass"):
        p.end_pass(0, 1.0)
    with pytest.raises(ValueError, match="finite"):
        p.counter("ledger_bytes", 0.0, math.nan)
    p.record("load", "a", 0, 0.0, 1.0, nbytes=5)
    p.events.clear()
    assert p.events == [Event("load", "a", 0, 0.0, 1.0, 5, "")]
    assert p.events[0].lane == "loader" and Event("wait", "a", 0, 0, 0).lane == "compute"


def test_now_is_monotonic_and_reset_keeps_t0() -> None:
    p = two_pass_profile()
    t = p.now()
    assert t >= 0.0
    p.reset()
    assert p.events == [] and p.passes == [] and p.counters == {}
    assert p.summary().passes == 0 and p.summary().bytes_reused == 0
    assert p.now() >= t


def test_concurrent_recording_loses_nothing() -> None:
    p = Profile()
    barrier = threading.Barrier(N_THREADS + 1)

    def worker(k: int) -> None:
        barrier.wait()
        for i in range(N_PER_THREAD):
            t = p.now()
            p.record(EVENT_KINDS[i % 4], f"b{k}", 0, t, t, nbytes=1, thread=f"t{k}")
            p.counter("ledger_bytes", t, k * N_PER_THREAD + i)
            p.record_reuse(f"b{k}", 0, 1)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(N_THREADS)]
    for th in threads:
        th.start()
    barrier.wait()
    while any(th.is_alive() for th in threads):  # readers run while writers write
        p.summary()
        len(p.events)
    for th in threads:
        th.join()
    p.begin_pass(0, 0.0)
    p.end_pass(0, p.now())
    events = p.events
    assert len(events) == N_THREADS * N_PER_THREAD
    for k in range(N_THREADS):
        assert sum(ev.thread == f"t{k}" for ev in events) == N_PER_THREAD
    assert len(p.counters["ledger_bytes"]) == N_THREADS * N_PER_THREAD
    s = p.summary()
    assert s.bytes_loaded == N_THREADS * N_PER_THREAD // 4
    assert s.bytes_reused == N_THREADS * N_PER_THREAD
    assert s.peak_ledger_bytes == N_THREADS * N_PER_THREAD - 1


REQUIRED = {"X": {"name", "ph", "ts", "dur", "pid", "tid"}, "M": {"name", "ph", "pid", "args"},
            "C": {"name", "ph", "ts", "pid", "args"}}


def validate_chrome_trace(doc: Any) -> list[dict[str, Any]]:
    """Check ``doc`` against the Chrome Trace Event Format (JSON object form); returns the events."""
    assert isinstance(doc, dict) and isinstance(doc["traceEvents"], list)
    assert doc.get("displayTimeUnit") in ("ms", "ns")
    assert isinstance(doc.get("otherData", {}), dict)
    for ev in doc["traceEvents"]:
        assert ev["ph"] in REQUIRED, ev
        assert REQUIRED[ev["ph"]] <= set(ev), ev
        assert isinstance(ev["name"], str) and isinstance(ev["pid"], int)
        assert isinstance(ev.get("tid", 0), int) and not isinstance(ev.get("tid", 0), bool)
        for key in ("ts", "dur"):
            if key in ev:
                assert isinstance(ev[key], (int, float)) and ev[key] >= 0, ev
        if ev["ph"] == "M":
            assert ev["name"] in ("process_name", "thread_name", "process_sort_index", "thread_sort_index")
            if ev["name"].endswith("_name"):
                assert isinstance(ev["args"]["name"], str)
        if ev["ph"] == "C":
            assert ev["args"] and all(isinstance(v, (int, float)) for v in ev["args"].values())
    return doc["traceEvents"]


def test_trace_is_valid_chrome_trace_json(tmp_path: Path) -> None:
    p = two_pass_profile()
    path = tmp_path / "trace.json"
    p.save_trace(path)
    events = validate_chrome_trace(json.loads(path.read_text()))
    names = {ev["tid"]: ev["args"]["name"] for ev in events if ev["name"] == "thread_name"}
    assert names[min(names)] == "compute" and "loader" in names.values()
    x = [ev for ev in events if ev["ph"] == "X" and ev.get("cat") in EVENT_KINDS]
    assert len(x) == len(p.events)
    assert all(ev["tid"] in names for ev in x)
    assert {ev["cat"] for ev in x} == set(EVENT_KINDS)  # evictions included
    load_b = next(ev for ev in x if ev["name"] == "load b" and ev["args"]["pass"] == 1)
    assert (load_b["ts"], load_b["dur"], load_b["args"]["bytes"]) == (5e6, 1e6, BLOCK_BYTES)
    assert names[load_b["tid"]] == "loader"
    counters = [ev for ev in events if ev["ph"] == "C"]
    assert sorted(ev["args"]["bytes"] for ev in counters if ev["name"] == "ledger_bytes") == [100, 150, 250, 300]
    assert {ev["name"] for ev in counters} == {"ledger_bytes", "rss_bytes"}
    other = json.loads(path.read_text())["otherData"]
    assert other["roofline_ratio"] == 1.5 and other["peak_ledger_bytes"] == 300
    assert sorted(os.listdir(tmp_path)) == ["trace.json"]


def test_trace_of_empty_profile_is_valid_and_nan_free(tmp_path: Path) -> None:
    Profile().save_trace(tmp_path / "t.json")
    doc = json.loads((tmp_path / "t.json").read_text())  # strict JSON: NaN written as null
    validate_chrome_trace(doc)
    assert doc["otherData"]["roofline_ratio"] is None


def test_failed_write_leaves_old_file_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "trace.json"
    path.write_text("old")

    def boom(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        two_pass_profile().save_trace(path)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["trace.json"]


def test_plot_writes_a_readable_png(tmp_path: Path) -> None:
    import matplotlib.image
    import matplotlib.pyplot as plt

    figs_before = plt.get_fignums()
    p = two_pass_profile()
    p.plot(tmp_path / "timeline.png")
    Profile().plot(tmp_path / "empty.png", title="nothing")  # no events, no counters, no budget
    assert sorted(os.listdir(tmp_path)) == ["empty.png", "timeline.png"]
    for name in ("timeline.png", "empty.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == PNG_MAGIC
        img = matplotlib.image.imread(tmp_path / name)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert plt.get_fignums() == figs_before  # no figure left open


def test_str_is_one_screen_with_the_measures() -> None:
    text = str(two_pass_profile().summary())
    for name in MEASURES:
        assert name in text
    assert re.search(r"roofline_ratio +1\.50 +\(1\.00 = perfect overlap, 2\.00 = sequential\)", text)
    assert "(30.0%)" in text  # peak ledger 300 B of a 1000 B budget
    assert "9.000 s" in text and "100 B/s" in text
    assert len(text.splitlines()) <= 24 and max(map(len, text.splitlines())) <= 100


def test_str_uses_physical_units() -> None:
    s = Summary(passes=30, wall_s=0.25, load_s=0.2, compute_s=0.24, stall_s=0.01, stall_fraction=0.04,
                roofline_ratio=0.25 / 0.24, bytes_loaded=2_900_000_000, bytes_reused=0,
                reload_fraction=1.0, peak_ledger_bytes=3_100_000_000, budget=3_300_000_000)
    text = str(s)
    assert "250.0 ms" in text and "10.0 ms" in text and "2.90 GB" in text
    assert "14.50 GB/s" in text and "3.10 GB" in text and "of budget 3.30 GB (93.9%)" in text
    assert re.search(r"roofline_ratio +1\.04 +\(1\.00 = perfect overlap", text)


def test_profile_import_does_not_need_matplotlib() -> None:
    code = "import sys, blockrt.profile; assert 'matplotlib' not in sys.modules, 'imported matplotlib'"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env=env)


def staged_profile() -> Profile:
    """A whole-run profile made of three absorbed stages, as the Open-Sora pipeline builds it."""
    whole = Profile(budget=64_000_000)
    for name, label in (("t5", "T5"), ("stdit3", "STDiT3"), ("vae", None)):
        stage = Profile()
        for i in range(3 if name == "stdit3" else 1):
            t = stage.now()
            stage.begin_pass(i, t)
            stage.record("load", f"block.{i}", i, t, t + 1e-4, nbytes=10, thread="loader")
            stage.record("compute", f"block.{i}", i, t + 1e-4, t + 2e-4, thread="compute")
            stage.counter("ledger_bytes", t, 5_000_000.0)
            stage.end_pass(i, t + 2e-4)
        while stage.now() < stage.passes[-1][2]:  # the next stage starts after this one's last (made-up) time
            time.sleep(1e-4)
        whole.absorb(stage, prefix=f"{name}/", stage=label)
    return whole


def test_absorbed_stages_are_named_spans_and_trace_processes(tmp_path: Path) -> None:
    p = staged_profile()
    assert [(s.name, s.prefix) for s in p.stages] == [("T5", "t5/"), ("STDiT3", "stdit3/"), ("vae", "vae/")]
    for st in p.stages:  # each spans exactly its own passes and events, in order
        mine = [ev for ev in p.events if ev.block.startswith(st.prefix)]
        assert st.start == min(ev.start for ev in mine) and st.end == max(ev.end for ev in mine)
    assert all(a.end <= b.start for a, b in zip(p.stages, p.stages[1:]))
    p.save_trace(tmp_path / "trace.json")
    events = validate_chrome_trace(json.loads((tmp_path / "trace.json").read_text()))
    procs = {ev["pid"]: ev["args"]["name"] for ev in events if ev["name"] == "process_name"}
    assert procs == {1: "blockrt (cpu)", 2: "T5", 3: "STDiT3", 4: "vae"}
    x = [ev for ev in events if ev["ph"] == "X" and ev.get("cat") in EVENT_KINDS]
    assert {procs[ev["pid"]] for ev in x if ev["name"].endswith("stdit3/block.2")} == {"STDiT3"}
    assert all(procs[ev["pid"]] == {"t5": "T5", "stdit3": "STDiT3", "vae": "vae"}[ev["name"].split()[1].split("/")[0]]
               for ev in x)
    passes = [ev for ev in events if ev.get("cat") == "pass"]
    assert sorted(procs[ev["pid"]] for ev in passes) == ["STDiT3"] * 3 + ["T5", "vae"]
    threads = {(ev["pid"], ev["args"]["name"]) for ev in events if ev["name"] == "thread_name"}
    assert (3, "loader") in threads and (1, "stages") in threads and (1, "loader") not in threads
    assert [ev["name"] for ev in events if ev.get("cat") == "stage"] == ["T5", "STDiT3", "vae"]
    assert {ev["pid"] for ev in events if ev["ph"] == "C"} == {1}
    # a single run keeps one process with its lanes
    single = two_pass_profile().trace_events()
    assert {ev["pid"] for ev in single} == {1} and not two_pass_profile().stages


def test_timeline_units_and_labels_that_do_not_overprint(tmp_path: Path) -> None:
    from blockrt.timeline import CHAR_PX, _fitting, memory_unit

    assert memory_unit(64e6) == ("MB", 1e6) and memory_unit(3.3e9) == ("GB", 1e9)
    assert memory_unit(5e3) == ("kB", 1e3) and memory_unit(12) == ("B", 1.0)
    # 40 passes of uneven width at 10 px/s: each label inside its own pass and clear of the previous one
    spans, t = [], 0.0
    for i in range(40):
        w = 0.5 + (i % 7) * 0.8
        spans.append((t, t + w, [f"pass {i}", str(i)]))
        t += w
    placed = _fitting(spans, px_per_s=10.0)
    assert 5 < len(placed) < 40
    edges = []
    for centre, text in placed:
        start, end, candidates = next(s for s in spans if s[0] <= centre <= s[1])
        half = (CHAR_PX * len(text)) / 2 / 10.0
        assert text in candidates and start <= centre - half and centre + half <= end
        edges.append((centre - half, centre + half))
    assert all(a[1] <= b[0] for a, b in zip(edges, edges[1:]))
    staged_profile().plot(tmp_path / "staged.png")
    assert (tmp_path / "staged.png").read_bytes()[:8] == PNG_MAGIC
