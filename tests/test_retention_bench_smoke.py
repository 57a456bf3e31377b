"""Smoke test of ``benchmarks/retention.py --quick``: it runs end to end and writes sane results.

Only the shape of the results is checked (both regimes, every budget and the no-retention baseline present,
numbers finite, ledger under budget, every block loaded or reused each pass): timings, the prediction error and the issue's targets
are measurements, never test assertions.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "retention.py"
TIMEOUT_S = 120
REGIMES = ("load-bound", "balanced")
FINITE = ("wall_s_per_pass", "predicted_s_per_pass", "prediction_error_pct", "wall_vs_no_retention",
          "load_s_per_pass", "compute_s_per_pass", "stall_fraction", "roofline_ratio", "bytes_loaded_per_pass",
          "bytes_reused_per_pass", "peak_ledger_bytes", "budget", "read_bytes_per_s")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_retention_quick_writes_results(tmp_path):
    out = tmp_path / "retention"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"retention.py --quick failed:\n{proc.stdout}\n{proc.stderr}"
    assert "roofline" in proc.stdout and ("PASS" in proc.stdout or "MISS" in proc.stdout), proc.stdout

    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    passes = results["config"]["passes"]
    steady = passes - results["config"]["steady_from_pass"]
    for regime in REGIMES:
        ret = [r for r in runs if r["regime"] == regime and r["mode"] == "retention"]
        none = [r for r in runs if r["regime"] == regime and r["mode"] == "none"]
        assert len(ret) >= 2 and len(none) == 2, f"{regime}: {[(r['mode'], r['budget']) for r in runs]}"
        assert any(r["budget_fraction"] == 0.5 for r in ret)
        assert ret[-1]["retained_blocks"] == ret[-1]["blocks"], "the largest budget should hold every block"
        assert all(r["retained_blocks"] == 0 and r["bytes_reused_per_pass"] == 0 for r in none)
        for r in ret + none:
            for key in FINITE:
                assert _finite(r[key]), f"{regime} {r['mode']} {r['budget']}: {key} = {r[key]!r}"
            assert r["wall_s_per_pass"] > 0 and r["compute_s_per_pass"] > 0
            assert 0 < r["peak_ledger_bytes"] <= r["budget"]
            assert r["steady_passes"] == steady and len(r["wall_s_each_pass"]) == passes
            assert r["peak_rss_delta"] is None or r["peak_rss_delta"] >= 0
        # every block is either loaded or reused each steady pass
        streamed = ret[0]["bytes_loaded_per_pass"] + ret[0]["bytes_reused_per_pass"]
        assert all(r["bytes_loaded_per_pass"] + r["bytes_reused_per_pass"] == streamed for r in ret + none)
    assert _finite(results["config"]["read_bytes_per_s"])
    assert results["targets"] and all(isinstance(t["pass"], bool) for t in results["targets"])

    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(runs) and {r["regime"] for r in rows} == set(REGIMES)
    assert all(math.isfinite(float(r["wall_s_per_pass"])) for r in rows)
    assert (out / "retention.png").read_bytes()[:8] == PNG_MAGIC
    assert all((out / f"timeline_{regime}_half.png").read_bytes()[:8] == PNG_MAGIC for regime in REGIMES)
    assert all((out / f"trace_{regime}_half.json").stat().st_size > 0 for regime in REGIMES)
