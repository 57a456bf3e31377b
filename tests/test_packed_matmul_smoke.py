"""Smoke test of ``benchmarks/packed_matmul.py``: it runs end to end on a small shape and writes every figure.

Only the shape of the results is checked (timings finite and positive, errors small): which path is faster is a
measurement, never a test assertion."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "packed_matmul.py"
TIMEOUT_S = 120
TIMED = ("matmul_ms", "widen_ms", "widen_mm_ms", "packed_ms", "widen_gbps", "packed_vs_widen_mm")
MIN_COS = 0.999  # bfloat16 activations against the float32 reference (the script raises below 0.99)


def test_packed_matmul_quick_writes_results(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--shapes", "64x128,32x256", "--batches", "1,3", "--reps", "1",
                           "--group", "64", "--out", str(out)], check=False, cwd=ROOT, capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"packed_matmul.py failed:\n{proc.stdout}\n{proc.stderr}"
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {(r["shape"], r["batch"], r["act"], r["format"]) for r in rows} == {
        (s, b, a, f) for s in ("64x128", "32x256") for b in (1, 3) for a in ("float32", "bfloat16")
        for f in ("int4-g64", "int8")}
    for r in rows:
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in TIMED), r
        assert r["cos"] > MIN_COS and r["widen_mm_cos"] > MIN_COS, r
        if r["act"] == "float32":  # the widened weight is the reference's own: exact
            assert r["widen_mm_max_abs_err"] == 0.0, r
    assert (out / "results.csv").read_text().startswith("shape,batch,act,format,")
    assert "packed / widen+mm" in proc.stdout
