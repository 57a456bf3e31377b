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

from ..profile import current_umask
from ..safetensors_format import fsync_dir
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


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (bottom-up), so a rename publishes whole files."""
    for dirpath, _, files in os.walk(root, topdown=False):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


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
        old: Path | None = None
        if self.out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
            os.rename(self.out, old / "export")
        try:
            os.rename(self.path, self.out)
        except BaseException:
            if old is not None:
                os.rename(old / "export", self.out)  # put the previous export back
                shutil.rmtree(old, ignore_errors=True)
            raise
        self._done = True
        fsync_dir(self.out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out

    def discard(self) -> None:
        """Remove the staged directory unless it was committed."""
        if not self._done:
            shutil.rmtree(self.path, ignore_errors=True)
            self._done = True
