"""The sweep's manifest: which tasks of an output folder have finished, and how.

``manifest.jsonl`` holds one line per finished task (id, status, attempt, finish time), rewritten atomically
by the one process driving the sweep each time a task finishes. The committed task folders
(``tasks/<id>/record.json``, see ``task.py``) are the truth: opening a manifest adds any committed task it
does not list (the driver died between a task's commit and its line) and drops lines whose folder is gone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from blockrt.files import write_atomic
from blockrt.pipelines.sweep.task import RECORD, TASKS, read_record

MANIFEST = "manifest.jsonl"


class Manifest:
    """The finished tasks of the sweep folder ``out``: ``status(id)`` is "ok", "failed" or None."""

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out)
        self._lines: dict[str, dict[str, Any]] = {}
        path = self.out / MANIFEST
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    entry = json.loads(line)
                    self._lines[entry["id"]] = entry
        tasks = self.out / TASKS
        committed = {p.name for p in tasks.iterdir() if (p / RECORD).is_file()} if tasks.is_dir() else set()
        changed = False
        for task_id in committed - set(self._lines):
            self._lines[task_id] = self._entry(read_record(tasks / task_id))
            changed = True
        for task_id in set(self._lines) - committed:
            del self._lines[task_id]
            changed = True
        if changed:
            self._write()

    @staticmethod
    def _entry(record: dict[str, Any]) -> dict[str, Any]:
        return {k: record.get(k) for k in ("id", "status", "attempt", "finished_at")}

    def _write(self) -> None:
        text = "".join(json.dumps(e) + "\n" for e in sorted(self._lines.values(), key=lambda e: e["id"]))
        write_atomic(self.out / MANIFEST, lambda f: f.write(text.encode()))

    def status(self, task_id: str) -> str | None:
        """"ok", "failed", or None when the task has not finished."""
        entry = self._lines.get(task_id)
        return None if entry is None else entry["status"]

    def add(self, record: dict[str, Any]) -> None:
        """Record a committed task (its folder already holds ``record``)."""
        self._lines[record["id"]] = self._entry(record)
        self._write()

    def forget(self, task_id: str) -> None:
        """Drop a task (its folder is being removed to run it again)."""
        if self._lines.pop(task_id, None) is not None:
            self._write()

    def record(self, task_id: str) -> dict[str, Any]:
        """The committed record of a finished task."""
        return read_record(self.out / TASKS / task_id)
