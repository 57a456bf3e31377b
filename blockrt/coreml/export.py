"""``export_blocks``: convert a list of ``ExportBlock``s into ``.mlpackage``s plus the ``export.json`` manifest.

The output directory is staged beside its final path and renamed into place at the end (``outdir.py``),
so a failed or interrupted export leaves no directory that looks complete and never damages an existing
one. Blocks are converted one at a time in run order and released (``gc``) before the next, so peak memory
is one block's module, trace and MLModel.
"""

from __future__ import annotations

import gc
import json
import logging
import platform
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..version import __version__
from .convert import convert_block
from .inspect import WEIGHTS_DIR, dir_bytes
from .manifest import MANIFEST, ExportManifest, PackageEntry, check_wiring
from .outdir import StagedDir
from .spec import ExportBlock, ExportError, ExportOptions

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]


def export_blocks(blocks: Sequence[ExportBlock] | Iterable[ExportBlock], out_dir: str | Path,
                  options: ExportOptions = ExportOptions(), *, overwrite: bool = False,
                  progress: Progress | None = None, wiring: dict[str, str] | None = None,
                  extra: dict | None = None, pinned: Sequence[str] = (), total: int | None = None) -> ExportManifest:
    """Convert each block to ``<out_dir>/<block.name>.mlpackage`` and write ``<out_dir>/export.json``.

    Args:
        blocks: the packages to produce, in run order (a sequence, or an iterable that builds each block when
            it is reached, e.g. binding one block's weights at a time; give ``total`` then).
        out_dir: the export directory; built atomically. An existing directory that is not a blockrt export
            is refused untouched; a previous export is replaced only with ``overwrite=True``.
        options: precision, quantization, target and checks for every block (a block may override ``quantize``).
        progress: called after each package is saved as ``progress(done, total, block_name)``.
        wiring: ``"<package>.<input>" -> "<package>.<output>"`` or ``"input:<name>"`` (app-provided); recorded
            in the manifest and checked against the blocks' names.
        extra: free-form JSON-serialisable data stored in the manifest (``manifest.extra``).
        pinned: state-dict keys of tensors the app keeps outside the packages (recorded in the manifest).
        total: the number of blocks when ``blocks`` has no ``len()`` (for ``progress``).

    Returns:
        The ``ExportManifest`` written to ``export.json``.

    Raises:
        ExportError: the output directory may not be written, or a block fails (names the block and the op).

    Example:
        >>> block = ExportBlock("layer_0", model.layers[0], (x,), ("x",), ("y",), flexible={"x": (1, (1, 512), 64)})
        >>> manifest = export_blocks([block], "out/coreml", ExportOptions(precision="fp16", quantize="int8"))
    """
    if not isinstance(options, ExportOptions):
        raise TypeError(f"options must be an ExportOptions, got {type(options).__name__}")
    if isinstance(blocks, Sequence):
        total = len(blocks)
        _check_names([b.name for b in blocks])
        check_wiring(dict(wiring or {}), {b.name: (b.input_names, b.output_names) for b in blocks})
    _check_json("extra", extra or {})
    n = total if total is not None else 0
    stage = StagedDir(out_dir, overwrite)
    try:
        entries: list[PackageEntry] = []
        io: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
        for i, block in enumerate(blocks):
            if block.name in io:
                raise ExportError(f"two blocks are named {block.name!r}; package names must be unique", block=block.name)
            io[block.name] = (block.input_names, block.output_names)
            _check_json(f"meta of block {block.name!r}", block.meta)
            entries.append(_export_one(block, i, stage.path, options))
            if progress is not None:
                progress(i + 1, max(n, i + 1), block.name)
            gc.collect()
        if not entries:
            raise ExportError("no blocks to export; expected at least one ExportBlock")
        check_wiring(dict(wiring or {}), io)
        manifest = ExportManifest(packages=entries, options=options, wiring=dict(wiring or {}), pinned=list(pinned),
                                  extra=dict(extra or {}), versions=versions())
        manifest.validate()
        (stage.path / MANIFEST).write_text(manifest.to_json())
        stage.commit()
    finally:
        stage.discard()
    return manifest


def _export_one(block: ExportBlock, order: int, root: Path, options: ExportOptions) -> PackageEntry:
    t0 = time.perf_counter()
    converted = convert_block(block, options)
    file = f"{block.name}.mlpackage"
    t1 = time.perf_counter()
    try:
        converted.mlmodel.save(str(root / file))
    except Exception as e:
        raise ExportError(f"block {block.name!r}: saving {file} failed: {type(e).__name__}: {e}", block=block.name) from e
    converted.seconds["save_s"] = time.perf_counter() - t1
    converted.seconds["total_s"] = time.perf_counter() - t0
    del converted.mlmodel
    pkg = root / file
    log.info("exported %s (%d bytes) in %.2fs", file, dir_bytes(pkg), converted.seconds["total_s"])
    return PackageEntry(
        name=block.name, file=file, order=order, inputs=converted.inputs, outputs=converted.outputs,
        bytes=dir_bytes(pkg), weight_bytes=dir_bytes(pkg / WEIGHTS_DIR) if (pkg / WEIGHTS_DIR).is_dir() else 0,
        precision=options.precision, quantization=converted.quantization, checks=converted.checks,
        seconds={k: round(v, 4) for k, v in converted.seconds.items()}, meta=dict(block.meta))


def _check_names(names: list[str]) -> None:
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ExportError(f"package names must be unique; duplicated: {dup}")


def versions() -> dict[str, str]:
    """The versions recorded in a manifest: blockrt, coremltools, torch, python, platform."""
    import coremltools as ct

    return {"blockrt": __version__, "coremltools": ct.__version__, "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def _check_json(what: str, value: Any) -> None:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise ExportError(f"{what} must be JSON-serialisable (it goes into {MANIFEST}): {e}") from None
