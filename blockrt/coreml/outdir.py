"""The export directory: built under a temporary sibling name, then moved into place.

A new or empty directory is replaced by the staged one with one rename. An existing directory is only written
into when it is a previous blockrt export (its ``export.json`` carries the blockrt marker) and the caller passed
``overwrite=True``; anything else is refused before any work starts, and checked again just before the move,
so a directory that appeared meanwhile is never clobbered. Overwriting replaces only what blockrt wrote: the
old ``export.json`` and the packages it lists (plain names inside the directory; a manifest naming anything else
is refused). Every other file stays, and a new package whose name such a file holds is refused. The old
export's entries are moved to ``.<name>.old-*`` (``export.json`` first, so a half-replaced directory never looks
complete), the new ones moved in (``export.json`` last), then the old ones deleted: if the process dies
meanwhile the old export is still whole under ``.<name>.old-*``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..errors import StoreError
from ..files import current_umask, fsync_dir, fsync_tree
from ..guards import read_json
from .manifest import FORMAT, MANIFEST
from .spec import ExportError


def is_export(path: str | Path) -> bool:
    """True when ``path`` is a directory holding a blockrt CoreML ``export.json``."""
    try:
        return _manifest(Path(path)).get("format") == FORMAT
    except (OSError, StoreError, AttributeError):
        return False


def _manifest(out: Path) -> object:
    """``export.json`` of ``out``, parsed (only a regular file, as JSON without repeated keys)."""
    return read_json(out / MANIFEST, "fix: export again")


def owned_entries(out: Path) -> list[str]:
    """The names blockrt wrote into the export ``out``: ``export.json`` and each package its manifest lists.

    Raises ``ExportError`` when the manifest cannot say (unreadable, or a package ``file`` that is not a plain
    name inside the directory: an overwrite must never delete beyond it)."""
    fix = f"nothing was changed; fix: remove the old export from {out} yourself, or choose another output directory"
    try:
        packages = _manifest(out)["packages"]  # type: ignore[index]
        names = [p["file"] for p in packages]
    except (OSError, StoreError, KeyError, TypeError) as e:
        raise ExportError(f"{out / MANIFEST}: cannot tell which files the previous export wrote ({type(e).__name__}: "
                          f"{e}); {fix}") from None
    for name in names:
        if not isinstance(name, str) or name in ("", ".", "..", MANIFEST) or "/" in name or "\\" in name or "\0" in name:
            raise ExportError(f"{out / MANIFEST} lists a package file {name!r}; expected a plain name inside {out}; {fix}")
    return [MANIFEST, *dict.fromkeys(names)]


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
    owned_entries(out)


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
        """fsync everything, then move the staged export to ``out_dir`` (replacing only an allowed old export's
        own entries)."""
        check_out_dir(self.out, self.overwrite)  # something may have appeared while we were exporting
        fsync_tree(self.path)
        if not self.out.exists() or not any(self.out.iterdir()):
            os.rename(self.path, self.out)  # a new or empty directory: one atomic rename
        else:
            self._replace_entries()
        self._done = True
        fsync_dir(self.out.parent)
        return self.out

    def _replace_entries(self) -> None:
        owned = owned_entries(self.out)
        new = sorted(p.name for p in self.path.iterdir())
        theirs = [n for n in new if n not in owned and ((self.out / n).exists() or (self.out / n).is_symlink())]
        if theirs:
            raise ExportError(f"{self.out} holds {theirs[:3]}, which the previous export did not write, and the new "
                              "export writes the same name(s); nothing was changed; fix: move those files away or "
                              "choose another output directory")
        old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
        moved_out: list[str] = []
        moved_in: list[str] = []
        try:
            for name in owned:  # export.json first: from now on the directory does not look like a complete export
                if (self.out / name).exists() or (self.out / name).is_symlink():
                    os.rename(self.out / name, old / name)
                    moved_out.append(name)
            for name in sorted(new, key=lambda n: n == MANIFEST):  # the new export.json last
                os.rename(self.path / name, self.out / name)
                moved_in.append(name)
        except BaseException:
            for name in reversed(moved_in):  # put everything back as it was
                os.rename(self.out / name, self.path / name)
            for name in reversed(moved_out):
                os.rename(old / name, self.out / name)
            shutil.rmtree(old, ignore_errors=True)
            raise
        fsync_dir(self.out)
        self.path.rmdir()
        shutil.rmtree(old, ignore_errors=True)

    def discard(self) -> None:
        """Remove the staged directory unless it was committed."""
        if not self._done:
            shutil.rmtree(self.path, ignore_errors=True)
            self._done = True
