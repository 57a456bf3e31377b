"""Tests of blockrt.memory: RSS by kind, the sampler thread and its Profile counters, and the page-cache
helpers. Fast (a few 100-200 MB allocations and files under tmp_path)."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from blockrt import memory
from blockrt.memory import RssSample, RssSampler, read_rss
from blockrt.page_cache import cached_fraction, drop_page_cache
from blockrt.profile import Profile

MB = 10**6
TENSOR_BYTES = 200 * MB  # the anonymous allocation
FILE_BYTES = 100 * MB  # the mapped file
SLACK = 10 * MB  # what the interpreter may allocate or map on the side during a test
SAMPLES_WHILE_ALIVE = 3  # samples the thread must take while an allocation is alive
INTERVAL_S = 0.002
STOP_WITHIN_S = 1.0
PAGE = 4096

linux_only = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")


def in_ram_fs(path: Path) -> bool:
    """True where ``path`` lives on tmpfs/ramfs: its pages are the file, and no cache can drop them."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return False
    real = str(path.resolve())
    best = max((m for m in mounts if real == m[0] or real.startswith(m[0].rstrip("/") + "/")),
               key=lambda m: len(m[0]), default=("", ""))
    return best[1] in ("tmpfs", "ramfs")


def wait_for_samples(sampler: RssSampler, n: int, timeout_s: float = 5.0) -> None:
    """Block until the sampler thread took ``n`` more samples (so a live allocation is seen by sampling)."""
    target = sampler.samples + n
    deadline = time.monotonic() + timeout_s
    while sampler.samples < target:
        assert time.monotonic() < deadline, "the sampler thread does not sample"
        time.sleep(INTERVAL_S)


@linux_only
def test_read_rss_splits_by_kind() -> None:
    s = read_rss()
    assert s.split and s.rss > 0 and s.anon > 0 and s.file > 0
    assert s.rss == s.anon + s.file + s.shmem  # VmRSS is the sum of the three, read at one instant
    assert s.hwm is not None and s.hwm >= s.rss


def test_psutil_fallback_does_not_pretend_to_know_the_kinds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "_STATUS", "/nonexistent/status")
    s = read_rss()
    assert not s.split and s.rss > 0 and (s.anon, s.file, s.shmem) == (s.rss, 0, 0)
    p = Profile()
    with RssSampler(p, interval_s=INTERVAL_S) as rss:
        wait_for_samples(rss, 2)
    assert set(p.counters) == {"rss_bytes"}  # no anon/file counters where the split is unknown
    assert rss.peak_anon_delta is None and rss.peak_file_delta is None and rss.peak_rss_delta is not None
    summary = p.summary()
    assert summary.peak_rss_delta is not None and summary.peak_anon_delta is None
    assert "anon" not in str(summary)


