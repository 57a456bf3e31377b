"""Integrity of the weights blockrt reads: the content fingerprint that decides whether a store may be reused,
the store manifest's schema, and every store file's header and bytes checked against the manifest.

- **Content fingerprint**: sha256 over every tensor's key, dtype, shape and all of its bytes, hashed in 16 MiB
  leaves (in threads: ``hashlib`` releases the GIL) combined in key order, kept to 128 bits. A store records
  the fingerprint of the weights it was written from, hashed while they were written; a converted store
  records the checkpoint's (its tensors as read, before conversion).
- **Manifest schema**: ``check_schema`` refuses a manifest whose fields have the wrong types with a
  ``StoreError`` (never a ``KeyError`` later).
- **Layout**: each file's header (names, dtypes, shapes, data offsets) must equal what the manifest records
  for it (format 3), or for older stores what blockrt's writer lays out for the plan (``reconstruct``); the
  recorded names, dtypes and shapes must equal the plan's.
- **Bytes**: each file's data crc32 is in the manifest; blocks are checked by the loader as they are read, the
  pinned file by ``data_crc32`` when the store is opened.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from .errors import StoreError
from .guards import open_regular
from .partitioners.plan import Plan, dtype_from_name, dtype_name
from .quantize import SCALE_DTYPE, scale_key, to_storage
from . import int4
from .safetensors_format import Header, read_layout
from .sources import read_exactly

LEAF = 16 << 20  # bytes per leaf of the content hash
_WINDOW = 256 << 20  # bytes of copied (non-contiguous or non-CPU) tensors held while hashing in parallel
_DAMAGED = "fix: delete the store directory so it is written again"


# -- content fingerprint -------------------------------------------------------------------------------------


def _flat_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of ``t`` in row-major order (a copy only for a non-contiguous or non-CPU tensor)."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def _leaves(mv: memoryview) -> list[memoryview]:
    return [mv[i : i + LEAF] for i in range(0, len(mv), LEAF)] or [mv]


def _digest(mv: memoryview) -> bytes:
    return hashlib.sha256(mv).digest()


class ContentHash:
    """The content fingerprint of named tensors, fed in any order (``add``), read with ``hexdigest``."""

    def __init__(self) -> None:
        self._parts: dict[str, tuple[str, tuple[int, ...], list[bytes]]] = {}

    def add(self, key: str, t: torch.Tensor) -> None:
        self.add_digests(key, t, [_digest(leaf) for leaf in _leaves(_flat_bytes(t))])

    def add_digests(self, key: str, t: torch.Tensor, digests: list[bytes]) -> None:
        self._parts[key] = (dtype_name(t.dtype), tuple(t.shape), digests)

    def hexdigest(self) -> str:
        h = hashlib.sha256(b"blockrt content v1\n")
        for key in sorted(self._parts):
            dtype, shape, digests = self._parts[key]
            h.update(f"{key}|{dtype}|{list(shape)}|{len(digests)}\n".encode())
            for d in digests:
                h.update(d)
        return h.hexdigest()[:32]


def fingerprint(keys: Iterable[str], get: Callable[[str], torch.Tensor], threads: int | None = None) -> str:
    """The content fingerprint of ``get(key)`` for every key, hashed in parallel threads (equal to feeding the
    same tensors to a ``ContentHash`` one by one)."""
    h = ContentHash()
    threads = threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(threads, thread_name_prefix="blockrt-hash") as pool:
        batch: list[tuple[str, torch.Tensor, list[memoryview]]] = []
        held = 0

        def flush() -> None:
            views = [leaf for _, _, leaves in batch for leaf in leaves]
            digests = iter(list(pool.map(_digest, views)))
            for key, t, leaves in batch:
                h.add_digests(key, t, [next(digests) for _ in leaves])
            batch.clear()

        for key in keys:
            t = get(key)
            leaves = _leaves(_flat_bytes(t))
            batch.append((key, t, leaves))
            held += sum(leaf.nbytes for leaf in leaves)
            if held >= _WINDOW:
                flush()
                held = 0
        flush()
    return h.hexdigest()


# -- the manifest's schema -----------------------------------------------------------------------------------


def _show(x: Any) -> str:
    text = repr(x)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_int(x: Any) -> bool:
    return type(x) is int


def check_schema(path: Any, m: Any, version: int) -> None:
    """Raise ``StoreError`` unless ``m`` has the fields a store manifest of ``version`` needs, with their types."""

    def bad(what: str, found: Any) -> None:
        raise StoreError(f"{path}: expected {what}, found {_show(found)}; the manifest is damaged; {_DAMAGED}")

    if not isinstance(m, dict):
        bad("a JSON object", type(m).__name__)
    if not isinstance(m.get("fingerprint"), str):
        bad("'fingerprint' (a string)", m.get("fingerprint"))
    if not isinstance(m.get("plan"), dict):
        bad("'plan' (an object)", m.get("plan"))
    files = m.get("files")
    if not isinstance(files, dict):
        bad("'files' (an object with 'pinned' and 'blocks')", files)
    if not isinstance(files.get("blocks"), list):
        bad("'files.blocks' (a list of file entries)", files.get("blocks"))
    entries = [("files.pinned", files.get("pinned"))] + [(f"files.blocks[{i}]", e) for i, e in enumerate(files["blocks"])]
    for where, e in entries:
        if not isinstance(e, dict):
            bad(f"'{where}' (an object)", e)
        if not isinstance(e.get("file"), str):
            bad(f"'{where}.file' (a file name)", e.get("file"))
        if not _is_int(e.get("size")) or e["size"] < 0:
            bad(f"'{where}.size' (a byte count)", e.get("size"))
        if not _is_int(e.get("crc32")) or not 0 <= e["crc32"] < 2**32:
            bad(f"'{where}.crc32' (a crc32)", e.get("crc32"))
        stored = e.get("stored", {})
        if not isinstance(stored, dict) or not all(isinstance(v, str) and (v in _DTYPE_NAMES or int4.any_group_of(v) is not None)
                                                    for v in stored.values()):
            bad(f"'{where}.stored' (tensor name -> dtype name)", stored)
        if version >= 3:
            tensors = e.get("tensors")
            if not isinstance(tensors, dict) or not all(_is_layout(v) for v in tensors.values()):
                bad(f"'{where}.tensors' (tensor name -> [dtype, shape, begin, end])", tensors)


_DTYPE_NAMES = ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")


def _is_layout(v: Any) -> bool:
    return (isinstance(v, list) and len(v) == 4 and isinstance(v[0], str) and isinstance(v[1], list)
            and all(_is_int(x) for x in v[1]) and _is_int(v[2]) and _is_int(v[3]))


# -- each file's layout --------------------------------------------------------------------------------------


def expected_tensors(plan: Plan, manifest: dict) -> list[dict[str, tuple[str, list[int]]]]:
    """Per file (pinned, then each block): the tensors it must hold, ``{key: (dtype, shape)}`` in write order,
    from the plan and each block's stored dtypes in the manifest."""
    out = [{t.key: (t.dtype, list(t.shape)) for t in plan.pinned}]
    for b, entry in zip(plan.blocks, manifest["files"]["blocks"]):
        stored = entry.get("stored", {})
        extra = sorted(set(stored) - set(b.keys))
        if extra:
            raise StoreError(f"manifest entry of block {b.name!r} gives stored dtypes of {extra[:3]}, which the block "
                             f"does not hold (it holds {list(b.keys)[:3]}...); the manifest is damaged; {_DAMAGED}")
        want: dict[str, tuple[str, list[int]]] = {}
        for t in b.tensors:
            d = stored.get(t.key, t.dtype)
            want[t.key] = (d, list(t.shape))
            group = int4.any_group_of(d)  # either nibble order: the same bytes and scales
            if group is not None:
                want[t.key] = ("uint8", int4.packed_shape(t.shape))
                want[scale_key(t.key)] = (SCALE_DTYPE, int4.scale_shape(t.shape, group))
            if d == "int8" and t.dtype != "int8":
                want[scale_key(t.key)] = (SCALE_DTYPE, list(t.shape[:1]))
        out.append(want)
    return out


