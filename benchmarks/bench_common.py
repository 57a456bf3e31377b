"""What the benchmark scripts share: the hardware line, a probe of CPU used by other processes, freeing
memory between runs, and writing results as JSON and CSV atomically."""

from __future__ import annotations

import csv
import gc
import io
import json
import math
import os
import platform
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from blockrt.files import write_atomic
from blockrt.malloc import trim_malloc

BUSY_CORES = 0.2  # other processes using more CPU than this (in cores) disturb the timings: warn
OTHER_CPU_PROBE_S = 0.5


def hardware() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": cores, "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


class OtherCpu:
    """CPU cores used by *other* processes since ``start()``: all busy time in /proc/stat minus this process's
    own and its finished children's (``os.times``), per second of wall time. Timings are only comparable when this is near 0."""

    def __init__(self) -> None:
        self._t0 = self._busy0 = self._own0 = 0.0

    @staticmethod
    def _busy_s() -> float:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]  # user nice system idle iowait irq softirq steal ...
        return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own_s() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def start(self) -> "OtherCpu":
        self._t0, self._busy0, self._own0 = time.perf_counter(), self._busy_s(), self._own_s()
        return self

    def cores(self) -> float:
        wall = time.perf_counter() - self._t0
        return max(0.0, (self._busy_s() - self._busy0) - (self._own_s() - self._own0)) / wall if wall > 0 else 0.0


def release_freed_memory() -> None:
    """``gc.collect()`` then glibc's ``malloc_trim(0)``: memory freed into the malloc heap by earlier runs
    stays resident, and a later allocation reusing it adds nothing to RSS, so each run's memory deltas
    start from a clean heap. No-op where there is no glibc."""
    gc.collect()
    trim_malloc()


def json_safe(x: Any) -> Any:
    """NaN and infinities become null, so the file is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def write_results(out_dir: Path, results: dict[str, Any], rows: Iterable[dict[str, Any]], fields: Sequence[str]) -> None:
    """``results.json`` (everything) and ``results.csv`` (one line per row, ``fields`` as columns), atomically."""
    data = json.dumps(json_safe(results), indent=1, allow_nan=False).encode()
    write_atomic(out_dir / "results.json", lambda f: f.write(data))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    text = buf.getvalue().encode()
    write_atomic(out_dir / "results.csv", lambda f: f.write(text))


def begin_run(threads: int, out: str | Path) -> tuple[Path, dict[str, Any], "OtherCpu"]:
    """Every benchmark's start: torch threads, the output directory, the hardware line printed, and the other
    processes' CPU use probed before the run (then measured again from zero over the run)."""
    torch.set_num_threads(threads)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    hw = hardware()
    print(f"hardware: {hw['cpu']}, {hw['cores']} cores, torch {hw['torch']} with {hw['torch_threads']} thread(s), "
          f"Python {hw['python']}", flush=True)
    other = OtherCpu().start()
    time.sleep(OTHER_CPU_PROBE_S)
    hw["other_cpu_cores_before"] = other.cores()
    other.start()
    print(f"other processes used {hw['other_cpu_cores_before']:.2f} cores before the run", flush=True)
    return out_dir, hw, other
