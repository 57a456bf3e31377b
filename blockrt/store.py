"""The block store: one safetensors file per block plus ``manifest.json``, written atomically.

Layout of a store directory::

    manifest.json          format, versions, the content fingerprint of the weights, the plan, per file its size,
                           crc32 and tensor layout, each block's storage dtype and each tensor's stored dtype
    pinned.safetensors     the pinned tensors, in the compute dtype (so a store alone is enough to run the model)
    blocks/0000.safetensors, blocks/0001.safetensors, ...   one contiguous file per block, its tensors in the
                           block's storage dtype (int8/int4 ones with ``key.scale``; see ``quantize.py``)

The directory is built under a temporary name beside its final path, every file fsynced, then renamed:
a crash never leaves a directory that looks complete. Writers of one store path hold a lock beside it
(``guards.WriteLock``): a second process waits and then reuses the finished store, and the lock's holder
removes temporary directories a killed writer left. Reopening a store for the same weights (the same content
fingerprint, see ``integrity.py``), plan and storage dtypes reuses it; for other weights, another plan or
other storage dtypes it is refused, never silently overwritten. Opening checks every file against the
manifest: its size, its header's layout, and the pinned file's crc32 (blocks' crc32 as the loader reads
them); file names stay inside the store. ``conversion.py`` writes stores from checkpoints.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from dataclasses import replace
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import torch

from .version import __version__
from .errors import StoreError
from .guards import WriteLock, check_space, disk_full, inside, is_disk_full, read_json, remove_stale
from .integrity import ContentHash, check_schema, expected_tensors, first_difference, verify_file
from .integrity import fingerprint as content_fingerprint
from .partitioners.plan import Plan, dtype_from_name
from .files import current_umask, fsync_dir
from .quantize import check_stored, has_scales, scale_elements, stored_dtype, stored_nbytes, to_storage
from . import int4
from .safetensors_format import read_layout, write_file
from .sources import WeightSource

FORMAT = "blockrt-store"
FORMAT_VERSION = 3  # v3: content fingerprint, each file's tensor layout; v2: storage dtypes; v1: all as computed
READABLE_VERSIONS = (1, 2, 3)
_DAMAGED = "fix: delete the store directory so it is written again"
_HEADER_BYTES = 256  # a generous upper bound of one tensor's entry in a safetensors header

TensorGetter = Callable[[str], torch.Tensor]


def fingerprint(plan: Plan, tensors: Mapping[str, torch.Tensor]) -> str:
    """The content fingerprint of the weights (``integrity.py``): every key, dtype, shape and all the bytes of
    each plan tensor, hashed in parallel threads (about 1.7 GB/s per core)."""
    return content_fingerprint(sorted(plan.all_specs()), tensors.__getitem__)


class StoreSource(WeightSource):
    """Blocks read from a store written by ``write_store``, every file checked against the manifest.

    ``verify``: also check the pinned file's crc32 now (blocks are checked by the loader as they load).
    """

    def __init__(self, root: Path, manifest: dict, verify: bool = True) -> None:
        self.root = root
        self.description = f"store {root}"
        self.manifest = manifest
        plan = Plan.from_dict(manifest["plan"])
        files = manifest["files"]
        segments = {}
        where = f"{root / 'manifest.json'}"
        for i, (entry, want) in enumerate(zip([files["pinned"], *files["blocks"]], expected_tensors(plan, manifest))):
            path = inside(root, entry["file"], where, _DAMAGED)
            segments.update(verify_file(str(path), entry, want, check_bytes=verify and i == 0).segments)
        specs = plan.all_specs()
        for entry in files["blocks"]:  # int4: the packed uint8 bytes stand for the tensor's own shape
            for key, d in entry.get("stored", {}).items():
                if int4.any_group_of(d) is not None and key in segments:
                    segments[key] = replace(segments[key], dtype=d, shape=tuple(specs[key].shape))
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


def read_manifest(root: Path) -> dict:
    """The manifest of the store at ``root``, its format, version and field types checked."""
    path = root / "manifest.json"
    if not path.exists() and not path.is_symlink():
        raise StoreError(
            f"{root} exists but is not a blockrt store (no manifest.json); "
            "fix: pass another store path or remove that directory"
        )
    manifest = read_json(path, _DAMAGED)
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or version not in READABLE_VERSIONS:
        found = f"{manifest.get('format')!r} v{version!r}" if isinstance(manifest, dict) else type(manifest).__name__
        raise StoreError(
            f"{root}: expected a {FORMAT} manifest of version {' or '.join(map(str, READABLE_VERSIONS))}, found "
            f"{found}; fix: delete it so it is rewritten"
        )
    check_schema(path, manifest, version)
    return manifest


def _check_manifest(root: Path, plan: Plan, fp: str | None, wanted: dict[str, str] | None) -> dict:
    manifest = read_manifest(root)
    path = root / "manifest.json"
    if fp is not None and manifest["format_version"] >= 3 and manifest["fingerprint"] != fp:
        raise StoreError(
            f"store {root} was written for other weights (fingerprint {manifest['fingerprint']}, "
            f"this model's is {fp}); fix: pass a different store path, or delete that store"
        )
    try:
        stored_plan = Plan.from_dict(manifest["plan"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise StoreError(f"{path}: the plan in the manifest cannot be read ({type(e).__name__}: {e}); "
                         "fix: delete the store directory so it is rewritten") from None
    if stored_plan != plan:
        raise StoreError(
            f"store {root} holds these weights split by another plan "
            f"({len(stored_plan.blocks)} blocks vs {len(plan.blocks)} now); "
            "fix: use the same partitioner settings, another store path, or delete that store"
        )
    n = len(manifest["files"]["blocks"])
    if n != len(plan.blocks):
        raise StoreError(f"{path}: expected a file entry for each of the plan's {len(plan.blocks)} blocks, found {n}; "
                         f"the manifest is damaged; {_DAMAGED}")
    if wanted is not None:
        held = {k: d for b in manifest["files"]["blocks"] for k, d in b.get("stored", {}).items()}
        problem = _mismatch(f"store {root}", plan, held, wanted)
        if problem:
            raise StoreError(problem)
    return manifest


def open_store(root: str | os.PathLike, plan: Plan, fingerprint: str | None, stored: dict[str, str] | None = None,
               *, verify: bool = True, weights: TensorGetter | None = None) -> StoreSource | None:
    """Open an existing store for this plan; None if ``root`` does not exist.

    With a ``fingerprint`` (of the model's weights in memory, or of the checkpoint it was converted from)
    the store must hold those weights; None (a skeleton streamed from the store) skips that check. With
    ``stored`` (key -> stored dtype, see ``quantize.stored_dtypes``) every block tensor must be stored so;
    None accepts the storage dtypes the store holds. ``verify``: check the pinned file's crc32 now.
    ``weights`` (key -> tensor, what ``fingerprint`` was computed from) lets a store written before content
    fingerprints (format 1 or 2) be reused: its bytes are compared with the weights instead (a full read).
    """
    root = Path(root)
    if not root.exists():
        return None
    manifest = _check_manifest(root, plan, fingerprint, stored)
    source = StoreSource(root, manifest, verify)
    check_stored(plan, source.segments, source.description)
    if fingerprint is not None and manifest["format_version"] < 3:
        if weights is None:
            version = manifest.get("blockrt_version", "(an older version)")
            raise StoreError(f"store {root} was written by blockrt {version}, whose "
                             "fingerprint sampled the weights and cannot tell whether it holds these ones; "
                             "fix: delete it so it is written again")
        key = first_difference(plan, manifest, source.read_tensor, weights)
        if key is not None:
            raise StoreError(f"store {root} was written for other weights (tensor {key!r} differs); "
                             "fix: pass a different store path, or delete that store")
    return source


def stored_size(plan: Plan, stored: dict[str, str]) -> int:
    """Bytes of a store of ``plan`` with tensors stored as ``stored``: data plus a bound of the headers."""
    total = plan.pinned_bytes + _HEADER_BYTES * (len(plan.pinned) + 1)
    for b in plan.blocks:
        for t in b.tensors:
            d = stored.get(t.key, t.dtype)
            total += stored_nbytes(t, d) + _HEADER_BYTES
            if has_scales(d) and t.dtype != "int8":
                total += 4 * scale_elements(t, d) + _HEADER_BYTES
        total += _HEADER_BYTES
    return total + len(plan.to_json()) * 2 + 4096  # the manifest


def open_or_write(root: str | os.PathLike, plan: Plan, tensors: Mapping[str, torch.Tensor], stored: dict[str, str],
                  storage: dict[str, str | None] | None = None, *, verify: bool = True) -> StoreSource:
    """The store of the in-memory ``tensors`` at ``root``: reused when it holds them (their content fingerprint,
    hashed in full), else written, holding the lock beside ``root``; a second process writing the same path
    waits for the first and reuses its store. Unfinished stores a killed writer left are removed first."""
    root = Path(root)
    if not root.exists():
        with WriteLock(root) as lock:
            lock.remove_stale()
            if not root.exists():
                return write_store(root, plan, tensors, None, stored, storage)
    else:
        remove_stale(root)  # cheap; only when no other process is writing
    return open_store(root, plan, fingerprint(plan, tensors), stored, verify=verify, weights=tensors.__getitem__)


def write_store(root: str | os.PathLike, plan: Plan, tensors: Mapping[str, torch.Tensor] | TensorGetter,
                fp: str | None = None, stored: dict[str, str] | None = None,
                storage: dict[str, str | None] | None = None, origin: dict[str, Any] | None = None,
                *, final: Callable[[str], Path] | None = None) -> StoreSource:
    """Write every block and the pinned part of ``tensors`` (by owner key) as a store at ``root``.

    The caller holds ``guards.WriteLock(root)`` when other processes may write the same path.

    Args:
        tensors: the weights: a mapping, or a function key -> tensor called one block at a time (a checkpoint
            read block by block never holds more than one block in memory).
        fp: the fingerprint the weights should have; None: none expected. Either way the manifest records the
            content fingerprint of the tensors as they are written, hashed while writing them.
        stored: key -> stored dtype of each streamed tensor (``quantize.stored_dtypes``); default: as computed.
            Pinned tensors are always written in their compute dtype.
        storage: block name -> the storage dtype asked for it, recorded in the manifest.
        origin: what the weights came from, recorded in the manifest.
        final: where the finished store goes, given its fingerprint (a cache named by content); default ``root``,
            which then only names the temporary directory.
    """
    root = Path(root)
    if root.exists():
        raise StoreError(f"{root} already exists; fix: open it with open_store or choose another path")
    get = tensors.__getitem__ if isinstance(tensors, Mapping) else tensors
    stored = stored or {}
    needed = stored_size(plan, stored)
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        check_space(root, needed)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    except OSError as e:
        if is_disk_full(e) or isinstance(e, StoreError):
            raise
        raise StoreError(f"cannot write the store {root}: {e.strerror or e} ({e.filename or root.parent}); "
                         "fix: pass a store path on a writable disk (store=, RunConfig(store_path=...))") from e
    content = ContentHash()
    written = 0

    def source(key: str) -> torch.Tensor:
        t = get(key)
        content.add(key, t)  # the fingerprint of what is written, hashed as it is written
        return t

    try:
        (tmp / "blocks").mkdir()
        pinned = {t.key: source(t.key).detach().to(dtype_from_name(t.dtype)) for t in plan.pinned}
        size, crc = write_file(tmp / "pinned.safetensors", pinned)
        written += size
        del pinned
        files: dict[str, Any] = {"pinned": {"file": "pinned.safetensors", "size": size, "crc32": crc,
                                            "tensors": read_layout(tmp / "pinned.safetensors").layout()}, "blocks": []}
        for i, block in enumerate(plan.blocks):
            name = f"blocks/{i:04d}.safetensors"
            dtypes = {t.key: stored.get(t.key, t.dtype) for t in block.tensors}
            out: dict[str, torch.Tensor] = {}
            for key, dtype in dtypes.items():  # one block of converted tensors in memory at a time
                out.update(to_storage(key, source(key), dtype))
            want = (storage or {}).get(block.name)
            size, crc = write_file(tmp / name, out, {"block": block.name, "storage_dtype": want or "as computed"})
            written += size
            data = sum(v.numel() * v.element_size() for v in out.values())
            del out
            files["blocks"].append({"file": name, "size": size, "crc32": crc, "nbytes": block.nbytes,
                                    "stored_bytes": data, "storage_dtype": want, "stored": dtypes,
                                    "tensors": read_layout(tmp / name).layout()})
        fsync_dir(tmp / "blocks")
        found = content.hexdigest()
        if fp is not None and found != fp:
            raise StoreError(f"the weights changed while the store {root} was written (fingerprint {found}, expected "
                             f"{fp}); nothing was kept; fix: run again once the weights stay unchanged")
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "blockrt_version": __version__,
            "fingerprint": found,
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
        dest = final(found) if final is not None else root
        try:
            os.rename(tmp, dest)  # atomic: the store appears complete or not at all
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another writer finished first: use its store if it is ours
            done = open_store(dest, plan, found, stored, verify=False)
            if done is None:
                raise
            return done
        fsync_dir(dest.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e) and not isinstance(e, StoreError):
            raise disk_full(root, needed, written) from e
        raise
    return StoreSource(dest, manifest, verify=False)


def wanted_dtypes(source: WeightSource, plan: Plan, storage: dict[str, str | None],
                  packed: Collection[str] = ()) -> dict[str, str]:
    """Each streamed tensor's stored dtype for ``storage`` (block name -> storage dtype); a block asked for
    None keeps the dtypes ``source`` holds it in. ``packed``: keys the packed kernels compute (``stored_dtype``)."""
    out = {}
    for b in plan.blocks:
        asked = storage.get(b.name)
        for t in b.tensors:
            out[t.key] = source.segment(t.key).dtype if asked is None else stored_dtype(t, asked, t.key in packed)
    return out


def needs_conversion(source: WeightSource, plan: Plan, storage: dict[str, str | None],
                     packed: Collection[str] = ()) -> bool:
    """Whether ``source`` holds some block tensor in another dtype than ``storage`` asks for."""
    wanted = wanted_dtypes(source, plan, storage, packed)
    return any(source.segment(k).dtype != d for k, d in wanted.items())


def require_storage(source: WeightSource, plan: Plan, storage: dict[str, str | None],
                    packed: Collection[str] = ()) -> None:
    """Refuse a store that holds some block in another dtype than ``storage`` asks for (a store is never
    converted into another one: convert the checkpoint again, with ``convert_store``)."""
    held = {k: source.segment(k).dtype for b in plan.blocks for k in b.keys}
    problem = _mismatch(source.description, plan, held, wanted_dtypes(source, plan, storage, packed))
    if problem:
        raise StoreError(problem)
