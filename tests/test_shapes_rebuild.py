"""The one command that rebuilds the shipped shapes weights: its chain is the five recorded runs, linked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blockrt.pipelines.shapes import layout, rebuild
from blockrt.pipelines.shapes.train import LR, parse_args

RECORDS = ["training-run1.json", "training-run2.json", "training-run3.json", "training-run4.json", layout.RECORD]
PATHS = {"out", "work", "init_stdit3", "init_vae"}


DEFAULTS = vars(parse_args(["--out", "unused"]))


def _chain(tmp_path: Path) -> dict[str, list[str]]:
    return rebuild.commands(tmp_path / "o", tmp_path / "w", tmp_path / "base.safetensors", threads=2)


def test_chain_repeats_the_shipped_runs(tmp_path):
    for (name, cmd), record in zip(_chain(tmp_path).items(), RECORDS, strict=True):
        shipped = json.loads((layout.WEIGHTS_DIR / record).read_text())["args"]
        got = vars(parse_args(cmd))
        differ = {k for k in got if k in shipped and got[k] != shipped[k]} - PATHS
        later = {k: got[k] for k in got if k not in shipped}  # options added after the run: at their defaults
        assert later == {k: v for k, v in DEFAULTS.items() if k in later}, f"{name}: {later}"
        if shipped.get("lr") is None:  # recorded before --lr existed: the default then, 5e-4
            assert got["lr"] == LR == 5e-4
            differ.discard("lr")
        if name == "run1":  # ran with --steps 12000, stopped at 3750 (constant learning rate after the warm-up)
            assert (shipped["steps"], got["steps"], shipped["cosine"]) == (12000, 3750, False)
            differ.discard("steps")
        assert not differ, f"{name}: {sorted(differ)}"


def test_each_run_starts_from_the_one_before(tmp_path):
    chain = {name: vars(parse_args(cmd)) for name, cmd in _chain(tmp_path).items()}
    assert chain["run1"]["init_stdit3"] == str(tmp_path / "base.safetensors") and chain["run1"]["init_vae"] is None
    for prev, name in [("run1", "run2"), ("run2", "run3"), ("run3", "run4"), ("run4", "run5")]:
        assert chain[name]["init_stdit3"] == str(Path(chain[prev]["out"]) / rebuild.STDIT3_FILE)
    assert chain["run2"]["init_vae"] is None  # reuses run 1's VAE through the shared work directory
    assert chain["run3"]["init_vae"] == chain["run2"]["out"] and chain["run4"]["init_vae"] == chain["run3"]["out"]
    assert chain["run5"]["init_vae"] == chain["run4"]["out"] and chain["run5"]["refine_vae"] == 2000
    assert len({a["work"] for a in chain.values()}) == 1


def test_base_is_checked(tmp_path):
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"not the model")
    with pytest.raises(SystemExit, match=r"expected the first shipped model's STDiT3 .*git show fab901c"):
        rebuild.check_base(other)


def test_base_comes_from_git_history(tmp_path):
    try:
        got = rebuild.fetch_base(tmp_path / "base.safetensors")
    except SystemExit as e:  # a shallow clone or no git: the message says what to pass instead
        assert "--base FILE" in str(e)
        pytest.skip(f"git history not readable here: {e}")
    rebuild.check_base(got)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors"]  # no temporary left


def test_finished_needs_the_same_arguments_and_the_last_step(tmp_path):
    cmd = _chain(tmp_path)["run2"]
    run_dir = tmp_path / "o" / "run2"
    assert not rebuild.finished(run_dir, cmd)
    run_dir.mkdir(parents=True)
    args = vars(parse_args(cmd))
    (run_dir / layout.RECORD).write_text(json.dumps({"args": args, "stdit3_steps_saved": args["steps"]}))
    assert rebuild.finished(run_dir, cmd)
    (run_dir / layout.RECORD).write_text(json.dumps({"args": args, "stdit3_steps_saved": 250}))  # stopped early
    assert not rebuild.finished(run_dir, cmd)
    assert not rebuild.finished(run_dir, [*cmd, "--lr", "1e-4"])


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_smoke_chain_runs_and_resumes(tmp_path, capsys):
    """The whole chain at a few steps a stage (about 5 minutes on 2 cores), then a rerun that skips every run."""
    out = tmp_path / "rb"
    assert rebuild.main(["--out", str(out), "--smoke"]) == 0
    final = out / "weights"
    assert sorted(p.name for p in final.glob("training-*.json")) == [f"training-run{k}.json" for k in (1, 2, 3, 4, 5)]
    assert (final / rebuild.STDIT3_FILE).exists() and "## Run 5" in (final / "TRAINING.md").read_text()
    stamp = (out / "run5" / layout.RECORD).stat().st_mtime_ns
    assert rebuild.main(["--out", str(out), "--smoke"]) == 0
    assert (out / "run5" / layout.RECORD).stat().st_mtime_ns == stamp
