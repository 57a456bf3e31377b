"""The full-scale benchmark's code path on tiny models, its budget checks, and the results page generator."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest

from benchmark_modules import load_benchmark
from blockrt.profile import Summary

fullscale = load_benchmark("fullscale")
results_page = load_benchmark("results_page")

TINY_ARGS = ["--size", "tiny", "--frames", "1", "--steps", "2", "--lpl", "1", "--aspect", "1:1"]
MEASURES = ("peak_ledger_bytes", "peak_rss_delta", "peak_anon_delta", "peak_file_delta", "bytes_loaded",
            "roofline_ratio", "wall_s", "stage_s", "load_s", "compute_s", "params", "blocks", "passes")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("fullscale")
    out = base / "bench" / "fullscale"
    rc = fullscale.main(TINY_ARGS + ["--cache", str(base / "cache"), "--out", str(out)])
    return rc, out


def test_tiny_run_reports_every_stage_and_the_whole_run(tiny_run):
    rc, out = tiny_run
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    rows = {r["stage"]: r for r in results["rows"]}
    assert list(rows) == [*fullscale.STAGES, "whole"]
    for name, r in rows.items():
        for field in fullscale.FIELDS:
            assert field in r, (name, field)
        for m in MEASURES:
            assert r[m] is not None, (name, m)
        assert r["ledger_ok"] is True and 0 < r["peak_ledger_bytes"] <= r["budget"] == 3_300_000_000
        assert r["bytes_loaded"] > 0 and r["stage_s"] > 0 and r["passes"] >= 1
    whole = rows["whole"]
    assert whole["peak_ledger_bytes"] == max(r["peak_ledger_bytes"] for r in results["rows"])
    assert whole["params"] > sum(rows[s]["params"] for s in ("t5", "stdit3"))  # the VAE encoders count too
    # the whole run also counts each stage's prefetch of its block 0 for a pass that never came
    assert whole["bytes_loaded"] == sum(rows[s]["bytes_loaded"] for s in fullscale.STAGES) + results["stray_prefetch_bytes"]
    assert whole["passes"] == sum(rows[s]["passes"] for s in fullscale.STAGES)
    p = results["process"]
    assert p["rss_within_budget"] is True and p["rss_margin_bytes"] == whole["budget"] - whole["peak_rss_delta"]
    assert p["anon_ok"] is True and p["anon_margin_bytes"] == whole["budget"] - whole["peak_anon_delta"]
    assert p["peak_rss_bytes"] == p["rss_before_bytes"] + whole["peak_rss_delta"]
    assert p["at_rss_peak"]["beyond_ledger"] == p["at_rss_peak"]["rss_delta"] - p["at_rss_peak"]["ledger_bytes"]
    assert results["generate"]["steps_run"] == 1 and results["generate"]["video_shape"][1] == 1
    with open(out / "results.csv", newline="") as f:
        assert [r["stage"] for r in csv.DictReader(f)] == [*fullscale.STAGES, "whole"]
    for name in ("video.mp4", "timeline.png", "trace.json"):
        assert (out / name).stat().st_size > 0, name


def _summary(ledger: int) -> Summary:
    return Summary(passes=1, wall_s=1.0, load_s=0.5, compute_s=1.0, stall_s=0.0, stall_fraction=0.0,
                   roofline_ratio=1.0, bytes_loaded=10, bytes_reused=0, reload_fraction=1.0,
                   peak_ledger_bytes=ledger, budget=100, peak_rss_delta=50, peak_anon_delta=40, peak_file_delta=10)


def test_a_ledger_over_the_budget_is_named_and_fails_the_run(tiny_run, monkeypatch, capsys):
    stage = {"summary": _summary(90), "peak_ledger_bytes": 120, "blocks": 3, "retained": [], "stage_s": 2.0}
    row = fullscale.stage_row("stdit3", stage, {"params": 5, "stream_bytes": 20}, budget=100)
    assert row["peak_ledger_bytes"] == 120 and row["ledger_ok"] is False
    results = json.loads((tiny_run[1] / "results.json").read_text())
    results["rows"][1] = {**results["rows"][1], "peak_ledger_bytes": results["budget_bytes"] + 1, "ledger_ok": False}
    results["process"] = {**results["process"], "rss_within_budget": False}  # clean file pages alone: reported only
    assert [m.split(":")[0] for m in fullscale.failures(results)] == ["stdit3"]
    results["process"] = {**results["process"], "anon_ok": False}
    msgs = fullscale.failures(results)
    assert len(msgs) == 2 and msgs[0].startswith("stdit3: peak ledger") and "whole run: peak anonymous" in msgs[1]
    monkeypatch.setattr(fullscale, "run", lambda args: results)
    assert fullscale.main(TINY_ARGS + ["--out", str(tiny_run[1].parent / "failing")]) == 1
    assert "FAIL: stdit3: peak ledger" in capsys.readouterr().err


# -- the results page ----------------------------------------------------------------------------------------


def _png(path: Path, noisy: bool) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (300, 300, 3), dtype=np.uint8) if noisy else np.zeros((50, 50, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())


def _retention(src: Path) -> None:
    runs = []
    for regime, base in (("load-bound", 0.43), ("balanced", 0.42)):
        for i, budget in enumerate((105e6, 400e6, 700e6)):
            runs.append({"regime": regime, "mode": "retention", "budget": budget, "retained_blocks": 4 * i,
                         "blocks": 12, "wall_s_per_pass": base / (1 + i), "wall_vs_no_retention": 1 / (1 + i),
                         "roofline_ratio": 1.02, "prediction_error_pct": 1.0, "rebased_error_pct": -1.0,
                         "predicted_s_per_pass": base / (1 + i) * 1.01, "peak_ledger_bytes": budget - 1e6,
                         "peak_anon_delta": budget})
    data = {"hardware": {"cpu": "Test CPU", "cores": 2, "torch_threads": 1, "torch": "x", "python": "3",
                         "platform": "p", "other_cpu_cores_during": 0.0},
            "config": {"dim": 64, "blocks": 12, "block_bytes": 5e7, "read_bytes_per_s": 1.45e9, "passes": 10,
                       "steady_from_pass": 3, "tokens": {"load-bound": 24, "balanced": 92}},
            "baselines": {"load-bound": {"wall_s_per_pass": 0.43}, "balanced": {"wall_s_per_pass": 0.42}},
            "runs": runs, "targets": [{"name": "max |error|", "value": 1.0, "target": "<= 15", "pass": True}]}
    src.mkdir(parents=True)
    (src / "results.json").write_text(json.dumps(data))
    _png(src / "timeline_load-bound_half.png", noisy=False)


def test_page_of_an_empty_tree_names_every_section_as_not_measured(tmp_path):
    (tmp_path / "bench").mkdir()
    text = results_page.build_page(tmp_path / "bench", tmp_path / "docs")
    assert (tmp_path / "docs" / "benchmarks.md").read_text() == text
    for s in results_page.SECTIONS:
        assert f"## {s.title}" in text
    assert text.count("*Not measured") == len(results_page.SECTIONS)
    assert not (tmp_path / "docs" / "img").exists()


def test_page_renders_present_sections_and_skips_absent_ones(tmp_path, tiny_run):
    bench, docs = tmp_path / "bench", tmp_path / "docs"
    shutil.copytree(tiny_run[1], bench / "fullscale")
    _retention(bench / "retention")
    (bench / "peers").mkdir()
    (bench / "peers" / "results.csv").write_text("contender,wall_s,peak_rss_delta\naccelerate,10.5,1190000000\n"
                                                 "blockrt,7.7,350000000\n")
    _png(bench / "peers" / "timeline_big.png", noisy=True)
    assert (bench / "peers" / "timeline_big.png").stat().st_size > results_page.MAX_PNG_BYTES
    (bench / "storage").mkdir()
    (bench / "storage" / "storage.md").write_text("# Storage dtypes\n\n## T5 int8\n\n| dtype | cos |\n|---|---|\n"
                                                  "| int8 | 0.999 |\n")
    (bench / "storage" / "results.json").write_text(json.dumps({"targets": [{"name": "t", "value_text": "1", "verdict": "PASS"}]}))
    (bench / "newbench").mkdir()  # a benchmark the page does not know: a section of its own, its CSV whole
    (bench / "newbench" / "results.json").write_text(json.dumps({"hardware": {"cpu": "Other CPU"}}))
    (bench / "newbench" / "results.csv").write_text("x,store_bytes\n1,2000000\n")
    (bench / "results.json").write_text(json.dumps({"hardware": {"cpu": "Test CPU"}, "unexpected": 1}))
    (bench / "results.csv").write_text("mode,wall_s_per_pass\nprefetch,0.5\n")  # overlap in a format it does not know

    text = results_page.build_page(bench, docs)
    sections = {s.key: text.split(f"## {s.title}")[1].split("\n## ")[0] for s in results_page.SECTIONS}
    fs = sections["fullscale"]
    for stage in (*fullscale.STAGES, "whole"):
        assert f"| {stage} |" in fs
    assert "Not measured" not in fs and "![whole-run timeline](img/fullscale_timeline.png)" in fs
    ret = sections["retention"]
    assert "| load-bound | retention | 400 | 4/12 |" in ret and "max \\|error\\|" in ret and "Test CPU" in ret
    assert "img/retention_wall_vs_budget.png" in ret
    assert "| accelerate | 10.5 | 1190 |" in sections["peers"] and "peak_rss_delta (MB)" in sections["peers"]
    assert "format is not the one this page knows" in sections["overlap"] and "| prefetch | 0.5 |" in sections["overlap"]
    st = sections["storage"]
    assert "#### T5 int8" in st and "| int8 | 0.999 |" in st and "Storage dtypes" not in st and "Targets" not in st
    for key in ("generate", "stdit3", "coreml"):
        assert "*Not measured" in sections[key], key
    imgs = {p.name: p.stat().st_size for p in (docs / "img").iterdir()}
    assert {"fullscale_timeline.png", "retention_wall_vs_budget.png", "retention_timeline_load-bound_half.png",
            "peers_timeline_big.png"} <= set(imgs)
    assert all(size <= results_page.MAX_PNG_BYTES for size in imgs.values()), imgs
    other = text.split("## Other outputs: `newbench`")[1]
    assert "Other CPU" in other and "| 1 | 2 |" in other and "store_bytes (MB)" in other
    assert results_page.build_page(bench, docs) == text  # no timestamps: regenerating changes nothing


def test_results_page_keeps_the_sections_it_has_no_outputs_for(tmp_path):
    """``out/`` does not travel between machines: a rerun of one benchmark replaces only its own section."""
    docs, first, second = tmp_path / "docs", tmp_path / "first", tmp_path / "second"
    for bench, value in ((first, "1.5"), (second, "2.5")):
        (bench / "storage").mkdir(parents=True)
        (bench / "storage" / "storage.md").write_text(f"# Storage\n\n| storage | cosine |\n|---|---|\n| int8 | {value} |\n")
        (bench / "storage" / "results.json").write_text("{}")
    (first / "decode").mkdir()
    (first / "decode" / "decode.md").write_text("# Decode\n\n| contender | tok/s |\n|---|---|\n| blockrt | 9.5 |\n")
    (first / "decode" / "results.json").write_text("{}")
    (first / "oldbench").mkdir()
    (first / "oldbench" / "results.json").write_text(json.dumps({"hardware": {"cpu": "Old CPU"}}))
    (first / "oldbench" / "results.csv").write_text("x\n7\n")
    results_page.build_page(first, docs)
    text = results_page.build_page(second, docs)
    assert "| int8 | 2.5 |" in text and "| int8 | 1.5 |" not in text  # rerun: replaced
    assert "| blockrt | 9.5 |" in text  # not rerun: kept
    assert "## Other outputs: `oldbench`" in text and "| 7 |" in text
    dropped = results_page.build_page(second, docs, keep=False)
    assert "| blockrt | 9.5 |" not in dropped and "oldbench" not in dropped
