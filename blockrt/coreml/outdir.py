"""The export directory: built under a temporary sibling name, then renamed into place.

An existing directory is only ever replaced when it is a previous blockrt export (its ``export.json``
carries the blockrt marker) and the caller passed ``overwrite=True``; an empty directory is replaced too
(nothing is lost). Anything else is refused before any work starts, and checked again just before the
rename, so a directory that appeared meanwhile is never clobbered. Replacing swaps the old export to a
temporary name, renames the new one in, then deletes the old: if the process dies between the two renames
the old export is still whole under ``.<name>.old-*``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from ..files import current_umask, fsync_tree, replace_dir
from .manifest import FORMAT, MANIFEST
from .spec import ExportError


def is_export(path: str | Path) -> bool:
    """True when ``path`` is a directory holding a blockrt CoreML ``export.json``."""
    file = Path(path) / MANIFEST
    try:
        return json.loads(file.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_out_dir(out_dir: str | Path, overwrite: bool) -> None:
    """Raise ``ExportError`` (touching nothing) unless ``out_dir`` may receive a new export."""
    out = Path(out_dir)
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise ExportError(f"{out} exists and is not a directory; fix: choose another output path")
    if not any(out.iterdir()):
        return
    if not is_export(out):
        raise ExportError(f"{out} exists and is not a blockrt CoreML export (no {MANIFEST} with the blockrt marker); "
                          "refusing to overwrite it, nothing was changed; fix: choose a new or empty output directory")
    if not overwrite:
        raise ExportError(f"{out} already holds a blockrt CoreML export; fix: pass overwrite=True "
                          "(--overwrite on the command line) to replace it, or choose another directory")


class StagedDir:
    """A temporary directory beside ``out_dir`` that becomes ``out_dir`` on ``commit()``.

    Example:
        >>> stage = StagedDir(out, overwrite=False)   # refuses at once if out may not be replaced
        >>> try:
        ...     write_everything(stage.path)
        ...     stage.commit()
        ... finally:
        ...     stage.discard()                          # no-op after a commit
    """

    def __init__(self, out_dir: str | Path, overwrite: bool) -> None:
        self.out = Path(out_dir).absolute()
        self.overwrite = overwrite
        check_out_dir(self.out, overwrite)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        os.chmod(self.path, 0o777 & ~current_umask())  # mkdtemp makes 0700; an export is shared like any directory
        self._done = False

    def commit(self) -> Path:
        """fsync everything, then rename the staged directory to ``out_dir`` (replacing an allowed old one)."""
        check_out_dir(self.out, self.overwrite)  # something may have appeared while we were exporting
        fsync_tree(self.path)
        replace_dir(self.path, self.out)
        self._done = True
        return self.out

    def discard(self) -> None:
        """Remove the staged directory unless it was committed."""
        if not self._done:
            shutil.rmtree(self.path, ignore_errors=True)
            self._done = True
