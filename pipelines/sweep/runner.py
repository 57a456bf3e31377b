"""Run a sweep: every unfinished task of a spec, serially in this process or as Ray tasks, then the report.

- ``workers=0`` and no ``address``: task after task in this process (the reference the parallel runs equal).
- ``workers=N``: a local Ray instance started here (``ray.init(address="local", num_cpus=N * threads)``), shut
  down at the end; ``address``: an existing cluster (``"auto"``, ``"HOST:6379"``, ``"ray://HOST:10001"``), left
  running. Each task reserves ``num_cpus=threads`` and ``memory=`` the spec's task memory (the setting's budget
  plus ``TASK_BASE_BYTES`` unless the spec says), so Ray never packs more tasks on a node than its memory holds;
  the ``SPREAD`` strategy places them across nodes. A worker process that dies mid-task is retried by Ray (up
  to ``max_retries``); when Ray gives up, the task is committed as failed with Ray's error.
- One driver per output folder (``.sweep.lock``); temporary folders of killed attempts are removed at the
  start and the end, when no task of the folder runs. Finished tasks (``manifest.py``) are skipped; failed
  ones are re-run only with ``retry_failed``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from blockrt.files import write_atomic
from blockrt.pipelines.sweep.manifest import Manifest
from blockrt.pipelines.sweep.spec import SweepSpec
from blockrt.pipelines.sweep.task import TASKS, run_task

DEFAULT_MAX_RETRIES = 3  # Ray's default for tasks: a killed worker's task runs again, up to 3 more times
SPEC_FILE, LOCK = "spec.json", ".sweep.lock"


@dataclass
class SweepRun:
    """What one ``run_sweep`` call did: the records of the spec's tasks (spec order), how many ran and were
    skipped, its wall time, and the CPU seconds of this process and its children (Ray's processes included)."""

    out: Path
    records: list[dict[str, Any]]
    ran: int
    skipped: int
    wall_s: float
    cpu_s: float
    mode: str
    ray_init_s: float = 0.0
    nodes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r["status"] != "ok"]


@contextlib.contextmanager
def _folder_lock(out: Path) -> Iterator[None]:
    import fcntl

    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another sweep is running on {out} (it holds {out / LOCK}); wait for it, or give "
                             "this one another output folder") from None
        yield
    finally:
        os.close(fd)


def _remove_stale(out: Path) -> None:
    """Remove the temporary folders of task attempts that died (only while no task of ``out`` runs)."""
    for stale in (out / TASKS).glob(".tmp-*") if (out / TASKS).is_dir() else ():
        shutil.rmtree(stale, ignore_errors=True)


def _tree_cpu_s() -> float:
    """CPU seconds of this process, its reaped children and its live descendants (Ray's raylet and workers)."""
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:4])  # user, system, children_user, children_system
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += sum(child.cpu_times()[:2])
    return total


def run_sweep(spec: SweepSpec, out: str | os.PathLike[str], *, workers: int = 0, address: str | None = None,
              retry_failed: bool = False, max_retries: int = DEFAULT_MAX_RETRIES,
              on_record: Callable[[dict[str, Any], int, int], None] | None = None, report: bool = True) -> SweepRun:
    """Run every unfinished task of ``spec`` into ``out`` and write the report (``report.write_report``).

    Args:
        spec: the sweep.
        out: the output folder (created); the same folder resumes a sweep.
        workers: 0 = serially in this process; N = a local Ray instance with N * ``spec.threads`` CPUs.
        address: an existing Ray cluster to run on instead (``workers`` is then ignored).
        retry_failed: run the tasks recorded as failed again.
        max_retries: how many times Ray re-runs a task whose worker died.
        on_record: ``on_record(record, done, total)`` after each task finishes (progress).
        report: write the summary, contact sheets and quality scores at the end.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be an int >= 0 (0 = serial); got {workers!r}")
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with _folder_lock(out):
        _remove_stale(out)  # tasks killed mid-write in an earlier run
        text = json.dumps(spec.to_dict(), indent=1).encode()
        write_atomic(out / SPEC_FILE, lambda f: f.write(text))
        manifest = Manifest(out)
        tasks = spec.tasks()
        todo = []
        for t in tasks:
            status = manifest.status(t.id)
            if status == "failed" and retry_failed:
                manifest.forget(t.id)
                shutil.rmtree(out / TASKS / t.id)
                status = None
            if status is None:
                todo.append(t)
        done = [0]

        def finished(record: dict[str, Any]) -> None:
            manifest.add(record)
            done[0] += 1
            if on_record is not None:
                on_record(record, done[0], len(todo))

        t0, cpu0 = time.perf_counter(), _tree_cpu_s()
        if workers == 0 and address is None:
            for t in todo:
                finished(run_task(t, out))
            run = SweepRun(out, [], len(todo), len(tasks) - len(todo), 0.0, 0.0, "serial")
        else:
            from blockrt.pipelines.sweep.on_ray import run_on_ray

            init_s, nodes, cpu_ray = run_on_ray(spec, todo, out, workers=workers, address=address,
                                                max_retries=max_retries, finished=finished, cpu_s=_tree_cpu_s)
            mode = f"ray at {address}" if address else f"ray, {workers} local workers"
            run = SweepRun(out, [], len(todo), len(tasks) - len(todo), 0.0, cpu_ray - cpu0, mode, init_s, nodes)
        _remove_stale(out)  # attempts killed during this run (their retries committed); nothing is in flight now
        run.wall_s = time.perf_counter() - t0
        if run.mode == "serial":
            run.cpu_s = _tree_cpu_s() - cpu0
        run.records = [manifest.record(t.id) for t in tasks]
        if report:
            from blockrt.pipelines.sweep.report import write_report

            write_report(spec, out, run.records)
    return run

