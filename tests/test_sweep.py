"""Sweeps (``pipelines/sweep``): the spec, serial runs that resume and record failures, the report, and on Ray:
two local workers give bit-identical videos to the serial run and survive a worker killed mid-task; a second
local Ray node (slow) runs tasks too. Tasks are 1-frame, 1-step videos of the shipped shapes model (~2 s each)."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time

import psutil
import pytest

from blockrt.pipelines.cli import main
from blockrt.pipelines.sweep.manifest import MANIFEST, Manifest
from blockrt.pipelines.sweep.runner import run_sweep
from blockrt.pipelines.sweep.spec import SweepSpec
from blockrt.pipelines.shapes.layout import WEIGHTS_DIR
from blockrt.pipelines.sweep.task import ATTEMPTS, TASKS

PROMPTS = ["a red circle moving right on a blue background", "a green square moving left on a white background"]
TINY = {"prompts": PROMPTS, "seeds": [0], "frames": 1, "settings": [{"name": "one", "steps": 1}]}
RAY_SHUTDOWN_S = 15.0  # how long Ray's processes may take to exit after ray.shutdown()


def _spec(**changes) -> SweepSpec:
    return SweepSpec.from_dict({**TINY, **changes})


def _shas(run) -> dict[str, str]:
    return {r["id"]: r["frames_sha256"] for r in run.records}


def _no_ray_left() -> list[str]:
    """Ray processes still running below this process after a grace period (empty: clean shutdown)."""
    deadline = time.monotonic() + RAY_SHUTDOWN_S
    while True:
        left = []
        for p in psutil.Process().children(recursive=True):
            try:
                if any(k in " ".join(p.cmdline()) for k in ("ray", "gcs_server", "raylet")):
                    left.append(f"{p.pid} {p.name()}")
            except psutil.Error:
                pass
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def test_spec_checks_its_structure_and_names_tasks_stably(tmp_path):
    spec = _spec(seeds=[0, 1], settings=[{"name": "a", "steps": 1}, {"name": "b", "steps": 2, "lpl": 1}])
    ids = [t.id for t in spec.tasks()]
    assert len(ids) == len(set(ids)) == 8 and ids[0].startswith("a-p000-s0-")
    assert ids == [t.id for t in SweepSpec.from_dict(spec.to_dict()).tasks()]  # the JSON form round-trips
    assert _spec(cfg=5.0).tasks()[0].id != _spec().tasks()[0].id  # anything that changes the video changes the id
    for bad, says in [({"settings": [{"name": "a"}, {"name": "a"}]}, "unique"),
                      ({"settings": [{"name": "a", "stepz": 3}]}, "stepz"),
                      ({"settings": [{"name": "a", "budget": "64 megs"}]}, "64 megs"),
                      ({"reference": "nope"}, "'reference' 'nope'"), ({"seeds": [1, 1]}, "repeats"),
                      ({"colour": "red"}, "unknown keys ['colour']")]:
        with pytest.raises(ValueError, match=re.escape(says)):
            _spec(**bad)
    f = tmp_path / "s.json"
    f.write_text(json.dumps({"prompts_file": "p.txt", "settings": TINY["settings"]}))
    (tmp_path / "p.txt").write_text("# comment\n" + "\n".join(PROMPTS) + "\n")
    assert SweepSpec.load(f).prompts == tuple(PROMPTS)
    assert SweepSpec.load("smoke").settings[0].name == "steps2"


def test_serial_sweep_records_failures_resumes_and_reports(tmp_path, capsys):
    doc = {**TINY, "settings": [{"name": "one", "steps": 1}, {"name": "tiny", "steps": 1, "budget": "1KB"},
                                {"name": "f16", "steps": 1, "storage_dtype": "float16"}]}
    (tmp_path / "spec.json").write_text(json.dumps(doc))
    out = tmp_path / "out"
    assert main(["sweep", str(tmp_path / "spec.json"), "--out", str(out)]) == 1  # some tasks failed
    printed = capsys.readouterr()
    assert "6 tasks ran (0 already finished" in printed.out and "| tiny | 0 / 2 |" in printed.out
    assert printed.err.count("FAILED: BudgetError") == 2
    spec = SweepSpec.load(tmp_path / "spec.json")
    records = {r["id"]: r for r in (json.loads((out / TASKS / t.id / "record.json").read_text())
                                    for t in spec.tasks())}
    assert {r["status"] for r in records.values() if r["setting"] != "tiny"} == {"ok"}
    assert all("below the smallest feasible" in r["error"] for r in records.values() if r["setting"] == "tiny")
    assert all((out / TASKS / i / "video.mp4").stat().st_size > 0 for i, r in records.items() if r["status"] == "ok")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["one"]["psnr_db"] == "inf" and summary["settings"]["one"]["ssim"] == 1.0
    assert summary["settings"]["one"]["scored"] == 2 and summary["settings"]["tiny"]["failed"] == 2
    assert (out / "contact_one.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((out / "summary.csv").read_text().splitlines()) == 4
    # float16 storage: the converted stores are the sweep's, one per stage, none beside the shipped weights
    assert len(list((out / "stores" / "float16").iterdir())) == 4 and not list(WEIGHTS_DIR.rglob(".blockrt"))
    assert 0.9 < summary["settings"]["f16"]["ssim"] < 1.0
    assert not list((out / TASKS).glob(".tmp-*"))

    # the same command again skips every finished task, failed ones included; nothing is rewritten
    mtimes = {p: p.stat().st_mtime_ns for p in (out / TASKS).rglob("*")}
    again = run_sweep(spec, out)
    assert (again.ran, again.skipped) == (0, 6)
    assert {p: p.stat().st_mtime_ns for p in (out / TASKS).rglob("*")} == mtimes
    # a driver that died after a commit but before its manifest line: the folder is the truth
    (out / MANIFEST).unlink()
    assert Manifest(out).status(spec.tasks()[0].id) == "ok" and run_sweep(spec, out, report=False).ran == 0
    # --retry-failed runs the failed ones again (and only them)
    assert run_sweep(spec, out, retry_failed=True, report=False).ran == 2


def test_generate_prompts_file_as_a_serial_sweep(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS[0] + "\n")
    argv = ["generate", "--prompts", str(prompts), "--workers", "0", "--steps", "1", "--frames", "1",
            "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    assert "1 tasks ran" in capsys.readouterr().out
    assert main(argv) == 0 and "0 tasks ran (1 already finished" in capsys.readouterr().out
    assert main(["generate", "--workers", "2"]) == 2 and "pass --prompts FILE" in capsys.readouterr().err


def test_a_reservation_no_ray_node_can_hold_fails_before_submitting():
    from blockrt.pipelines.sweep.on_ray import _check_fits

    class Cluster:  # what ray.nodes() reports: one live node of 2 CPUs and 4 GB for tasks, one dead larger one
        @staticmethod
        def nodes():
            return [{"Alive": True, "Resources": {"CPU": 2.0, "memory": 4e9}},
                    {"Alive": False, "Resources": {"CPU": 64.0, "memory": 1e12}}]

    spec = _spec(settings=[{"name": "big", "budget": "3GB"}, {"name": "small"}])
    with pytest.raises(ValueError, match="setting 'big': each task reserves 4.61 GB .* the largest Ray node offers 4.00 GB"):
        _check_fits(Cluster, spec, spec.tasks())
    _check_fits(Cluster, spec, [t for t in spec.tasks() if t.setting.name == "small"])  # 64 MB + 1.5 GiB fits
    capped = _spec(task_memory="2GB", settings=[{"name": "big", "budget": "3GB"}])  # the spec's reservation wins
    _check_fits(Cluster, capped, capped.tasks())
    with pytest.raises(ValueError, match="reserves 3 CPUs"):
        _check_fits(Cluster, _spec(threads=3), _spec(threads=3).tasks())


def _kill_first_worker(out, killed: list[int], stop: threading.Event) -> None:
    """Kill (SIGKILL) the process of the first task attempt that appears under ``out/attempts``."""
    while not stop.is_set():
        logs = sorted((out / ATTEMPTS).glob("*")) if (out / ATTEMPTS).is_dir() else []
        for log in logs:
            lines = log.read_text().splitlines()
            if lines:
                pid = int(lines[0].split()[0])
                assert pid != os.getpid()  # a Ray worker, never the driver
                os.kill(pid, signal.SIGKILL)
                killed.extend([pid, log.name])
                return
        time.sleep(0.005)


def test_ray_workers_match_serial_bit_for_bit_and_survive_a_killed_worker(tmp_path):
    pytest.importorskip("ray")
    spec = _spec()
    serial = run_sweep(spec, tmp_path / "serial", report=False)
    out = tmp_path / "ray"
    killed: list = []
    stop = threading.Event()
    sigterm = signal.getsignal(signal.SIGTERM)
    killer = threading.Thread(target=_kill_first_worker, args=(out, killed, stop), daemon=True)
    killer.start()
    try:
        par = run_sweep(spec, out, workers=2)
    finally:
        stop.set()
        killer.join()
    assert _no_ray_left() == []
    assert signal.getsignal(signal.SIGTERM) is sigterm  # ray.init's handler does not outlive the sweep
    assert killed, "no task attempt was seen to kill"
    victim = killed[-1]
    assert [r["status"] for r in par.records] == ["ok"] * 2
    assert _shas(par) == _shas(serial)  # the same videos, bit for bit, serially and on 2 Ray workers
    by_id = {r["id"]: r for r in par.records}
    assert by_id[victim]["attempt"] == 2 and by_id[victim]["pid"] != killed[0]  # retried in a new worker
    assert len((out / ATTEMPTS / victim).read_text().splitlines()) == 2
    # every result exactly once: one committed folder per task, no temporaries, one manifest line each
    assert sorted(p.name for p in (out / TASKS).iterdir()) == sorted(t.id for t in spec.tasks())
    lines = [json.loads(x)["id"] for x in (out / MANIFEST).read_text().splitlines()]
    assert sorted(lines) == sorted(t.id for t in spec.tasks())


@pytest.mark.slow
def test_a_second_local_ray_node_runs_tasks(tmp_path):
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)  # a second raylet process: another node of the same cluster
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        spec = _spec(seeds=[0, 1, 2])
        run = run_sweep(spec, tmp_path / "out", address=cluster.address, report=False)
        assert [r["status"] for r in run.records] == ["ok"] * 6
        assert len(run.nodes) == 2  # tasks ran on both nodes
        assert _shas(run) == _shas(run_sweep(spec, tmp_path / "serial", report=False))
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert _no_ray_left() == []


@pytest.mark.slow
def test_scaling_benchmark_and_kill_and_resume(tmp_path, capsys):
    pytest.importorskip("ray")
    from benchmark_modules import load_benchmark

    bench = load_benchmark("sweep_scaling")
    assert bench.main(["--spec", "smoke", "--kill-resume", "--out", str(tmp_path)]) == 0
    assert "videos bit-identical: yes" in capsys.readouterr().out
    doc = json.loads((tmp_path / "results.json").read_text())
    kr = doc["kill_resume"]
    assert kr["every_task_once"] and kr["killed_task_status"] == "ok" and kr["killed_task_attempts"] >= 2
    assert kr["second_exit"] == 0 and not kr["temporaries_left"] and not kr["processes_left_after_interrupt"]
    assert _no_ray_left() == []
