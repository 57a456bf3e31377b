"""Progress of long stages for the command line: a bar on a terminal, a few plain lines in a log.

A pipeline reports ``progress(stage, done, total)``: ``done`` of ``total`` units of the stage (``"T5 encode"``,
``"denoising"``, ``"VAE decode"``, ``"store conversion"``). ``StageProgress`` turns that into a tqdm bar per stage
when stderr is a terminal and, when it is not (a CI log, a file), one line when a stage starts and one when it
ends, with at most one line in between per quarter: a log stays readable however long the run.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

Progress = Any  # a callable progress(stage: str, done: int, total: int) -> None


class StageProgress:
    """``progress(stage, done, total)`` for the command line; ``enabled=False`` prints nothing."""

    def __init__(self, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._stage: str | None = None
        self._bar: Any = None
        self._t0 = 0.0
        self._quarter = -1

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if stage != self._stage:
            self._start(stage, total)
        if self._bar is not None:
            self._bar.n = done
            self._bar.refresh()
        elif 0 < done < total and 4 * done // total > self._quarter:
            self._quarter = 4 * done // total
            print(f"{stage}: {done}/{total}", file=self.stream, flush=True)
        if done >= total:
            self._finish()

    def _start(self, stage: str, total: int) -> None:
        self._finish()
        self._stage, self._t0, self._quarter = stage, time.perf_counter(), 0
        if self.tty:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=stage, file=self.stream, leave=False)
        else:
            print(f"{stage}: started ({total} {'unit' if total == 1 else 'units'})", file=self.stream, flush=True)

    def _finish(self) -> None:
        if self._stage is None:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        print(f"{self._stage}: done in {time.perf_counter() - self._t0:.1f} s", file=self.stream, flush=True)
        self._stage = None

    def close(self) -> None:
        """End the current stage's bar or line (a stage that stopped early, e.g. at an LPL leap)."""
        if self.enabled:
            self._finish()
