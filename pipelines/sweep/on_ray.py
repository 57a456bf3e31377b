"""Sweep tasks as Ray tasks: start or join a cluster, check each task fits a node, submit, collect.

Every task reserves ``num_cpus=spec.threads`` and ``memory=spec.task_memory_bytes(setting)``; a reservation no
node can hold fails before anything is submitted (Ray would otherwise wait for it forever). Ray re-runs a task
whose worker process died (``max_retries``), and only for that: a task's own error is already a record
(``task.run_task`` never raises it).
"""

from __future__ import annotations

import logging
import signal
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from blockrt.budget import format_bytes
from blockrt.errors import BlockrtError
from blockrt.pipelines.sweep.spec import SweepSpec, Task
from blockrt.pipelines.sweep.task import commit_failure, run_task

log = logging.getLogger(__name__)


def _remote_task(task: Task, out: str) -> dict[str, Any]:
    return run_task(task, out)


def _check_fits(ray: Any, spec: SweepSpec, todo: list[Task]) -> None:
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    cpus = max((n.get("CPU", 0) for n in nodes), default=0)
    memory = max((n.get("memory", 0) for n in nodes), default=0)
    if spec.threads > cpus:
        raise ValueError(f"each task reserves {spec.threads} CPUs (spec 'threads') but the largest Ray node has "
                         f"{cpus:g}; fix: lower 'threads' or start workers with more CPUs")
    for s in {t.setting for t in todo}:
        need = spec.task_memory_bytes(s)
        if need > memory:
            raise ValueError(f"setting {s.name!r}: each task reserves {format_bytes(need)} of memory but the largest "
                             f"Ray node offers {format_bytes(int(memory))}; fix: set the spec's 'task_memory' lower, "
                             "or give the nodes more memory (ray start --memory)")


def run_on_ray(spec: SweepSpec, todo: list[Task], out: Path, *, workers: int, address: str | None,
               max_retries: int, finished: Callable[[dict[str, Any]], None],
               cpu_s: Callable[[], float]) -> tuple[float, list[str], float]:
    """Run ``todo`` on Ray; ``finished(record)`` as each completes. Returns the seconds ``ray.init`` took, the
    ids of the nodes that ran tasks, and ``cpu_s()`` read before a Ray instance started here shuts down."""
    try:
        import ray
    except ImportError:
        raise BlockrtError("running a sweep on Ray needs ray, which is not installed; fix: pip install "
                           "'blockrt[sweep]' (or 'blockrt[all]'), or run it serially (workers=0)") from None

    t0 = time.perf_counter()
    started_here = False
    # ray.init installs its own SIGTERM (and SIGINT) handlers in this process and shutdown leaves them: restore
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    if not ray.is_initialized():
        quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # Ray's notice about accelerator env vars (no GPUs here)
            if address is not None:
                ray.init(address=address, **quiet)
            else:
                if workers < 1:
                    raise ValueError(f"workers must be >= 1 for a local Ray instance; got {workers}")
                # "local": a new instance even when another one runs on this machine
                ray.init(address="local", num_cpus=workers * spec.threads, include_dashboard=False,
                         _system_config={"enable_metrics_collection": False}, **quiet)  # no metrics agent to reach
        started_here = True
    init_s = time.perf_counter() - t0
    try:
        _check_fits(ray, spec, todo)
        remote = ray.remote(_remote_task)
        pending: dict[Any, Task] = {}
        for t in todo:
            opts = {"num_cpus": spec.threads, "memory": spec.task_memory_bytes(t.setting), "max_retries": max_retries,
                    "retry_exceptions": False, "scheduling_strategy": "SPREAD"}
            pending[remote.options(**opts).remote(t, str(out))] = t
        nodes: set[str] = set()
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            t = pending.pop(ready[0])
            try:
                record = ray.get(ready[0])
            except ray.exceptions.RayError as e:  # retries spent, node lost, killed for memory
                log.warning("task %s: Ray gave up: %s", t.id, e)
                record = commit_failure(t, out, f"{type(e).__name__}: {e}")
            if record.get("node"):
                nodes.add(record["node"])
            finished(record)
        return init_s, sorted(nodes), cpu_s()
    finally:
        if started_here:
            ray.shutdown()
            for sig, handler in handlers.items():
                if handler is not None:
                    signal.signal(sig, handler)
