"""``benchmarks/gpu_check.sh`` is valid bash; (slow) it refuses to pretend on a machine without CUDA, and its Flux
part runs end to end on the CPU in its dry mode (diffusers' import and a tiny Flux, three ways)."""

from __future__ import annotations

import json
import os
import sys
import subprocess
from pathlib import Path

import pytest
import torch

from benchmark_modules import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def test_the_script_is_valid_bash():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow  # imports torch, transformers, accelerate and diffusers in a fresh process: ~20 s when quiet
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_it_asks_for_the_dry_run(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 1 and "--dry-run" in proc.stdout, proc.stdout + proc.stderr
    assert "no CUDA device" in (tmp_path / "summary.txt").read_text()


@pytest.mark.slow
def test_the_flux_part_runs_dry(tmp_path):
    assert load_benchmark("gpu_flux").main(["--dry-run", "--steps", "1", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "flux.json").read_text())
    assert set(res["rows"]) == {"resident", "blockrt", "diffusers"}
    for name, row in res["rows"].items():
        assert "error" not in row, f"{name}: {row.get('error')}"
        assert row["max_abs_vs_resident"] == 0.0  # the same maths on the CPU
    assert res["blockrt_vs_resident"] > 0 and res["diffusers_over_blockrt"] > 0
