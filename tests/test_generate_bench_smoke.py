"""Smoke test of ``benchmarks/generate_speedups.py --quick``, and its PSNR/SSIM helpers.

Only the shape of the results is checked (every row present, numbers finite, model calls as the settings imply,
ledger under budget): timings and speedups are measurements, never test assertions.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmark_modules import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "generate_speedups.py"
TIMEOUT_S = 240
ROWS = ("baseline", "lpl3", "lpl-dynamic", "tdtm3", "tdtm6", "lpl3+tdtm3+ci-dl", "baseline-resident")
FINITE = ("stdit_wall_s", "stdit_wall_s_per_call", "speedup", "stdit_stage_s", "generate_s", "ssim")
STREAMED_ONLY = ("peak_ledger_bytes", "budget", "stdit_load_s", "stdit_stall_s", "stdit_bytes_loaded")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("generate_speedups")


def test_ssim_and_psnr(bench):
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 3, 32, 32, generator=g, dtype=torch.float64)
    assert bench.ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    assert math.isinf(bench.psnr(a, a))
    b = (a + 0.1).clamp(0, 1)
    assert bench.psnr(a, b) == pytest.approx(10 * math.log10(1 / float((a - b).pow(2).mean())))
    noisy = (a + 0.2 * torch.randn(a.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    assert bench.ssim(a, b) > bench.ssim(a, noisy) > 0
    assert bench.ssim(a, noisy) == pytest.approx(bench.ssim(noisy, a))  # symmetric
    # a constant shift of a constant image: only the luminance term, (2 m1 m2 + C1) / (m1^2 + m2^2 + C1)
    c1 = 0.01 ** 2
    x, y = torch.full((1, 1, 16, 16), 0.3, dtype=torch.float64), torch.full((1, 1, 16, 16), 0.5, dtype=torch.float64)
    assert bench.ssim(x, y) == pytest.approx((2 * 0.3 * 0.5 + c1) / (0.3 ** 2 + 0.5 ** 2 + c1))
    w = bench.gaussian_window()
    assert w.shape == (11, 11) and float(w.sum()) == pytest.approx(1.0) and w[5, 5] == w.max()
    video = torch.zeros(3, 2, 16, 16)  # [-1, 1] -> [0, 1], frames first
    assert bench.to_unit(video).shape == (2, 3, 16, 16) and float(bench.to_unit(video).max()) == 0.5


def test_generate_speedups_quick_writes_results(tmp_path):
    out = tmp_path / "generate"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--weights", str(tmp_path / "w")],
                          cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"generate_speedups.py --quick failed:\n{proc.stdout}\n{proc.stderr}"
    assert "speedup" in proc.stdout and "random weights" in proc.stdout, proc.stdout

    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    cfg = results["config"]
    assert cfg["steps"] == 6 and cfg["fixed_leap_at"] == 2 and cfg["merge"] == 3
    assert list(rows) == list(ROWS)
    for name, m in rows.items():
        for key in FINITE:
            assert _finite(m[key]), f"{name}.{key} = {m[key]!r}"
        assert m["stdit_wall_s"] > 0 and 0 < m["ssim"] <= 1 + 1e-9
        assert m["identical"] or _finite(m["psnr_db"]), f"{name}: psnr {m['psnr_db']!r} for a different video"
        if m["stream"]:
            for key in STREAMED_ONLY:
                assert _finite(m[key]), f"{name}.{key} = {m[key]!r}"
            assert 0 < m["peak_ledger_bytes"] <= m["budget"]
    assert rows["baseline"]["speedup"] == 1.0 and rows["baseline"]["identical"]
    assert rows["baseline-resident"]["identical"] and not rows["baseline-resident"]["stream"]
    assert rows["baseline"]["model_calls"] == 6 and rows["lpl3"]["model_calls"] == 3
    assert rows["lpl3"]["leapt_at"] == 2 and rows["lpl3+tdtm3+ci-dl"]["model_calls"] == 3
    assert rows["tdtm3"]["merged_calls"] == 3 and rows["tdtm6"]["merged_calls"] == 6

    with open(out / "results.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["row"] for r in csv_rows] == list(ROWS)
    assert all(r["stdit_wall_s"] and math.isfinite(float(r["stdit_wall_s"])) for r in csv_rows)
