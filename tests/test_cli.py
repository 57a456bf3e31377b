"""The command line: `blockrt demo` and `blockrt plan` end to end (small sizes)."""

from __future__ import annotations

import json
import time

import pytest

from blockrt.pipelines.cli import main


def test_demo_writes_trace_and_timeline(tmp_path, capsys):
    rc = main(["demo", "--out", str(tmp_path), "--layers", "4", "--dim", "128", "--tokens", "32", "--passes", "4",
               "--budget", "8MB"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "outputs identical to the plain model (torch.equal): yes" in out
    assert "roofline_ratio" in out and "retain" in out
    trace = json.loads((tmp_path / "trace.json").read_text())
    assert any(e.get("cat") == "load" for e in trace["traceEvents"])
    assert (tmp_path / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_prints_a_budget_sweep(capsys):
    assert main(["plan", "--layers", "4", "--dim", "128", "--tokens", "32", "--points", "3"]) == 0
    out = capsys.readouterr().out
    assert "sequential" in out and "+ retention" in out
    assert len([line for line in out.splitlines() if line.strip().endswith("blocks")]) == 3


def test_bad_arguments_are_clear_errors_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default --out is relative: nothing may appear here
    assert main(["plan", "--profile", "iphone99"]) == 2
    assert "known profiles" in capsys.readouterr().err
    assert main(["demo", "--budget", "3.3 gigs"]) == 2
    assert "budget must be" in capsys.readouterr().err
    for bad in (["--budget", "3.3 gigs"], ["--device-profile", "iphone99"], ["--lpl", "31"],
                ["--resolution", "1080p"], ["--prompts", "nofile.txt"], ["--weights", "nodir"]):
        t0 = time.perf_counter()
        assert main(["generate", *bad]) == 2, bad
        err = capsys.readouterr().err
        assert err.startswith("blockrt: error: ") and err.count("\n") == 1 and "Traceback" not in err, (bad, err)
        assert time.perf_counter() - t0 < 5, bad  # refused before any model is loaded
    assert list(tmp_path.iterdir()) == []


def test_version_and_missing_extras(monkeypatch, capsys):
    import importlib.util

    import blockrt

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"blockrt {blockrt.__version__}"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "av" else real(name, *a))
    assert main(["generate", "--out", "unused"]) == 2
    err = capsys.readouterr().err
    assert "needs av" in err and "pip install 'blockrt[video]'" in err


def test_prompts_file_json_and_warnings(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two prompts\na red circle moving left on a blue background\n\na purple cow\n")
    rc = main(["generate", "--prompts", str(prompts), "--out", str(tmp_path / "out"), "--steps", "2", "--frames", "1",
               "--json", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    records = json.loads(captured.out)  # stdout is the JSON document alone
    assert [r["prompt"] for r in records] == ["a red circle moving left on a blue background", "a purple cow"]
    assert all(r["model_calls"] == 2 and r["summary"]["peak_ledger_bytes"] <= r["budget"] for r in records)
    assert set(records[0]["stages"]) == {"t5", "stdit3", "vae_temporal", "vae_spatial"}
    assert "'a purple cow' is not a caption the built-in shapes model was trained on" in captured.err
    for i in range(2):
        assert (tmp_path / "out" / f"prompt-{i:03d}" / "video.mp4").stat().st_size > 0
    assert main(["generate", "--prompts", str(prompts), "--prompt", "x"]) == 2


def test_progress_lines_in_a_log_stay_few(capsys):
    import io

    from blockrt.pipelines.progress import StageProgress

    log = io.StringIO()
    p = StageProgress(stream=log)
    for done in range(31):
        p("denoising", done, 30)
    p("VAE decode", 0, 2)
    p.close()
    lines = log.getvalue().splitlines()
    assert lines[0] == "denoising: started (30 units)" and lines[-1].startswith("VAE decode: done in")
    assert len(lines) <= 8, lines
    quiet = io.StringIO()
    StageProgress(enabled=False, stream=quiet)("denoising", 1, 2)
    assert quiet.getvalue() == ""


def test_generate_with_random_weights(tmp_path, capsys):
    rc = main(["generate", "--random-weights", "--cache", str(tmp_path / "weights"), "--out", str(tmp_path / "out"),
               "--steps", "3", "--lpl", "2", "--tdtm", "1", "--tdtm-positions", "centre", "--tdtm-blocks", "spatial",
               "--resolution", "144p", "--aspect", "1:1", "--trace"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "RANDOM weights" in out and "TDTM for 1 steps (centre, spatial)" in out
    assert "3 STDiT3 calls" not in out and "2 STDiT3 calls (LPL: leapt after call 2)" in out and "whole run: peak_ledger_bytes" in out
    for name in ("video.mp4", "trace.json", "timeline.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert main(["generate", "--random-weights", "--cache", str(tmp_path / "weights"), "--out", str(tmp_path / "o2"),
                 "--steps", "2", "--lpl", "5"]) == 2
    assert "lpl" in capsys.readouterr().err
    assert main(["generate", "--random-weights", "--weights", str(tmp_path)]) == 2
    assert "exclude each other" in capsys.readouterr().err


def test_generate_defaults_to_the_trained_shapes_model(tmp_path, capsys):
    rc = main(["generate", "--out", str(tmp_path / "out"), "--trace"])  # what `make demo` runs
    out = capsys.readouterr().out
    assert rc == 0
    assert "trained here on synthetic shapes" in out and "33 frames at 64x64 1:1, 30 STDiT3 calls" in out
    judged = next(line for line in out.splitlines() if line.startswith("judge: "))
    assert judged.startswith("judge: a red ") and "moving right" in judged and judged.endswith(": matches the prompt")
    assert "whole run: peak_ledger_bytes" in out
    for name in ("video.mp4", "trace.json", "timeline.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0


def _fails_in_one_line(argv, capsys, says):
    """The command line exits 2 (argparse's usage errors too) with a message and no traceback."""
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse: usage line + error line
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, (argv, err)
    assert "Traceback" not in err and says in err, (argv, err)


def test_bad_numbers_and_budgets_are_one_line_errors(tmp_path, capsys):
    _fails_in_one_line(["demo", "--budget", "1KB", "--out", str(tmp_path), "--layers", "2", "--dim", "64",
                        "--tokens", "8"], capsys, "smallest feasible")  # a BudgetError, not a traceback
    _fails_in_one_line(["demo", "--layers", "0"], capsys, "--layers: expected a whole number >= 1")
    _fails_in_one_line(["demo", "--threads", "0"], capsys, "--threads: expected a whole number >= 1")
    _fails_in_one_line(["demo", "--dim", "12", "--out", str(tmp_path)], capsys, "divisible")
    _fails_in_one_line(["generate", "--lpl", "abc"], capsys, "'dynamic'")
    _fails_in_one_line(["generate", "--tdtm-positions", "middle"], capsys, "'centre'")
    _fails_in_one_line(["plan", "--prefetch", "-1"], capsys, "--prefetch: expected a whole number >= 0")


def test_a_wrong_config_json_is_a_one_line_error(tmp_path, capsys):
    weights = tmp_path / "w"
    for sub in ("t5-v1_1-xxl", "OpenSora-STDiT-v3", "OpenSora-VAE-v1.2"):
        (weights / sub).mkdir(parents=True)
        (weights / sub / "config.json").write_text('{"not": "a config"' if sub.startswith("Open") else "[]")
    _fails_in_one_line(["generate", "--weights", str(weights), "--out", str(tmp_path / "o"), "--steps", "2"],
                       capsys, "config.json")
