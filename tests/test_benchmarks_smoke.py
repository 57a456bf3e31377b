"""Smoke test of ``benchmarks/overlap.py --quick``: it runs end to end and writes sane results.

Only the shape of the results is checked (modes present, numbers finite, ledger under budget): timings and
the issue's targets are measurements, never test assertions.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "overlap.py"
TIMEOUT_S = 120
MODES = ("resident", "sequential", "prefetch")
TIMED = ("wall_s", "wall_s_per_pass", "load_s", "compute_s", "stall_s", "stall_fraction", "roofline_ratio")
STREAMED_ONLY = ("peak_ledger_bytes", "budget", "bytes_loaded_per_pass")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_overlap_quick_writes_results(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"overlap.py --quick failed:\n{proc.stdout}\n{proc.stderr}"
    assert "roofline" in proc.stdout and ("PASS" in proc.stdout or "MISS" in proc.stdout), proc.stdout

    results = json.loads((out / "results.json").read_text())
    modes = results["modes"]
    for name in MODES:
        assert name in modes, f"mode {name!r} missing from results.json: {sorted(modes)}"
        for key in TIMED:
            assert _finite(modes[name][key]), f"{name}.{key} = {modes[name][key]!r}"
        assert modes[name]["wall_s"] > 0 and modes[name]["compute_s"] > 0
    for name in MODES[1:]:
        m = modes[name]
        for key in STREAMED_ONLY:
            assert _finite(m[key]), f"{name}.{key} = {m[key]!r}"
        assert m["load_s"] > 0 and m["bytes_loaded_per_pass"] > 0
        assert 0 < m["peak_ledger_bytes"] <= m["budget"]
    assert modes["sequential"]["prefetch_depth"] == 0 and modes["prefetch"]["prefetch_depth"] == 1
    assert all(_finite(v) and v > 0 for v in results["speedups"].values())
    assert _finite(results["config"]["read_bytes_per_s"])
    assert {t["name"] for t in results["targets"]} and all(isinstance(t["pass"], bool) for t in results["targets"])

    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["mode"] for r in rows} >= set(MODES)
    assert (out / "trace_prefetch.json").stat().st_size > 0
    assert (out / "timeline_prefetch.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