def reconstruct(want: dict[str, tuple[str, list[int]]]) -> dict[str, list]:
    """The layout blockrt's writer (``safetensors_format.write_file``) gives these tensors: largest element size
    first, in order, packed from offset 0. Used for stores written before the manifest recorded layouts."""
    out, offset = {}, 0
    for key in sorted(want, key=lambda k: -dtype_from_name(want[k][0]).itemsize):
        dtype, shape = want[key]
        n = dtype_from_name(dtype).itemsize
        for s in shape:
            n *= s
        out[key] = [dtype, list(shape), offset, offset + n]
        offset += n
    return out


def check_layout(path: str, header: Header, want: dict[str, tuple[str, list[int]]], recorded: dict | None) -> None:
    """The file's header must equal the manifest's record (or, without one, ``reconstruct(want)``), and the
    record must name the tensors ``want`` lists with their dtypes and shapes."""
    if recorded is None:
        recorded = reconstruct(want)
    else:
        shapes = {k: (v[0], v[1]) for k, v in recorded.items()}
        if shapes != {k: (d, s) for k, (d, s) in want.items()}:
            k = sorted(set(shapes) ^ set(want)) or [k for k in want if shapes.get(k) != want[k]]
            raise StoreError(f"{path}: the manifest records {_what(shapes, k[0])} for tensor {k[0]!r}, the plan needs "
                             f"{_what(want, k[0])}; the manifest is damaged; {_DAMAGED}")
    found = header.layout()
    if found != recorded:
        missing, extra = sorted(set(recorded) - set(found)), sorted(set(found) - set(recorded))
        if missing or extra:
            detail = (f"the manifest lists {missing[:3]}, which the file lacks" if missing else "") + \
                     ("; " if missing and extra else "") + \
                     (f"the file holds {extra[:3]}, which the manifest does not list" if extra else "")
        else:
            k = next(k for k in recorded if found[k] != recorded[k])
            detail = (f"tensor {k!r} is {_layout(found[k])} in the file, {_layout(recorded[k])} in the manifest")
        raise StoreError(f"{path}: the header does not match the manifest: {detail}; the file was altered or "
                         f"replaced; {_DAMAGED}")


