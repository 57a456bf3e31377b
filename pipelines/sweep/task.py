"""One sweep task: generate one video in this process and commit its folder into the sweep's output atomically.

A task's outputs are built in a temporary folder beside the final one (``tasks/.tmp-<id>-*``): ``video.mp4``,
``frames.npy`` (the uint8 frames ``[T, H, W, 3]`` the mp4 was encoded from, for scoring and bit-for-bit
comparisons) and ``record.json``; the folder is fsynced and renamed to ``tasks/<id>`` in one step. A reader (the
manifest, a resumed sweep, a retried attempt) sees the whole folder or none, and a second attempt of a task
that has already committed does not replace it: whichever attempt renames first is the result, exactly once.

A task that raises (an empty prompt, a budget too small, a bad storage dtype) commits a folder holding only
its record, with ``status: "failed"`` and the error; process deaths (a killed worker) commit nothing and are
left to the scheduler to retry. Each start appends one line to ``attempts/<id>`` (pid and time), so a record
says how many attempts it took.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from blockrt.files import fsync_dir, fsync_tree
from blockrt.pipelines.sweep.spec import Task

TASKS, ATTEMPTS, STORES = "tasks", "attempts", "stores"
RECORD, VIDEO, FRAMES = "record.json", "video.mp4", "frames.npy"


def read_record(folder: Path) -> dict[str, Any]:
    """The record of a committed task folder."""
    return json.loads((folder / RECORD).read_text(encoding="utf-8"))


def _attempt(out: Path, task_id: str) -> int:
    """Log this start in ``attempts/<id>`` (one short O_APPEND write) and return its number (1 = first)."""
    log = out / ATTEMPTS / task_id
    log.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{os.getpid()} {time.time():.3f}\n".encode())
    finally:
        os.close(fd)
    return len(log.read_text().splitlines())


def _node() -> str:
    """The Ray node this runs on, else the host name (serial runs)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except ImportError:
        pass
    return socket.gethostname()


def _generate(task: Task, folder: Path, out: Path) -> dict[str, Any]:
    """Run the pipeline for ``task`` under its setting's budget; write the video and frames into ``folder``."""
    import numpy as np
    import torch

    from blockrt.config import RunConfig
    from blockrt.pipelines.opensora.pipeline import GenerateConfig, OpenSoraPipeline
    from blockrt.pipelines.opensora.video import to_uint8_frames

    s = task.setting
    if task.weights is None:
        from blockrt.pipelines.shapes.layout import WEIGHTS_DIR

        weights = WEIGHTS_DIR
    else:
        weights = Path(task.weights)
    cfg = GenerateConfig(prompt=task.prompt, resolution=task.resolution, aspect=task.aspect, frames=task.frames,
                         steps=s.steps, cfg_scale=task.cfg, seed=task.seed, lpl=s.lpl, merge_steps=s.tdtm)
    threads = torch.get_num_threads()
    torch.set_num_threads(task.threads)  # the same threads serially and in a worker: the same reductions, bit for bit
    try:
        # converted stores (storage_dtype) go into the sweep's folder, not beside the (maybe shipped) weights
        stores = None if s.storage_dtype is None else out / STORES / str(s.storage_dtype)
        pipe = OpenSoraPipeline(weights, budget=s.budget,
                                config=RunConfig(storage_dtype=s.storage_dtype, store_path=stores))
        result = pipe.generate(cfg, out=folder / VIDEO)
    finally:
        torch.set_num_threads(threads)
    frames = to_uint8_frames(result.video)  # (T, H, W, 3) uint8, what the mp4 was encoded from
    np.save(folder / FRAMES, frames)
    whole = result.profile.summary()
    return {"model_calls": result.steps_run, "leapt_at": result.leapt_at, "budget_bytes": pipe.budget,
            "peak_ledger_bytes": whole.peak_ledger_bytes, "peak_rss_delta": whole.peak_rss_delta,
            "frames_shape": list(frames.shape), "frames_sha256": hashlib.sha256(frames.tobytes()).hexdigest(),
            "video": VIDEO, "frames": FRAMES}


def run_task(task: Task, out: str | os.PathLike[str]) -> dict[str, Any]:
    """Generate ``task``'s video and commit ``<out>/tasks/<id>/``; return its record (the committed one, if an
    earlier attempt already committed). Errors of the task itself are recorded, not raised."""
    out = Path(out)
    final = out / TASKS / task.id
    if (final / RECORD).is_file():
        return read_record(final)
    attempt = _attempt(out, task.id)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{task.id}-", dir=final.parent))
    started, t0, cpu0 = time.time(), time.perf_counter(), _cpu_s()
    record: dict[str, Any] = {"id": task.id, "setting": task.setting.name, "prompt": task.prompt,
                              "prompt_index": task.prompt_index, "seed": task.seed, "task": task.key,
                              "attempt": attempt, "pid": os.getpid(), "node": _node(), "started_at": started}
    try:
        try:
            record.update(_generate(task, tmp, out), status="ok", error=None)
        except Exception as e:  # the task's own failure: recorded; a killed process records nothing
            for name in (VIDEO, FRAMES):
                (tmp / name).unlink(missing_ok=True)
            record.update(status="failed", error=f"{type(e).__name__}: {e}")
        record.update(wall_s=time.perf_counter() - t0, cpu_s=_cpu_s() - cpu0, finished_at=time.time())
        return _commit(tmp, final, record)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cpu_s() -> float:
    """CPU seconds of this process (all threads) and its waited-for children (ffmpeg)."""
    import resource

    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + c.ru_utime + c.ru_stime


def _commit(tmp: Path, final: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Write ``record`` into ``tmp`` and rename ``tmp`` to ``final``; the record that ends up committed."""
    (tmp / RECORD).write_text(json.dumps(record, indent=1), encoding="utf-8")
    fsync_tree(tmp)
    try:
        os.rename(tmp, final)  # the commit: fails if another attempt committed first
    except OSError:
        if (final / RECORD).is_file():
            return read_record(final)
        raise
    fsync_dir(final.parent)
    return record


def commit_failure(task: Task, out: str | os.PathLike[str], error: str) -> dict[str, Any]:
    """Commit a failed record for ``task`` on its behalf (the scheduler gave up: retries spent, node lost)."""
    final = Path(out) / TASKS / task.id
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{task.id}-", dir=final.parent))
    attempts = Path(out) / ATTEMPTS / task.id
    record = {"id": task.id, "setting": task.setting.name, "prompt": task.prompt, "prompt_index": task.prompt_index,
              "seed": task.seed, "task": task.key, "status": "failed", "error": error,
              "attempt": len(attempts.read_text().splitlines()) if attempts.is_file() else 0,
              "finished_at": time.time()}
    try:
        return _commit(tmp, final, record)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
