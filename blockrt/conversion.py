"""Stores converted from a checkpoint (storage dtypes it does not hold): written once, reused while the
checkpoint's content is the same.

What decides reuse is the checkpoint's content fingerprint (``integrity.py``: every byte of the tensors the plan
reads, with their names, dtypes and shapes), hashed while converting and recorded in the store's manifest
together with each checkpoint file's identity (path, size, mtime, ctime, inode, device). Reopening:

- the identity is compared first. Equal means the files were not written, replaced or touched since they were
  hashed: a write, a rename into place or ``os.utime`` (``cp -p``, ``rsync -t``, ``tar x``) all give the file a new
  ctime or inode, and no process can set those. The store is reused without reading the checkpoint.
- otherwise the checkpoint is hashed again, streamed one tensor at a time (a full read of the tensors the plan
  uses, about 0.6 s per GB when cached), and the store is reused only for the same fingerprint; its recorded
  identity is then refreshed so the next reopen is cheap again.

The default cache is ``<user cache>/stores/<key>-<fingerprint>`` (``cache_dir.py``: ``$BLOCKRT_CACHE``, else
``$XDG_CACHE_HOME/blockrt``, else ``~/.cache/blockrt``), never inside the checkpoint (a hub snapshot may be
read-only or shared); ``key`` hashes the checkpoint's real path and file names, the plan, the stored dtypes and
the prefix: a changed checkpoint gets a new directory, and a store another process may be streaming is never
rewritten. A store path given by the caller holds one conversion:
another checkpoint's is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch

from .cache_dir import user_cache_dir
from .errors import StoreError
from .guards import WriteLock, remove_stale
from .integrity import fingerprint
from .partitioners.plan import Plan
from .files import write_atomic
from .sources import CheckpointSource
from .store import StoreSource, open_store, read_manifest, wanted_dtypes, write_store

log = logging.getLogger(__name__)


def identity(source: CheckpointSource) -> list[list[Any]]:
    """Each file the plan reads: [absolute path, size, mtime_ns, ctime_ns, inode, device]."""
    out = []
    for path in source.files():
        st = os.stat(path)
        out.append([os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev])
    return out


def _recorded(root: Path) -> dict | None:
    """The manifest of a content-fingerprinted (format 3) store at ``root``, or None for anything else."""
    try:
        m = read_manifest(root)
    except (StoreError, OSError):
        return None
    return m if m["format_version"] >= 3 and isinstance(m.get("origin"), dict) else None


def _refresh(source: StoreSource, ident: list[list[Any]]) -> None:
    """Record the checkpoint's new identity after its content was found equal (best effort: a read-only store
    is just hashed again next time)."""
    m = source.manifest
    if m["format_version"] < 3 or not isinstance(m.get("origin"), dict) or m["origin"].get("identity") == ident:
        return
    m = {**m, "origin": {**m["origin"], "identity": ident}}
    try:
        write_atomic(source.root / "manifest.json", lambda f: f.write(json.dumps(m, indent=1).encode()))
        source.manifest = m
    except OSError as e:
        log.info("could not record the checkpoint's identity in %s (%s); it is hashed again next time", source.root, e)


def converted_store(source: CheckpointSource, plan: Plan, storage: dict[str, str | None],
                    store_path: str | os.PathLike | None, prefix: str = "", *, verify: bool = True,
                    packed: Collection[str] = ()) -> StoreSource:
    """The store holding ``source``'s blocks in the ``storage`` dtypes: reused when it exists for this
    checkpoint's content, plan and storage, else converted once (block by block, atomically). ``packed``: keys the
    packed kernels compute (``quantize.stored_dtype``).

    Default location: ``<checkpoint dir>/.blockrt/<key>-<fingerprint>`` (see the module docstring); a checkpoint
    directory that is not writable needs ``store_path``. ``verify``: check the pinned file's crc32 on opening.
    """
    wanted = wanted_dtypes(source, plan, storage, packed)
    ident = identity(source)  # before any read: a change while converting makes the next open hash again
    origin = {"kind": "checkpoint", "path": str(source.path), "prefix": prefix, "identity": ident}
    keys = sorted(plan.all_specs())

    def content() -> str:
        log.info("hashing %s to check the converted store (its files changed since it was converted)", source.description)
        return fingerprint(keys, source.read_tensor)

    if store_path is not None:
        root = Path(store_path)
        if not root.exists():
            root.parent.mkdir(parents=True, exist_ok=True)
            with WriteLock(root) as lock:
                lock.remove_stale()
                if not root.exists():
                    return write_store(root, plan, source.read_tensor, None, wanted, storage, origin)
        remove_stale(root)
        m = _recorded(root)
        if m is not None and m["origin"].get("identity") == ident:
            found = open_store(root, plan, None, wanted, verify=verify)
        else:
            found = open_store(root, plan, content(), wanted, verify=verify, weights=source.read_tensor)
        assert found is not None
        _refresh(found, ident)
        return found

    cache = user_cache_dir() / "stores"
    names = [Path(p).name for p in source.files()]
    base = hashlib.blake2b(json.dumps([str(source.path.resolve()), names, prefix, plan.to_dict(),
                                       sorted(wanted.items())]).encode(), digest_size=8).hexdigest()

    def cached(fp: str | None) -> tuple[StoreSource | None, str | None]:
        """A cached store for this checkpoint (by identity, else by content), and the content hash if computed."""
        candidates = sorted(cache.glob(f"{base}-*")) if cache.is_dir() else []
        for c in candidates:
            m = _recorded(c)
            if m is not None and m["origin"].get("identity") == ident:
                return open_store(c, plan, None, wanted, verify=verify), None
        if not candidates:
            return None, None
        fp = fp or content()
        found = open_store(cache / f"{base}-{fp[:16]}", plan, fp, wanted, verify=verify)
        if found is not None:
            _refresh(found, ident)
        return found, fp

    found, fp = cached(None)
    if found is not None:
        remove_stale(cache / base)
        return found
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"storage dtypes other than those {source.description} holds need a converted store, "
                         f"and blockrt's cache {cache} cannot be created ({e.strerror or e}); fix: set $BLOCKRT_CACHE "
                         "to a writable directory, pass RunConfig(store_path=<a writable directory>) or convert "
                         "ahead of time with blockrt.convert_store") from e
    if not os.access(cache, os.W_OK):
        raise StoreError(f"storage dtypes other than those {source.description} holds need a converted store, "
                         f"and blockrt's cache {cache} is not writable; fix: set $BLOCKRT_CACHE to a writable "
                         "directory, pass RunConfig(store_path=<a writable directory>) or convert ahead of time "
                         "with blockrt.convert_store")
    with WriteLock(cache / base) as lock:
        lock.remove_stale()
        found, fp = cached(fp)  # another process may have converted it while we waited
        if found is not None:
            return found
        return write_store(cache / base, plan, source.read_tensor, fp, wanted, storage, origin,
                           final=lambda f: cache / f"{base}-{f[:16]}")


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
