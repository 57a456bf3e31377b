"""``.bin`` checkpoints (``pytorch_model.bin`` or ``pytorch_model-*.bin`` + ``pytorch_model.bin.index.json``,
the real T5 repo's layout) read safely and converted once to safetensors.

``convert_bin_checkpoint`` writes safetensors shards (+ index) into a cache directory
(``<directory>/.blockrt-safetensors`` or ``cache_dir``), shard by shard, each read lazily with
``torch.load(..., weights_only=True, mmap=True)`` so memory stays bounded by one shard of clean file pages; later
calls reuse the conversion while the source files keep their identity (size, mtime, ctime, inode: ``cp -p`` of
other weights keeps the size and mtime but not the ctime, so it is caught). A pickle is never loaded without
``weights_only``; every refusal is a ``CheckpointError``.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from blockrt.errors import StoreError
from blockrt.files import replace_dir
from blockrt.guards import inside, read_json
from blockrt.pipelines.opensora.checkpoint_error import SHOWN, CheckpointError, contents

log = logging.getLogger(__name__)

CACHE_NAME = ".blockrt-safetensors"
CONVERSION_MANIFEST = "blockrt-conversion.json"
CONVERSION_FORMAT = "blockrt-bin-to-safetensors"
CONVERSION_VERSION = 1


def load_bin(path: str | Path) -> dict[str, torch.Tensor]:
    """A ``torch.save``'d state dict, read lazily (``mmap=True``) and only as tensors (``weights_only=True``).

    Raises:
        CheckpointError: the file is missing, truncated, in the legacy (non-zip) format, holds objects other
            than tensors (refused, never unpickled), or is not a flat ``{name: tensor}`` dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"expected the weight file {path}, but it does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: refused: the pickle holds objects other than tensors, and .bin files are only read with "
            f"torch.load(weights_only=True) ({first}); fix: re-save it as a plain state dict or as safetensors") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise CheckpointError(
            f"{path}: not a readable torch.save zip file ({type(e).__name__}: {str(e).strip().splitlines()[0]}); "
            "it is truncated, corrupt, or in the legacy pre-1.6 format; fix: download or re-save it") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict ({{name: tensor}}), found {type(obj).__name__}")
    bad = [f"{k!r} ({type(v).__name__})" for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise CheckpointError(f"{path}: expected a flat {{name: tensor}} state dict; these entries are not tensors: "
                              + ", ".join(bad[:SHOWN]))
    return obj


def bin_shards(d: Path) -> tuple[Path | None, list[Path]]:
    """(index file or None, shard files) of a directory's .bin checkpoint; no shards if there is none."""
    index = d / "pytorch_model.bin.index.json"
    if index.is_file():
        try:
            weight_map = read_json(index, "fix: use the index written with the checkpoint")["weight_map"]
            names = sorted(set(weight_map.values()))
        except (KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: expected a JSON object with a 'weight_map' of key -> shard file; "
                                  f"{type(e).__name__}: {e}") from None
        fix = "fix: keep every shard inside the checkpoint's directory (copy it there)"
        return index, [inside(d, n, str(index), fix, (index.resolve().parent,)) for n in names]
    single = d / "pytorch_model.bin"
    return None, [single] if single.is_file() else []


def _converted_name(name: str) -> str:
    """``pytorch_model-00001-of-00002.bin`` -> ``model-00001-of-00002.safetensors`` (the hub's own naming)."""
    stem = name.removesuffix(".bin")
    return (stem.replace("pytorch_model", "model", 1) if stem.startswith("pytorch_model") else stem) + ".safetensors"


def _stamp(files: list[Path]) -> list[list[Any]]:
    """Each source file's identity: name, size, mtime, ctime and inode. Rewriting a file or renaming another into
    its place changes its ctime or inode, which ``cp -p``, ``rsync -t`` or ``tar x`` cannot keep."""
    out = []
    for f in files:
        st = f.stat()
        out.append([f.name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino])
    return out


def _reusable(cache: Path, stamp: list[list[Any]]) -> bool:
    try:
        m = read_json(cache / CONVERSION_MANIFEST, "fix: delete the cache directory")
    except (OSError, StoreError):
        return False
    if not isinstance(m, dict) or m.get("format") != CONVERSION_FORMAT or m.get("version") != CONVERSION_VERSION \
            or m.get("sources") != stamp:
        return False
    files = m.get("files")
    return isinstance(files, dict) and bool(files) and all(
        isinstance(n, str) and "/" not in n and (cache / n).is_file() and (cache / n).stat().st_size == s
        for n, s in files.items())


def _convert_shard(shard: Path, out: Path) -> tuple[list[str], int, int]:
    """One .bin shard -> one safetensors file: (keys written, file size, data bytes). A tensor saved under
    two names (a tied weight: one storage) is written once, under its first name. Returning drops the mapping."""
    from blockrt.pipelines.opensora.tensor_files import write_safetensors

    sd = load_bin(shard)
    seen: dict[tuple, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and ident in seen:
            log.info("%s: %s is the same tensor as %s; written once", shard.name, key, seen[ident])
            continue
        seen[ident] = key
        tensors[key] = t
    log.info("converting %s -> %s (%d tensors)", shard, out, len(tensors))
    specs = [(k, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for k, t in tensors.items()]
    size = write_safetensors(out, specs, lambda k: tensors[k].contiguous())
    return list(tensors), size, sum(t.numel() * t.element_size() for t in tensors.values())


def convert_bin_checkpoint(directory: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Convert a directory's ``.bin`` checkpoint to safetensors once; return the converted directory.

    Shard by shard (each read lazily, tensor by tensor) into ``cache_dir`` (default
    ``<directory>/.blockrt-safetensors``): ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``
    (or ``model.safetensors`` for a single ``pytorch_model.bin``). A tensor saved under two names (a tied
    weight) is written once, under its first name. Built in a temporary directory and renamed; reused while
    the sources keep their identity (``_stamp``); a non-empty ``cache_dir`` that is not a
    conversion is never replaced.
    """
    d = Path(directory)
    index, shards = bin_shards(d)
    if not shards:
        raise CheckpointError(f"{d}: no pytorch_model.bin or pytorch_model.bin.index.json; found {contents(d)}")
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise CheckpointError(f"{index} names shard(s) that are missing from {d}: {', '.join(missing)}; "
                              "fix: download the missing shards")
    cache = Path(cache_dir) if cache_dir is not None else d / CACHE_NAME
    stamp = _stamp(shards)
    if _reusable(cache, stamp):
        return cache
    if cache.exists() and (not cache.is_dir() or (any(cache.iterdir()) and not (cache / CONVERSION_MANIFEST).is_file())):
        raise CheckpointError(f"cache directory {cache} exists and is not a blockrt conversion; refusing to replace "
                              "it; fix: pass another cache_dir")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{cache.name}-", dir=cache.parent))
    except OSError as e:
        raise CheckpointError(f"cannot write the safetensors conversion of {d} into {cache.parent} ({e}); "
                              "fix: pass cache_dir= a writable directory") from None
    try:
        weight_map: dict[str, str] = {}
        sizes: dict[str, int] = {}
        total = 0
        for shard in shards:
            out = _converted_name(shard.name)
            keys, sizes[out], nbytes = _convert_shard(shard, tmp / out)
            weight_map.update({k: out for k in keys})
            total += nbytes
        if index is not None:
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n")
        manifest = {"format": CONVERSION_FORMAT, "version": CONVERSION_VERSION, "source": str(d.resolve()),
                    "sources": stamp, "files": sizes}
        (tmp / CONVERSION_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        os.chmod(tmp, 0o755)
        replace_dir(tmp, cache)  # over a stale or damaged conversion of ours, or an empty directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return cache
