"""benchmarks/quality.py --quick end to end: every setting runs, is judged, and the files are written."""

from __future__ import annotations

import json

from benchmark_modules import load_benchmark


def test_quality_benchmark_quick(tmp_path, capsys):
    quality = load_benchmark("quality")
    assert quality.main(["--quick", "--out", str(tmp_path)]) == 0  # settings video by video in turn (the default)
    out = capsys.readouterr().out
    assert "target: lpl2 fidelity" in out and ("PASS" in out or "MISS" in out)
    doc = json.loads((tmp_path / "results.json").read_text())
    rows = doc["rows"]
    assert set(rows) == {"steps30", "lpl2", "tdtm2", "steps2"}
    assert rows["steps30"]["ssim"] == 1.0 and rows["lpl2"]["model_calls"] == 2 and rows["steps2"]["model_calls"] == 2
    assert all(0.0 <= r["fidelity"] <= 1.0 for r in rows.values())
    assert (tmp_path / "quality.md").read_text().startswith("# LPL / TDTM quality")
    assert len((tmp_path / "results.csv").read_text().splitlines()) == 5
    assert doc["config"]["interleave"] is True
    # row after row (each setting's videos in one go): the same videos, so the same scores
    assert quality.main(["--quick", "--no-interleave", "--out", str(tmp_path / "by_row")]) == 0
    again = json.loads((tmp_path / "by_row" / "results.json").read_text())
    assert again["config"]["interleave"] is False
    again = again["rows"]
    for name, row in rows.items():
        assert {k: again[name][k] for k in ("matches", "ssim", "psnr_db", "model_calls")} == \
            {k: row[k] for k in ("matches", "ssim", "psnr_db", "model_calls")}, name


def test_tdtm_rows_and_target():
    """TDTM row names parse to their variant; the TDTM target takes the fastest row within 3 points of steps30's
    fidelity with SSIM >= 0.90 and a speedup, and says MISS when none is."""
    quality = load_benchmark("quality")
    s = quality.tdtm_setting("tdtm20-centre-spatial-last")
    assert (s.merge_steps, s.merge_positions, s.merge_blocks, s.merge_when) == (20, "centre", "spatial", "last")
    s = quality.tdtm_setting("tdtm10")
    assert (s.merge_steps, s.merge_positions, s.merge_blocks, s.merge_when) == (10, "index", "all", "first")
    assert quality.tdtm_setting("tdtm31") is None and quality.tdtm_setting("tdtm10-middle") is None
    assert quality.parse_args(["--rows", "tdtm7-centre"]).rows == ["tdtm7-centre"]
    lpl, naive = quality.named_setting("lpl10"), quality.named_setting("steps25")  # rows outside the default table
    assert (lpl.lpl, lpl.steps, naive.lpl, naive.steps) == (10, 30, None, 25)
    assert quality.named_setting("lpl31") is None and quality.named_setting("steps0") is None
    assert quality.parse_args(["--rows", "lpl10,steps25"]).rows == ["lpl10", "steps25"]
    rows = [quality.Setting("steps30"), quality.tdtm_setting("tdtm10"), quality.tdtm_setting("tdtm30-centre"),
            quality.tdtm_setting("tdtm10-last")]

    def res(fid, ssim, speedup):
        return {"fidelity": fid, "ssim": ssim, "speedup": speedup}

    results = {"steps30": res(0.90, 1.0, 1.0), "tdtm10": res(0.80, 0.95, 1.05), "tdtm30-centre": res(0.88, 0.91, 1.2),
               "tdtm10-last": res(0.90, 0.99, 1.1)}
    ok, text = quality.tdtm_target(results, rows)
    assert ok and "PASS" in text and "row tdtm30-centre" in text and "passing: tdtm30-centre, tdtm10-last" in text
    results["tdtm30-centre"]["ssim"] = 0.89
    results["tdtm10-last"]["speedup"] = 0.99
    ok, text = quality.tdtm_target(results, rows)
    assert not ok and "MISS" in text and "closest (best SSIM) row tdtm10-last:" in text