@linux_only
def test_tensor_counts_as_anonymous_memory() -> None:
    p = Profile()
    with RssSampler(p, interval_s=INTERVAL_S) as rss:
        x = torch.empty(TENSOR_BYTES // 4, dtype=torch.float32)
        x.fill_(1.0)  # touch every page
        wait_for_samples(rss, SAMPLES_WHILE_ALIVE)
        del x
        wait_for_samples(rss, 1)
    assert rss.peak_anon_delta >= TENSOR_BYTES - SLACK, rss.peak_anon_delta
    assert rss.peak_file_delta < SLACK, rss.peak_file_delta
    assert rss.peak_rss_delta >= TENSOR_BYTES - SLACK
    assert rss.last.anon < rss.baseline.anon + SLACK  # freed: back to the baseline
    # The profile's counters hold the same peaks: the baseline is their first sample and new maxima are kept.
    s = p.summary()
    assert (s.peak_rss_delta, s.peak_anon_delta, s.peak_file_delta) == (
        rss.peak_rss_delta, rss.peak_anon_delta, rss.peak_file_delta)
    assert {"rss_bytes", "rss_anon_bytes", "rss_file_bytes"} <= set(p.counters)
    assert p.counters["rss_anon_bytes"][0][1] == rss.baseline.anon


def _touch_pages(a: np.ndarray) -> int:
    """Read one byte of every page (each page faulted in); returns the number of pages read."""
    return a[::PAGE].copy().size


def _mapped_numpy(path: Path) -> tuple[object, int]:
    m = np.memmap(path, dtype=np.uint8, mode="r")
    return m, _touch_pages(m)


def _mapped_safetensors(path: Path) -> tuple[object, int]:
    safetensors = pytest.importorskip("safetensors")
    if tuple(int(v) for v in safetensors.__version__.split(".")[:2]) < (0, 8):
        pytest.skip("safetensors < 0.8 copies on load_file")
    from safetensors.torch import load_file

    tensors = load_file(path)  # 0.8: zero-copy MAP_PRIVATE views of one mapping of the file
    return tensors, _touch_pages(tensors["w"].view(torch.uint8).numpy())


@linux_only
@pytest.mark.parametrize("mapper", [_mapped_numpy, _mapped_safetensors], ids=["numpy.memmap", "safetensors"])
def test_mapped_weights_count_as_file_pages_not_anonymous(tmp_path: Path, mapper) -> None:
    path = tmp_path / "weights.bin"
    if mapper is _mapped_safetensors:
        from safetensors.torch import save_file

        save_file({"w": torch.ones(FILE_BYTES // 4)}, path)
    else:
        path.write_bytes(np.ones(FILE_BYTES, dtype=np.uint8).tobytes())
    p = Profile()
    with RssSampler(p, interval_s=INTERVAL_S) as rss:
        mapped, total = mapper(path)
        assert total == -(-FILE_BYTES // PAGE)
        wait_for_samples(rss, SAMPLES_WHILE_ALIVE)
        del mapped
    assert rss.peak_file_delta >= FILE_BYTES - SLACK, rss.peak_file_delta
    assert rss.peak_anon_delta < SLACK, rss.peak_anon_delta
    s = p.summary()
    assert s.peak_file_delta == rss.peak_file_delta and s.peak_anon_delta == rss.peak_anon_delta
    text = str(s)
    assert "peak_anon_delta" in text and "anon (counts on iOS)" in text
    assert "peak_file_delta" in text and "file-backed (clean, droppable)" in text


@linux_only
def test_kernel_high_water_mark_catches_a_peak_between_samples() -> None:
    p = Profile()
    rss = RssSampler(p, interval_s=60.0).start()  # the thread will not sample during the test
    if not rss._hwm_valid:
        rss.stop()
        pytest.skip("/proc/self/clear_refs is not writable here")
    x = torch.ones(TENSOR_BYTES // 4)
    del x  # freed before any sample
    rss.stop()
    assert rss.peak_anon - rss.baseline.anon < SLACK  # sampling missed it...
    assert rss.hwm_rss_delta >= TENSOR_BYTES - SLACK  # ...the kernel's high-water mark did not
    assert rss.peak_rss_delta == max(rss.peak_rss, rss.hwm) - rss.baseline.rss
    assert p.summary().peak_rss_delta == rss.peak_rss_delta
    assert [v for _, v in p.counters["rss_hwm_bytes"]] == [rss.hwm]


def test_rise_during_sees_scratch_and_a_sampler_keeps_the_peak_it_reset() -> None:
    """``rise_during`` resets the kernel's mark for one call: it sees a peak freed inside the call, and a running
    sampler's ``hwm`` still holds a peak from before that reset."""
    p = Profile()
    rss = RssSampler(p, interval_s=60.0).start()
    if not rss._hwm_valid:
        rss.stop()
        pytest.skip("/proc/self/clear_refs is not writable here")
    x = torch.ones(TENSOR_BYTES // 4)
    del x  # the sampler's peak, before the reset below

    def transient() -> int:
        y = torch.ones(TENSOR_BYTES // 8)  # 100 MB, freed before the call returns
        return int(y[0])

    out, rise = memory.rise_during(transient)
    rss.stop()
    assert out == 1 and TENSOR_BYTES // 2 - SLACK <= rise <= TENSOR_BYTES // 2 + SLACK
    assert rss.hwm_rss_delta >= TENSOR_BYTES - SLACK
    assert [v for _, v in p.counters["rss_hwm_bytes"]] == [rss.hwm]  # the profile says the same


def test_working_set_counts_a_convolutions_hidden_scratch() -> None:
    """A CPU Conv3d at batch 1 fp32 builds im2col columns (C_in x 27 x outputs values) inside the op and frees
    them before it returns; the working set counts them while the op runs."""
    from blockrt.working_set import LiveBytes

    if memory.rise_during(lambda: None)[1] is None:
        pytest.skip("/proc/self/clear_refs is not writable here")
    conv = torch.nn.Conv3d(32, 32, 3, padding=1)
    x = torch.randn(1, 32, 9, 64, 64)
    columns = 32 * 27 * 9 * 64 * 64 * 4  # 127 MB, against a 4.7 MB output
    with torch.no_grad():
        conv(x)  # first-call set-up outside the measurement
        with LiveBytes() as live:
            y = conv(x)
    assert live.live == y.numel() * 4  # the scratch is gone once the op returned
    assert live.peak >= 0.9 * columns  # a kernel that needs no columns (a future oneDNN path) would fail here


def test_sampler_thread_starts_stops_and_never_hangs() -> None:
    rss = RssSampler(interval_s=30.0, name="rss-test")  # a long interval: stop must not wait it out
    assert rss.peak_rss_delta is None and not rss.running
    rss.stop()  # stopping an unstarted sampler does nothing
    rss.start()
    assert rss.running and rss._thread.daemon and rss._thread.name == "rss-test"
    assert any(t.name == "rss-test" for t in threading.enumerate())
    with pytest.raises(RuntimeError, match="started already"):
        rss.start()
    t0 = time.monotonic()
    rss.stop()
    assert time.monotonic() - t0 < STOP_WITHIN_S
    assert not rss.running and rss.samples == 2  # the baseline at start and the last one at stop
    rss.stop()  # idempotent
    assert rss.peak_rss_delta is not None and rss.baseline is not None


def test_sampler_survives_a_failing_read(monkeypatch: pytest.MonkeyPatch) -> None:
    rss = RssSampler(interval_s=INTERVAL_S).start()
    real = memory.read_rss

    def broken() -> RssSample:
        if threading.current_thread() is rss._thread:
            raise OSError("gone")
        return real()

    monkeypatch.setattr(memory, "read_rss", broken)
    rss._thread.join(STOP_WITHIN_S)
    assert not rss.running and isinstance(rss.error, OSError)
    rss.stop()
    assert rss.samples >= 2


def test_sampler_without_profile_and_argument_checks() -> None:
    with RssSampler() as rss:
        pass
    assert rss.peak_rss_delta >= 0 and rss.samples >= 2 and rss.profile is None
    for bad in (0, -1.0, float("inf"), "5ms"):
        with pytest.raises(ValueError, match="interval_s"):
            RssSampler(interval_s=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="resolution_bytes"):
        RssSampler(resolution_bytes=-1)


def test_counters_are_thinned_but_keep_the_peak() -> None:
    p = Profile()
    with RssSampler(p, interval_s=INTERVAL_S, resolution_bytes=10**12) as rss:  # nothing moves by 1 TB
        wait_for_samples(rss, 20)
    series = p.counters["rss_bytes"]
    assert series[0][1] == rss.baseline.rss
    assert len(series) < rss.samples  # only the baseline and new maxima were written
    assert max(v for _, v in series) == rss.peak_rss


@linux_only
def test_rss_counters_are_trace_tracks(tmp_path: Path) -> None:
    p = Profile()
    with RssSampler(p, interval_s=INTERVAL_S) as rss:
        wait_for_samples(rss, 2)
    p.save_trace(tmp_path / "trace.json")
    doc = json.loads((tmp_path / "trace.json").read_text())
    tracks = {ev["name"] for ev in doc["traceEvents"] if ev["ph"] == "C"}
    assert {"rss_bytes", "rss_anon_bytes", "rss_file_bytes"} <= tracks
    assert doc["otherData"]["peak_anon_delta"] == p.summary().peak_anon_delta


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="needs posix_fadvise")
def test_drop_page_cache(tmp_path: Path) -> None:
    data = os.urandom(8 * MB)
    path = tmp_path / "block.bin"
    path.write_bytes(data)  # dirty in the page cache: drop_page_cache writes it back first
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "other.bin").write_bytes(b"x" * 1000)
    assert path.read_bytes() == data
    if sys.platform.startswith("linux"):
        assert cached_fraction(path) > 0.9
    assert drop_page_cache([path]) == len(data)
    if sys.platform.startswith("linux") and not in_ram_fs(path):
        assert cached_fraction(path) < 0.5  # residency, not timing
    assert path.read_bytes() == data  # still readable, and the same
    assert drop_page_cache(str(path)) == len(data)  # one path, not its characters
    assert drop_page_cache([tmp_path]) == len(data) + 1000  # a directory: every file under it
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        drop_page_cache([path, tmp_path / "missing.bin"])


@linux_only
def test_cached_fraction_sees_a_partial_read(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert cached_fraction(empty) == 1.0
    with pytest.raises(FileNotFoundError):
        cached_fraction(tmp_path / "nope")
    if in_ram_fs(tmp_path):
        pytest.skip("tmp_path is on tmpfs: nothing to drop")
    part = tmp_path / "part"
    part.write_bytes(os.urandom(32 * MB))
    drop_page_cache([part])
    with open(part, "rb") as f:
        f.read(MB)  # the first 1/32 (and the kernel's read-ahead) only
    assert 0.0 < cached_fraction(part) < 0.9
