"""benchmarks/quality.py --quick end to end: every setting runs, is judged, and the files are written."""

from __future__ import annotations

import json

from benchmark_modules import load_benchmark


def test_quality_benchmark_quick(tmp_path, capsys):
    quality = load_benchmark("quality")
    assert quality.main(["--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "target: lpl2 fidelity" in out and ("PASS" in out or "MISS" in out)
    doc = json.loads((tmp_path / "results.json").read_text())
    rows = doc["rows"]
    assert set(rows) == {"steps30", "lpl2", "tdtm2", "steps2"}
    assert rows["steps30"]["ssim"] == 1.0 and rows["lpl2"]["model_calls"] == 2 and rows["steps2"]["model_calls"] == 2
    assert all(0.0 <= r["fidelity"] <= 1.0 for r in rows.values())
    assert (tmp_path / "quality.md").read_text().startswith("# LPL / TDTM quality")
    assert len((tmp_path / "results.csv").read_text().splitlines()) == 5