def _what(d: dict, k: str) -> str:
    return "nothing" if k not in d else f"{d[k][0]}{list(d[k][1])}"


def _layout(v: list) -> str:
    return f"{v[0]}{list(v[1])} at data bytes {v[2]}..{v[3]}"


# -- bytes -----------------------------------------------------------------------------------------------------


def data_crc32(path: str, start: int, end: int, chunk: int = 8 << 20) -> int:
    """crc32 of the file's bytes ``[start, end)``, read in chunks."""
    crc = 0
    buf = memoryview(bytearray(min(chunk, max(end - start, 1))))
    with open_regular(path) as f:
        pos = start
        while pos < end:
            view = buf[: min(len(buf), end - pos)]
            read_exactly(f.fileno(), [view], pos, path)
            crc = zlib.crc32(view, crc)
            pos += len(view)
    return crc


def first_difference(plan: Plan, manifest: dict, read: Callable[[str], torch.Tensor],
                     get: Callable[[str], torch.Tensor]) -> str | None:
    """For a store whose fingerprint predates content hashing: the first tensor the store (``read``: key -> the
    tensor as stored) holds other bytes for than the weights (``get``: key -> tensor) converted as the store
    says, or None when every byte agrees. Reads the whole store and every weight once."""
    for t in plan.pinned:
        if _flat_bytes(read(t.key)) != _flat_bytes(get(t.key).detach().to(dtype_from_name(t.dtype))):
            return t.key
    for b, entry in zip(plan.blocks, manifest["files"]["blocks"]):
        stored = entry.get("stored", {})
        for t in b.tensors:
            for k, v in to_storage(t.key, get(t.key), stored.get(t.key, t.dtype)).items():
                have = read(k)
                if have.dtype != v.dtype or have.shape != v.shape or _flat_bytes(have) != _flat_bytes(v):
                    return k
    return None


def verify_file(path: str, entry: dict, want: dict[str, tuple[str, list[int]]], check_bytes: bool) -> Header:
    """Parse a store file and check it against its manifest ``entry``: the size, the header's layout and, with
    ``check_bytes``, the crc32 of its data. Returns the parsed header."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        size = None
    if size != entry["size"]:
        found = "no file" if size is None else f"{size} bytes"
        raise StoreError(f"store file {path} should have {entry['size']} bytes, found {found}: the store is damaged; "
                         "fix: delete the store directory so it is written again")
    header = read_layout(path)
    check_layout(path, header, want, entry.get("tensors"))
    if check_bytes:
        crc = data_crc32(path, header.data_start, header.size)
        if crc != entry["crc32"]:
            raise StoreError(f"{path}: crc32 {crc:#010x} of the data does not match the manifest's {entry['crc32']:#010x}: "
                             f"the file is corrupt; {_DAMAGED}")
    return header
