"""Smoke test of ``benchmarks/decode.py``: the smallest config (a 2-layer Llama, batch 1, 4 new tokens), contenders
in this process; blockrt's tokens and logits equal the resident model's, int4's rows (widened and packed) are
measured and reported, the packed row's agreement with the widened one's tokens too. Timings are measured, never
asserted."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmark_modules import load_benchmark

pytestmark = pytest.mark.timeout(300)


@pytest.fixture()
def decode_module():
    threads = torch.get_num_threads()
    try:
        yield load_benchmark("decode")
    finally:
        torch.set_num_threads(threads)  # the workers set the process's thread count


def test_decode_smallest_config_runs_and_matches_resident(tmp_path, decode_module):
    out = tmp_path / "out"
    rc = decode_module.main(["--size", "tiny", "--batches", "1", "--budgets", "100", "--regimes", "warm",
                             "--new-tokens", "4", "--threads", "1", "--in-process",
                             "--contenders", "resident,blockrt_sequential,blockrt,blockrt_mapped,blockrt_int4,blockrt_int4_packed",
                             "--cache", str(tmp_path / "weights"), "--out", str(out)])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    rows = {r["contender"]: r for r in results["rows"]}
    assert set(rows) == {"resident", "blockrt_sequential", "blockrt", "blockrt_mapped", "blockrt_int4",
                         "blockrt_int4_packed"}
    for name, r in rows.items():
        assert r["error"] is None, f"{name}: {r['error']}"
        assert r["tokens_per_s"] > 0 and r["peak_rss"] is not None
    for name in ("resident", "blockrt_sequential", "blockrt", "blockrt_mapped"):
        assert rows[name]["tokens_equal"], name
        assert rows[name]["logits_max_abs"] < 1e-5, rows[name]  # the same maths (equal but for kernel choice)
    assert rows["blockrt_sequential"]["bytes_per_step"] > 0  # it streams every block each step
    limit = rows["blockrt_sequential"]["limit_tokens_per_s"]
    assert limit is None or limit > 0
    int4 = rows["blockrt_int4"]
    assert int4["bytes_per_step"] < rows["blockrt_sequential"]["bytes_per_step"] / 4  # a quarter or less is read
    assert math.isfinite(int4["logits_max_abs"])  # lossy: reported, not required equal
    packed = rows["blockrt_int4_packed"]
    assert packed["bytes_per_step"] <= int4["bytes_per_step"]  # the same bytes stored, in the kernel's order
    assert math.isfinite(packed["logits_max_abs"]) and 0.0 <= packed["agree_widened"] <= 1.0
    assert int4.get("agree_widened") is None and "agree" in (out / "decode.md").read_text()
    assert (out / "results.csv").is_file() and "blockrt_int4" in (out / "decode.md").read_text()
    table = (out / "decode.md").read_text()
    (out / "decode.md").unlink()
    assert decode_module.main(["--report", "--out", str(out)]) == 0  # the tables rebuilt from results.json alone
    assert (out / "decode.md").read_text() == table


def test_targets_compare_blockrt_with_the_best_peer(decode_module):
    def row(name, tps, anon, limit=None):
        return {"regime": "cold", "budget_share": 50, "batch": 1, "contender": name, "tokens_per_s": tps,
                "peak_anon": anon, "peak_file": 0, "of_limit": limit, "budget_bytes": 100e6}
    text = decode_module.targets([row("resident", 50.0, 40e6), row("accelerate_device_map", 4.0, 50e6),
                                  row("diffusers_group_offload", 5.0, 60e6), row("blockrt", 9.0, 90e6, 0.9),
                                  row("blockrt_mapped", 10.0, 20e6, 0.95), row("blockrt_int4", 25.0, 120e6, 0.5),
                                  row("blockrt_int4_packed", 30.0, 200e6)])
    line = text.splitlines()[1]
    assert "best peer diffusers_group_offload 5.0 tok/s" in line
    assert "blockrt_mapped x2.00" in line and "blockrt_int4_packed x6.00" in line
    # anonymous memory counted above the resident model's (its weights are file-backed): 90 - 40 within 100 MB
    assert "blockrt of limit 0.90, anon +50 MB within" in line and "blockrt_int4 of limit 0.50, anon +80 MB within" in line
    assert "blockrt_mapped of limit 0.95, anon -20 MB within" in line
    assert "blockrt_int4_packed of limit -, anon +160 MB OVER budget" in line
