"""A sweep serially vs on 2 local Ray workers: wall time, CPU use, Ray's overhead per task, identical videos;
and a kill-and-resume run (a worker killed mid-task, then the driver interrupted and the command run again).

The same spec runs twice into fresh folders under ``--out``: serially in this process (``workers=0``) and on a
local Ray instance with ``--workers`` workers (``ray.init`` started by the runner, its start-up included in the
wall time). Printed per run: wall time, the CPU seconds of the sweep's processes (this one, Ray's and the
workers') as cores used, the other processes' load meanwhile, and the mean task time measured inside the task.
Ray's overhead per task is given two ways: the round trip of an empty Ray task (submit -> result, one at a
time, on the same kind of instance), and the sweep's idle worker time per task,
``(wall - ray.init) * workers - sum(task wall)) / tasks`` (scheduling, worker start-up and imports, the tail
where a worker waits for the last task). Every video is then compared bit for bit (frames' sha256).

``--kill-resume`` also runs the spec on Ray in a child ``blockrt sweep`` process, SIGKILLs the first worker
that starts a task, SIGINTs the driver once a third of the tasks are done, runs the same command again, and
checks that every task has exactly one result and that no Ray process is left.

    .venv/bin/python benchmarks/sweep_scaling.py                       # quality-small: 24 videos (~5 min here)
    .venv/bin/python benchmarks/sweep_scaling.py --spec quality144     # the quality benchmark's 432 videos
    .venv/bin/python benchmarks/sweep_scaling.py --spec quality144-steps30  # one setting: 144 videos
    .venv/bin/python benchmarks/sweep_scaling.py --spec smoke --kill-resume

Writes ``results.json`` to ``--out`` (default ``out/bench/sweep``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

from blockrt.files import write_atomic
from blockrt.pipelines.sweep.manifest import MANIFEST
from blockrt.pipelines.sweep.runner import run_sweep
from blockrt.pipelines.sweep.spec import SweepSpec
from blockrt.pipelines.sweep.task import ATTEMPTS, TASKS
from bench_common import OtherCpu, hardware, json_safe

NOOP_TASKS = 30


def noop_round_trip_s(workers: int) -> tuple[float, float]:
    """(ray.init seconds, mean seconds of an empty task's submit -> result) on a fresh local instance."""
    import ray

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # Ray's notice about accelerator env vars (no GPUs here)
        ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False,
                 logging_level="WARNING")
    init_s = time.perf_counter() - t0
    try:
        def noop() -> int:  # nested: pickled by value, so workers need not import this script
            return 0

        f = ray.remote(num_cpus=1)(noop)
        ray.get([f.remote() for _ in range(workers)])  # start the workers
        t0 = time.perf_counter()
        for _ in range(NOOP_TASKS):
            ray.get(f.remote())
        return init_s, (time.perf_counter() - t0) / NOOP_TASKS
    finally:
        ray.shutdown()


