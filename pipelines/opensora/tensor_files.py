"""Tensor files written one tensor at a time, so memory stays at one tensor whatever the file's size:
safetensors (header first, then each tensor's bytes) and PyTorch's ``.bin`` zip format (``torch.save``'s
layout, byte for byte), for the random checkpoints of ``random_weights.py``."""

from __future__ import annotations

import collections
import io
import json
import math
import os
import pickle
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch


_ST_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
              "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def safetensors_header(specs: Sequence[tuple[str, tuple[int, ...], str]],
                       metadata: dict[str, str] | None = None) -> tuple[bytes, list[tuple[str, tuple[int, ...], str]], int]:
    """``(header bytes incl. the 8-byte length, tensor order, file size)`` of a safetensors file of ``specs``.

    The ``safetensors`` package's layout: larger element size first, then by key; ``{"format": "pt"}``
    metadata as ``save_file`` writes (the real checkpoints' headers, to the byte count); JSON padded to 8.
    """
    order = sorted(specs, key=lambda s: (-getattr(torch, s[2]).itemsize, s[0]))
    header: dict[str, Any] = {"__metadata__": metadata if metadata is not None else {"format": "pt"}}
    offset = 0
    for key, shape, dtype in order:
        if dtype not in _ST_DTYPES:
            raise ValueError(f"tensor {key!r} has dtype {dtype}, which safetensors cannot hold; supported: {sorted(_ST_DTYPES)}")
        n = math.prod(shape) * getattr(torch, dtype).itemsize
        header[key] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob, order, 8 + len(blob) + offset


def write_safetensors(path: str | Path, specs: Sequence[tuple[str, tuple[int, ...], str]],
                      produce: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors file whose tensors are produced one at a time by ``produce(key)``; returns its size.

    The header is laid out from ``specs`` (key, shape, dtype name) first (``safetensors_header``); each
    produced tensor must match its spec; the file is fsynced.
    """
    head, order, size = safetensors_header(specs, metadata)
    with open(path, "wb") as f:
        f.write(head)
        for key, shape, dtype in order:
            t = produce(key)
            if tuple(t.shape) != tuple(shape) or t.dtype != getattr(torch, dtype):
                raise ValueError(f"{path}: tensor {key!r} should be {dtype}{list(shape)}, got {t.dtype}{list(t.shape)}")
            f.write(_tensor_bytes(t))
            del t
        f.flush()
        os.fsync(f.fileno())
    return size


class _StorageRef:
    """Stands for one storage in the pickle: ``persistent_id`` turns it into torch's storage tuple."""

    def __init__(self, key: str, dtype: torch.dtype, numel: int) -> None:
        self.key, self.dtype, self.numel = key, dtype, numel


class _LazyTensor:
    """Pickles exactly as a contiguous CPU tensor does, without its data (``torch.Tensor._reduce_ex_internal``)."""

    def __init__(self, storage: _StorageRef, shape: tuple[int, ...]) -> None:
        self.storage, self.shape = storage, shape

    def __reduce_ex__(self, protocol: int) -> tuple:
        stride = tuple(math.prod(self.shape[i + 1:]) for i in range(len(self.shape)))
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, tuple([*self.shape]), stride, False, collections.OrderedDict()))  # fresh tuples, as torch


def write_torch_bin(path: str | Path, specs: Sequence[tuple[str, tuple[int, ...], str, str | None]],
                    produce: Callable[[str], torch.Tensor]) -> int:
    """Write what ``torch.save(state_dict, path)`` writes, one storage at a time; returns the file size.

    ``specs``: (key, shape, dtype name, key of the storage it shares or None). The pickle (``data.pkl``)
    is the one torch.save produces for a dict of contiguous tensors; each storage record ``data/<i>`` is
    then filled by ``produce(owner key)`` through torch's own zip writer (same records, alignment, crc32),
    so ``torch.load(path, weights_only=True, mmap=True)`` reads it like any torch.save file.
    """
    refs: dict[str, _StorageRef] = {}
    obj: dict[str, _LazyTensor] = {}
    for key, shape, dtype, shared in specs:
        owner = shared or key
        if owner not in refs:
            if shared is not None:
                raise ValueError(f"{key!r} shares the storage of {shared!r}, which must come first in the same file")
            refs[owner] = _StorageRef(str(len(refs)), getattr(torch, dtype), math.prod(shape))
        elif (refs[owner].dtype, refs[owner].numel) != (getattr(torch, dtype), math.prod(shape)):
            raise ValueError(f"{key!r} cannot share the storage of {owner!r}: other dtype or size")
        obj[key] = _LazyTensor(refs[owner], tuple(shape))
    owners = {ref.key: owner for owner, ref in refs.items()}

    def persistent_id(o: object) -> tuple | None:
        if isinstance(o, _StorageRef):
            storage_type = getattr(torch, torch.tensor([], dtype=o.dtype)._typed_storage()._pickle_storage_type())
            return ("storage", storage_type, o.key, "cpu", o.numel)
        return None

    buf = io.BytesIO()
    pickler = pickle.Pickler(buf, protocol=torch.serialization.DEFAULT_PROTOCOL)
    pickler.persistent_id = persistent_id  # type: ignore[method-assign]
    pickler.dump(obj)
    data = buf.getvalue()
    # torch.serialization._save's records, in its order, through the writer torch.save uses.
    with torch.serialization._open_zipfile_writer(str(path)) as zf:
        zf.write_record("data.pkl", data, len(data))
        zf.write_record(".format_version", "1", len("1"))
        alignment = str(torch.serialization._get_storage_alignment())
        zf.write_record(".storage_alignment", alignment, len(alignment))
        zf.write_record("byteorder", "little", len("little"))
        for skey in sorted(owners, key=int):
            t = produce(owners[skey])
            ref = refs[owners[skey]]
            if t.dtype != ref.dtype or t.numel() != ref.numel:
                raise ValueError(f"{path}: tensor {owners[skey]!r} should be {ref.dtype} with {ref.numel} elements, "
                                 f"got {t.dtype} with {t.numel()}")
            nbytes = t.numel() * t.element_size()
            t = t.contiguous()
            if t.storage_offset() or t.untyped_storage().nbytes() != nbytes:  # a view: its storage holds more
                t = t.clone()
            zf.write_record(f"data/{skey}", t.untyped_storage(), nbytes)
            del t
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    return os.path.getsize(path)
