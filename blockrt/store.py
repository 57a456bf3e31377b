"""The block store: one safetensors file per block plus ``manifest.json``, written atomically.

Layout of a store directory::

    manifest.json          format, versions, fingerprint of the weights, the plan, per-file size and crc32,
                           each block's storage dtype and each tensor's stored dtype
    pinned.safetensors     the pinned tensors, in the compute dtype (so a store alone is enough to run the model)
    blocks/0000.safetensors, blocks/0001.safetensors, ...   one contiguous file per block, its tensors in the
                           block's storage dtype (int8 ones with ``key.scale``; see ``quantize.py``)

The directory is built under a temporary name beside its final path, every file fsynced, then renamed:
a crash never leaves a directory that looks complete. Reopening a store for the same weights, plan and
storage dtypes reuses it; for other weights, another plan or other storage dtypes it is refused, never
silently overwritten. ``convert_store`` writes a store from a checkpoint block by block (in another storage
dtype); ``converted_store`` does that once and caches it for ``blockrt.run(weights=...)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .version import __version__
from .errors import StoreError
from .partitioners.plan import Plan, dtype_from_name
from .files import current_umask, fsync_dir
from .quantize import check_stored, stored_dtype, to_storage
from .safetensors_format import read_header, write_file
from .sources import CheckpointSource, WeightSource

FORMAT = "blockrt-store"
FORMAT_VERSION = 2  # v2: storage dtypes per block and per tensor; v1 stores (all as computed) still open
READABLE_VERSIONS = (1, 2)
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


def checkpoint_fingerprint(source: WeightSource, plan: Plan, prefix: str = "") -> str:
    """A fingerprint of a checkpoint as a plan reads it: each file's name, size and modification time, and
    where and how each plan tensor is stored (file, offset, dtype, shape). Free to compute at any size; a
    checkpoint rewritten in place gets a new mtime and so a new fingerprint."""
    h = hashlib.blake2b(digest_size=16)
    h.update(prefix.encode())
    for path in source.files():
        st = os.stat(path)
        h.update(f"{Path(path).name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    for key in sorted(plan.all_specs()):
        seg = source.segment(key)
        h.update(f"{key}|{Path(seg.path).name}|{seg.offset}|{seg.dtype}|{seg.shape}\n".encode())
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


def _mismatch(where: str, plan: Plan, held: dict[str, str], wanted: dict[str, str]) -> str | None:
    """A message naming the first block whose stored dtypes differ, or None when they all agree."""
    for b in plan.blocks:
        diff = [t.key for t in b.tensors if held.get(t.key, t.dtype) != wanted[t.key]]
        if diff:
            k = diff[0]
            return (f"{where} holds block {b.name!r} in other storage dtypes than this run asks for "
                    f"({k!r} is stored as {held.get(k, plan.all_specs()[k].dtype)}, wanted {wanted[k]}; "
                    f"{len(diff)} tensor(s) differ in that block); fix: pass another store path, delete that store, "
                    "or ask for the storage_dtype it was written with")
    return None


def _check_manifest(root: Path, plan: Plan, fp: str | None, wanted: dict[str, str] | None) -> dict:
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
    if manifest.get("format") != FORMAT or manifest.get("format_version") not in READABLE_VERSIONS:
        raise StoreError(
            f"{root}: expected a {FORMAT} manifest of version {' or '.join(map(str, READABLE_VERSIONS))}, found "
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
    if wanted is not None:
        held = {k: d for b in manifest["files"]["blocks"] for k, d in b.get("stored", {}).items()}
        problem = _mismatch(f"store {root}", plan, held, wanted)
        if problem:
            raise StoreError(problem)
    return manifest


def open_store(root: str | os.PathLike, plan: Plan, fingerprint: str | None,
               stored: dict[str, str] | None = None) -> StoreSource | None:
    """Open an existing store for this plan; None if ``root`` does not exist.

    With a ``fingerprint`` (of the model's weights in memory, or of the checkpoint it was converted from)
    the store must hold those weights; None (a skeleton streamed from the store) skips that check. With
    ``stored`` (key -> stored dtype, see ``quantize.stored_dtypes``) every block tensor must be stored so;
    None accepts the storage dtypes the store holds.
    """
    root = Path(root)
    if not root.exists():
        return None
    source = StoreSource(root, _check_manifest(root, plan, fingerprint, stored))
    check_stored(plan, source.segments, source.description)
    return source


TensorGetter = Callable[[str], torch.Tensor]


def write_store(root: str | os.PathLike, plan: Plan, tensors: Mapping[str, torch.Tensor] | TensorGetter, fp: str,
                stored: dict[str, str] | None = None, storage: dict[str, str | None] | None = None,
                origin: dict[str, Any] | None = None) -> StoreSource:
    """Write every block and the pinned part of ``tensors`` (by owner key) as a store at ``root``.

    Args:
        tensors: the weights: a mapping, or a function key -> tensor called one block at a time (a checkpoint
            read block by block never holds more than one block in memory).
        fp: the fingerprint recorded in the manifest.
        stored: key -> stored dtype of each streamed tensor (``quantize.stored_dtypes``); default: as computed.
            Pinned tensors are always written in their compute dtype.
        storage: block name -> the storage dtype asked for it, recorded in the manifest.
        origin: what the weights came from, recorded in the manifest.
    """
    root = Path(root)
    if root.exists():
        raise StoreError(f"{root} already exists; fix: open it with open_store or choose another path")
    get = tensors.__getitem__ if isinstance(tensors, Mapping) else tensors
    stored = stored or {}
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        (tmp / "blocks").mkdir()
        pinned = {t.key: get(t.key).detach().to(dtype_from_name(t.dtype)) for t in plan.pinned}
        size, crc = write_file(tmp / "pinned.safetensors", pinned)
        del pinned
        files: dict[str, Any] = {"pinned": {"file": "pinned.safetensors", "size": size, "crc32": crc}, "blocks": []}
        for i, block in enumerate(plan.blocks):
            name = f"blocks/{i:04d}.safetensors"
            dtypes = {t.key: stored.get(t.key, t.dtype) for t in block.tensors}
            out: dict[str, torch.Tensor] = {}
            for key, dtype in dtypes.items():  # one block of converted tensors in memory at a time
                out.update(to_storage(key, get(key), dtype))
            want = (storage or {}).get(block.name)
            size, crc = write_file(tmp / name, out, {"block": block.name, "storage_dtype": want or "as computed"})
            data = sum(v.numel() * v.element_size() for v in out.values())
            del out
            files["blocks"].append({"file": name, "size": size, "crc32": crc, "nbytes": block.nbytes,
                                    "stored_bytes": data, "storage_dtype": want, "stored": dtypes})
        fsync_dir(tmp / "blocks")
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "blockrt_version": __version__,
            "fingerprint": fp,
            "origin": origin or {"kind": "model"},
            "total_bytes": plan.total_bytes,
            "stored_bytes": sum(b["stored_bytes"] for b in files["blocks"]),
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


def wanted_dtypes(source: WeightSource, plan: Plan, storage: dict[str, str | None]) -> dict[str, str]:
    """Each streamed tensor's stored dtype for ``storage`` (block name -> storage dtype); a block asked for
    None keeps the dtypes ``source`` holds it in."""
    out = {}
    for b in plan.blocks:
        asked = storage.get(b.name)
        for t in b.tensors:
            out[t.key] = source.segment(t.key).dtype if asked is None else stored_dtype(t, asked)
    return out


def needs_conversion(source: WeightSource, plan: Plan, storage: dict[str, str | None]) -> bool:
    """Whether ``source`` holds some block tensor in another dtype than ``storage`` asks for."""
    wanted = wanted_dtypes(source, plan, storage)
    return any(source.segment(k).dtype != d for k, d in wanted.items())


def require_storage(source: WeightSource, plan: Plan, storage: dict[str, str | None]) -> None:
    """Refuse a store that holds some block in another dtype than ``storage`` asks for (a store is never
    converted into another one: convert the checkpoint again, with ``convert_store``)."""
    held = {k: source.segment(k).dtype for b in plan.blocks for k in b.keys}
    problem = _mismatch(source.description, plan, held, wanted_dtypes(source, plan, storage))
    if problem:
        raise StoreError(problem)


def converted_store(source: CheckpointSource, plan: Plan, storage: dict[str, str | None],
                    store_path: str | os.PathLike | None, prefix: str = "") -> StoreSource:
    """The store holding ``source``'s blocks in the ``storage`` dtypes: reused when it exists for this
    checkpoint, plan and storage, else converted once (block by block, atomically).

    Default location: ``<checkpoint dir>/.blockrt/<hash of checkpoint, plan and stored dtypes>``; a checkpoint
    directory that is not writable needs ``store_path``.
    """
    wanted = wanted_dtypes(source, plan, storage)
    fp = checkpoint_fingerprint(source, plan, prefix)
    if store_path is None:
        home = source.path if source.path.is_dir() else source.path.parent
        key = hashlib.blake2b(json.dumps([fp, plan.to_dict(), sorted(wanted.items())]).encode(), digest_size=8)
        store_path = home / ".blockrt" / key.hexdigest()
        if not store_path.exists() and not os.access(home / ".blockrt" if (home / ".blockrt").exists() else home,
                                                      os.W_OK):
            raise StoreError(f"storage dtypes other than those {source.description} holds need a converted store, "
                             f"and {home} is not writable for its cache; fix: pass RunConfig(store_path=<a writable "
                             "directory>) or convert ahead of time with blockrt.convert_store")
    found = open_store(store_path, plan, fp, wanted)
    if found is not None:
        return found
    origin = {"kind": "checkpoint", "path": str(source.path), "prefix": prefix}
    try:
        return write_store(store_path, plan, source.read_tensor, fp, wanted, storage, origin)
    except (StoreError, OSError):
        found = open_store(store_path, plan, fp, wanted)  # another process finished the same conversion first
        if found is None:
            raise
        return found


def convert_store(model_or_plan: "torch.nn.Module | Plan", weights: str | os.PathLike, out: str | os.PathLike,
                  storage_dtype: str | dict[str, str] | None, *, weights_prefix: str = "",
                  strict_keys: bool = True) -> Path:
    """Convert a checkpoint into a store at ``out`` ahead of time, block by block (never more than one block
    in memory), its blocks in ``storage_dtype`` (as ``RunConfig.storage_dtype``; None = as the checkpoint holds
    them). Reuses ``out`` when it already holds this checkpoint so; refuses one holding anything else. Stream
    it with ``blockrt.run(skeleton, budget, weights=out)``.

    Args:
        model_or_plan: the model (a ``meta_weights()`` skeleton is enough; partitioned by the registry with
            default settings) or the ``Plan`` the run will use.
        weights: the checkpoint (safetensors file, sharded index or directory).
        out: the store directory to write.
        weights_prefix, strict_keys: as in ``RunConfig``.

    Returns:
        ``out`` as a Path.

    Example:
        >>> blockrt.convert_store(skeleton, "t5-v1_1-xxl/", "t5-int8/", "int8")
    """
    from .config import RunConfig

    if isinstance(model_or_plan, Plan):
        plan = model_or_plan
    else:
        from blockrt.partitioners import partition

        plan = partition(model_or_plan)
    config = RunConfig(storage_dtype=storage_dtype)
    source = CheckpointSource(weights)
    source.resolve(plan, strict=strict_keys, prefix=weights_prefix)
    storage = {b.name: config.storage_for(b.name) for b in plan.blocks}
    return converted_store(source, plan, storage, out, weights_prefix).root