def measure(spec: SweepSpec, out: Path, workers: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    other = OtherCpu().start()
    busy0 = other._busy_s()
    run = run_sweep(spec, out, workers=workers, report=False)
    busy = other._busy_s() - busy0
    tasks = sum(r.get("wall_s", 0.0) for r in run.records)
    n = len(run.records)
    row = {"mode": run.mode, "tasks": n, "ok": sum(r["status"] == "ok" for r in run.records), "wall_s": run.wall_s,
           "cpu_s": run.cpu_s, "cores_used": run.cpu_s / run.wall_s,
           "other_cores": max(0.0, busy - run.cpu_s) / run.wall_s, "task_s_mean": tasks / n,
           "ray_init_s": run.ray_init_s, "shas": {r["id"]: r.get("frames_sha256") for r in run.records}}
    if workers:
        row["idle_s_per_task"] = ((run.wall_s - run.ray_init_s) * workers - tasks) / n
    print(f"  {run.mode:<24} wall {run.wall_s:7.1f} s   CPU {run.cpu_s:7.1f} s = {row['cores_used']:.2f} cores   "
          f"other processes {row['other_cores']:.2f} cores   task {row['task_s_mean']:.2f} s mean"
          + (f"   ray.init {run.ray_init_s:.1f} s, idle {row['idle_s_per_task']:.2f} s per task" if workers else ""),
          flush=True)
    return row


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def kill_and_resume(spec_name: str, out: Path, workers: int) -> dict:
    """Run ``blockrt sweep`` on Ray in a child; kill a worker mid-task, interrupt the driver, run it again."""
    import psutil

    shutil.rmtree(out, ignore_errors=True)
    spec = SweepSpec.load(spec_name)
    total = len(spec.tasks())
    cmd = [sys.executable, "-m", "blockrt.pipelines.cli", "sweep", spec_name, "--out", str(out), "--workers",
           str(workers), "--no-progress"]
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed, interrupted = None, False
    tree: set[int] = set()  # the driver's descendants seen (raylet, GCS, workers): none may outlive it
    while child.poll() is None:
        try:
            tree |= {p.pid for p in psutil.Process(child.pid).children(recursive=True)}
        except psutil.Error:
            pass
        logs = sorted((out / ATTEMPTS).glob("*")) if (out / ATTEMPTS).is_dir() else []
        if killed is None and logs and logs[0].read_text().strip():
            killed = (logs[0].name, int(logs[0].read_text().split()[0]))
            os.kill(killed[1], signal.SIGKILL)
        done = len((out / MANIFEST).read_text().splitlines()) if (out / MANIFEST).is_file() else 0
        if not interrupted and killed and done >= max(1, total // 3):
            child.send_signal(signal.SIGINT)  # Ctrl-C: the driver stops, shutting its Ray instance down
            interrupted = True
        time.sleep(0.01)
    first_done = len((out / MANIFEST).read_text().splitlines())
    deadline = time.monotonic() + 15.0  # Ray's processes may take a moment to exit after the driver's shutdown
    while True:
        left_after_interrupt = [pid for pid in sorted(tree) if _alive(pid)]
        if not left_after_interrupt or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    again = subprocess.run(cmd, capture_output=True, text=True)
    ids = sorted(p.name for p in (out / TASKS).iterdir())
    expected = sorted(t.id for t in spec.tasks())
    victim = json.loads((out / TASKS / killed[0] / "record.json").read_text()) if killed else {}
    result = {"tasks": total, "worker_killed": killed[0] if killed else None,
              "killed_task_attempts": victim.get("attempt"), "killed_task_status": victim.get("status"),
              "driver_interrupted_after": first_done, "first_exit": child.returncode, "second_exit": again.returncode,
              "second_run_line": next((ln for ln in again.stdout.splitlines() if "tasks ran" in ln), ""),
              "every_task_once": ids == expected, "temporaries_left": [i for i in ids if i.startswith(".tmp")],
              "processes_left_after_interrupt": left_after_interrupt, "processes_of_interrupted_run": len(tree)}
    print(f"kill-and-resume: worker of {result['worker_killed']} SIGKILLed mid-task -> that task "
          f"{result['killed_task_status']} after {result['killed_task_attempts']} attempts; driver SIGINTed after "
          f"{first_done}/{total} tasks (exit {child.returncode}); the same command again: "
          f"'{result['second_run_line']}' (exit {again.returncode}); every task exactly once: "
          f"{'yes' if result['every_task_once'] else 'NO'}; processes of the interrupted run left: "
          f"{len(left_after_interrupt)} of {len(tree)}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", default="quality-small", help="a preset (quality-small, quality144-steps30, quality144, smoke) or a JSON spec")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default="out/bench/sweep")
    p.add_argument("--kill-resume", action="store_true", help="also run the kill-and-resume check")
    p.add_argument("--skip-scaling", action="store_true", help="only the kill-and-resume check")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = SweepSpec.load(args.spec)
    hw = hardware()
    doc: dict = {"hardware": hw, "spec": args.spec, "workers": args.workers}
    print(f"{hw['cpu']}, {hw['cores']} cores; spec {args.spec}: {len(spec.tasks())} videos "
          f"({len(spec.prompts)} prompts x {len(spec.seeds)} seeds x {len(spec.settings)} settings)", flush=True)
    if not args.skip_scaling:
        init_s, noop_s = noop_round_trip_s(args.workers)
        print(f"  ray: init {init_s:.2f} s; an empty task's round trip {noop_s * 1e3:.2f} ms", flush=True)
        serial = measure(spec, out / "serial", 0)
        ray_run = measure(spec, out / "ray", args.workers)
        same = serial["shas"] == ray_run["shas"] and None not in serial["shas"].values()
        ratio = serial["wall_s"] / ray_run["wall_s"]
        print(f"speedup {ratio:.2f}x on {args.workers} workers (serial {serial['wall_s']:.1f} s -> "
              f"{ray_run['wall_s']:.1f} s); CPU {serial['cores_used']:.2f} -> {ray_run['cores_used']:.2f} cores; "
              f"Ray overhead per task: {noop_s * 1e3:.1f} ms round trip, {ray_run['idle_s_per_task']:.2f} s idle "
              f"worker time per task in this sweep; videos bit-identical: {'yes' if same else 'NO'}")
        doc.update(serial=serial, ray=ray_run, speedup=ratio, identical=same, ray_init_s=init_s, noop_round_trip_s=noop_s)
    if args.kill_resume:
        doc["kill_resume"] = kill_and_resume(args.spec, out / "kill-resume", args.workers)
    data = json.dumps(json_safe(doc), indent=1).encode()
    write_atomic(out / "results.json", lambda f: f.write(data))
    print(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
