"""The safetensors file format, read and written directly (no mmap, no whole-file load).

blockrt needs two things the ``safetensors`` package does not give: the absolute byte range of every
tensor (so the loader thread can ``preadv`` straight into a slot), and a writer that checksums the data
as it writes and fsyncs before the file becomes visible.

Layout: 8-byte little-endian header length N, N bytes of JSON
``{key: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}``,
then the data; offsets are relative to the start of the data.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zlib
from dataclasses import dataclass

import torch

from .errors import StoreError
from .guards import open_regular, parse_json, read_upto
from .partitioners.plan import dtype_from_name, dtype_name

CODE_TO_DTYPE: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
DTYPE_TO_CODE = {v: k for k, v in CODE_TO_DTYPE.items()}
_MAX_HEADER = 100_000_000  # the safetensors limit
ALIGN = 64  # bytes: where write_file starts the data and each tensor whose size is a multiple of it


@dataclass(frozen=True)
class Segment:
    """Where one tensor's bytes live: ``path`` at absolute ``offset``, ``nbytes`` long."""

    key: str
    path: str
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Header:
    """A parsed safetensors header: every tensor's segment, the metadata, where the data starts, the file size."""

    segments: dict[str, Segment]
    metadata: dict[str, str]
    data_start: int
    size: int

    def layout(self) -> dict[str, list]:
        """``{key: [dtype, shape, begin, end]}`` with offsets relative to the data, as a store manifest records it."""
        return {k: [s.dtype, list(s.shape), s.offset - self.data_start, s.offset - self.data_start + s.nbytes]
                for k, s in self.segments.items()}


def read_header(path: str | os.PathLike) -> tuple[dict[str, Segment], dict[str, str]]:
    """Parse a safetensors header. Returns ({key: Segment}, metadata); see ``read_layout``."""
    h = read_layout(path)
    return h.segments, h.metadata


def read_layout(path: str | os.PathLike) -> Header:
    """Parse and check a safetensors header, as the safetensors library does: only a regular file, a JSON object
    without repeated keys, known dtypes, offsets that agree with each shape, lie inside the file and do not
    overlap. Raises ``StoreError`` naming the file, what was expected and what was found."""
    path = str(path)
    fix = "the file is not valid safetensors; fix: rewrite it"
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            raw = read_upto(f, 8)
            if len(raw) < 8:
                raise StoreError(f"{path}: expected a safetensors file, found {size} bytes (no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER or 8 + n > size:
                raise StoreError(
                    f"{path}: header length {n} does not fit a file of {size} bytes: the file is truncated "
                    "or not safetensors; fix: rewrite it"
                )
            blob = read_upto(f, n)
    except FileNotFoundError:
        raise StoreError(f"expected weight file {path}, but it does not exist") from None
    if len(blob) < n:
        raise StoreError(f"{path}: expected a header of {n} bytes, found {len(blob)} (the file shrank while read); {fix}")
    header = parse_json(blob, f"{path}: safetensors header", fix)
    if not isinstance(header, dict):
        raise StoreError(f"{path}: expected a safetensors header (a JSON object), found {type(header).__name__}; "
                         "the file is not safetensors")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise StoreError(f"{path}: expected '__metadata__' to map names to strings, found {meta!r}; {fix}")
    base = 8 + n
    segments: dict[str, Segment] = {}
    for key, info in header.items():
        code = info.get("dtype") if isinstance(info, dict) else None
        if not isinstance(code, str) or code not in CODE_TO_DTYPE:
            raise StoreError(f"{path}: tensor {key!r} has dtype {code!r}; supported: {sorted(CODE_TO_DTYPE)}")
        offsets, shape = info.get("data_offsets"), info.get("shape")
        if not (isinstance(offsets, list) and len(offsets) == 2 and isinstance(shape, list)
                and all(type(x) is int for x in offsets + shape)):
            raise StoreError(f"{path}: tensor {key!r} has a malformed entry {info!r}; expected "
                             "'shape' and 'data_offsets' lists of ints; the file is not valid safetensors")
        begin, end = offsets
        shape = tuple(shape)
        expected = math.prod(shape) * dtype_from_name(CODE_TO_DTYPE[code]).itemsize
        if not 0 <= begin <= end or end - begin != expected or min(shape, default=0) < 0:
            raise StoreError(f"{path}: tensor {key!r} of dtype {code} and shape {list(shape)} needs {expected} bytes, "
                             f"but its data_offsets are {[begin, end]}; the file is not valid safetensors")
        if base + end > size:
            raise StoreError(
                f"{path}: tensor {key!r} ends at byte {base + end} but the file has {size} bytes: "
                "the file is truncated; fix: delete it and write it again"
            )
        segments[key] = Segment(key, path, base + begin, end - begin, CODE_TO_DTYPE[code], shape)
    _check_disjoint(path, segments, base)
    return Header(segments, meta, base, size)


def _check_disjoint(path: str, segments: dict[str, Segment], base: int) -> None:
    """Refuse tensors whose bytes overlap (two tensors would read the same data; the safetensors library refuses
    such a file too). Empty tensors overlap nothing."""
    spans = sorted((s.offset, s.offset + s.nbytes, k) for k, s in segments.items() if s.nbytes)
    for (b0, e0, k0), (b1, e1, k1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise StoreError(f"{path}: tensors {k0!r} (data bytes {b0 - base}..{e0 - base}) and {k1!r} "
                             f"({b1 - base}..{e1 - base}) overlap; expected every tensor to have bytes of its own; "
                             "the file is not valid safetensors; fix: write it again (safetensors.torch.save_file)")


def _raw_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def write_file(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> tuple[int, int]:
    """Write ``tensors`` as one safetensors file, fsynced; return (file size, crc32 of the data section).

    The data starts at a multiple of ``ALIGN`` bytes (the header is padded with spaces) and the tensors whose
    sizes are multiples of ``ALIGN`` come first, so each of them sits at an ``ALIGN``-byte file offset, where a
    mapping of the file can serve it as it is (``mapping.py``); the rest follow largest element size first, so
    every tensor is naturally aligned. The caller writes into a temporary location and renames (``store.py``).
    """
    def nbytes(k: str) -> int:
        return tensors[k].numel() * tensors[k].element_size()

    order = sorted(tensors, key=lambda k: (nbytes(k) % ALIGN != 0, -tensors[k].element_size()))
    header: dict[str, object] = {}
    offset = 0
    for key in order:
        t = tensors[key]
        nbytes = t.numel() * t.element_size()
        header[key] = {"dtype": DTYPE_TO_CODE[dtype_name(t.dtype)], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % ALIGN)
    crc = 0
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for key in order:
            mv = _raw_bytes(tensors[key])
            crc = zlib.crc32(mv, crc)
            f.write(mv)
        f.flush()
        os.fsync(f.fileno())
    return 8 + len(blob) + offset, crc

