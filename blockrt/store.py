"""The block store: one safetensors file per block plus ``manifest.json``, written atomically.

Layout of a store directory::

    manifest.json          format, versions, fingerprint of the weights, the plan, per-file size and crc32
    pinned.safetensors     the pinned tensors (so a store alone is enough to run the model)
    blocks/0000.safetensors, blocks/0001.safetensors, ...   one contiguous file per block

The directory is built under a temporary name beside its final path, every file fsynced, then renamed:
a crash never leaves a directory that looks complete. Reopening a store for the same weights and plan
reuses it; for other weights or another plan it is refused, never silently overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from . import __version__
from .errors import StoreError
from .plan import Plan
from .profile import current_umask
from .safetensors_format import fsync_dir, read_header, write_file
from .sources import WeightSource

FORMAT = "blockrt-store"
FORMAT_VERSION = 1
_SAMPLES = 64  # chunks hashed per tensor by the fingerprint
_CHUNK = 64  # bytes per chunk


def fingerprint(plan: Plan, tensors: dict[str, torch.Tensor]) -> str:
    """A fingerprint of the weights: every key, dtype and shape, plus 64 evenly spaced 64-byte samples
    of each tensor's data (all of it for small tensors). Cheap for any model size, and different for
    any two differently initialised or fine-tuned models."""
    h = hashlib.blake2b(digest_size=16)
    for key, spec in sorted(plan.all_specs().items()):
        h.update(f"{key}|{spec.dtype}|{spec.shape}\n".encode())
        flat = tensors[key].detach().reshape(-1).view(torch.uint8)
        n = flat.numel()
        if n <= _SAMPLES * _CHUNK:
            h.update(flat.numpy().tobytes())
        else:
            step = (n - _CHUNK) // (_SAMPLES - 1)
            idx = (torch.arange(_SAMPLES) * step)[:, None] + torch.arange(_CHUNK)[None, :]
            h.update(flat[idx.reshape(-1)].numpy().tobytes())
    return h.hexdigest()


class StoreSource(WeightSource):
    """Blocks read from a store written by ``write_store``."""

    def __init__(self, root: Path, manifest: dict) -> None:
        self.root = root
        self.description = f"store {root}"
        self.manifest = manifest
        segments = {}
        for entry in [manifest["files"]["pinned"], *manifest["files"]["blocks"]]:
            path = root / entry["file"]
            size = path.stat().st_size if path.exists() else None
            if size != entry["size"]:
                found = "no file" if size is None else f"{size} bytes"
                raise StoreError(
                    f"store {root}: {entry['file']} should have {entry['size']} bytes, found {found}: "
                    "the store is damaged; fix: delete the store directory so it is written again"
                )
            segs, _ = read_header(path)
            segments.update(segs)
        super().__init__(segments)

    def block_crc32(self, block_index: int) -> int | None:
        return self.manifest["files"]["blocks"][block_index]["crc32"]


def _check_manifest(root: Path, plan: Plan, fp: str | None) -> dict:
    path = root / "manifest.json"
    if not path.exists():
        raise StoreError(
            f"{root} exists but is not a blockrt store (no manifest.json); "
            "fix: pass another store path or remove that directory"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise StoreError(f"{path} is not valid JSON ({e}); fix: delete the store directory") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise StoreError(
            f"{root}: expected a {FORMAT} v{FORMAT_VERSION} manifest, found "
            f"{manifest.get('format')!r} v{manifest.get('format_version')!r}; fix: delete it so it is rewritten"
        )
    if fp is not None and manifest["fingerprint"] != fp:
        raise StoreError(
            f"store {root} was written for other weights (fingerprint {manifest['fingerprint']}, "
            f"this model's is {fp}); fix: pass a different store path, or delete that store"
        )
    try:
        stored_plan = Plan.from_dict(manifest["plan"])
    except (KeyError, TypeError, ValueError) as e:
        raise StoreError(f"{path}: the plan in the manifest cannot be read ({type(e).__name__}: {e}); "
                         "fix: delete the store directory so it is rewritten") from None
    if stored_plan != plan:
        raise StoreError(
            f"store {root} holds these weights split by another plan "
            f"({len(manifest['plan']['blocks'])} blocks vs {len(plan.blocks)} now); "
            "fix: use the same partitioner settings, another store path, or delete that store"
        )
    return manifest


def open_store(root: str | os.PathLike, plan: Plan, fingerprint: str | None) -> StoreSource | None:
    """Open an existing store for this plan; None if ``root`` does not exist.

    With a ``fingerprint`` (of the model's weights in memory) the store must hold those weights; None
    (a skeleton streamed from the store) skips that check.
    """
    root = Path(root)
    if not root.exists():
        return None
    return StoreSource(root, _check_manifest(root, plan, fingerprint))


def write_store(root: str | os.PathLike, plan: Plan, tensors: dict[str, torch.Tensor], fp: str) -> StoreSource:
    """Write every block and the pinned part of ``tensors`` (by owner key) as a store at ``root``."""
    root = Path(root)
    if root.exists():
        raise StoreError(f"{root} already exists; fix: open it with open_store or choose another path")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        (tmp / "blocks").mkdir()
        size, crc = write_file(tmp / "pinned.safetensors", {t.key: tensors[t.key] for t in plan.pinned})
        files = {"pinned": {"file": "pinned.safetensors", "size": size, "crc32": crc}, "blocks": []}
        for i, block in enumerate(plan.blocks):
            name = f"blocks/{i:04d}.safetensors"
            size, crc = write_file(tmp / name, {k: tensors[k] for k in block.keys}, {"block": block.name})
            files["blocks"].append({"file": name, "size": size, "crc32": crc, "nbytes": block.nbytes})
        fsync_dir(tmp / "blocks")
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "blockrt_version": __version__,
            "fingerprint": fp,
            "total_bytes": plan.total_bytes,
            "dtypes": sorted({s.dtype for s in plan.all_specs().values()}),
            "files": files,
            "plan": plan.to_dict(),
        }
        with open(tmp / "manifest.json", "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; a store is shared like any directory
        fsync_dir(tmp)
        os.rename(tmp, root)  # atomic: the store appears complete or not at all
        fsync_dir(root.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return StoreSource(root, manifest)
