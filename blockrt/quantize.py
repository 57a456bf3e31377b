"""Storage dtypes of block tensors: which dtype each tensor is stored in, and the conversions both ways.

A block is stored as computed (``None``), cast to ``float16``/``bfloat16``/``float32``, or ``int8`` weight-only:
a floating tensor with ``ndim >= 2`` and at least ``INT8_MIN_ELEMENTS`` elements becomes int8 ``[out, ...]`` plus
``key + ".scale"`` (float32 ``[out]``), symmetric per output channel: ``scale = max|w_row| / 127``,
``q = round(w / scale)``, dequantised ``q * scale`` (error at most ``scale / 2``). Biases, norms, small and
non-floating tensors stay as they are. ``int4`` (``int4-g<G>``): 4-bit with group-wise scales (``int4.py``);
a tensor whose row length is not a multiple of G is stored as int8 instead. The loader widens in place
(``convert_in_place``): no full-size temporary, and every op releases the GIL. With ``packed`` (the ``nn.Linear``
weights of a run with ``RunConfig(packed_compute=True)``) int4 weights are stored in the int4 kernel's nibble
order (``int4pack-<layout>-g<G>``, ``int4.kernel_name``), which is never widened; int8 is stored as ever.
"""

from __future__ import annotations

from collections.abc import Collection

import torch

from .config import STORAGE_DTYPES
from .errors import StoreError
from . import int4
from .packed_kernels import int4_layout, int4_supported, int4_to_kernel
from .partitioners.plan import FLOAT_DTYPES, Plan, TensorSpec, dtype_from_name
from .safetensors_format import Segment

INT8_MIN_ELEMENTS = 1024  # smaller tensors are not worth a scale vector: they stay in the compute dtype
INT8_MAX = 127
SCALE_SUFFIX = ".scale"
SCALE_DTYPE = "float32"
# Elements widened per step (a 128 KiB float32 buffer): torch's GRAIN_SIZE, so each op runs serially on the loader
# thread (one core, like its reads) instead of starting an OpenMP team beside the compute threads; ~8 GB/s of
# float32 output on one core of the 2-core dev machine when it is quiet.
CHUNK_ELEMENTS = 1 << 15


def scale_key(key: str) -> str:
    """The key of an int8 tensor's per-output-channel scales."""
    return key + SCALE_SUFFIX


def stored_dtype(spec: TensorSpec, storage: str | None, packed: bool = False) -> str:
    """The dtype ``spec`` (in its compute dtype) is stored in when its block asks for ``storage``; ``packed``: it is
    an ``nn.Linear`` weight computed by the packed kernels. A storage dtype wider than the compute dtype raises
    ``ValueError`` (it would only cost bytes)."""
    if storage is None or spec.dtype not in FLOAT_DTYPES:
        return spec.dtype
    group = int4.group_of(storage)
    if storage == "int8" or group is not None:
        n = 1
        for s in spec.shape:
            n *= s
        if len(spec.shape) < 2 or n < INT8_MIN_ELEMENTS:
            return spec.dtype
        if packed and group is not None and int4.fits(spec.shape, group) and int4_supported(spec.shape):
            return int4.kernel_name(group)
        return int4.stored_name(group) if group is not None and int4.fits(spec.shape, group) else "int8"
    if storage not in STORAGE_DTYPES:
        raise ValueError(f"storage dtype {storage!r} is not one of {STORAGE_DTYPES}")
    if dtype_from_name(storage).itemsize > dtype_from_name(spec.dtype).itemsize:
        raise ValueError(f"storage dtype {storage} is wider than {spec.key!r}'s compute dtype {spec.dtype}: it "
                         "would store more bytes for the same values; fix: use storage_dtype=None (as the model is) "
                         "or a narrower one")
    return storage


def quantize_int8(w: torch.Tensor, rows_per_step: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: ``w`` (out, ...) -> (q int8 (out, ...), scale float32 (out,)); an
    all-zero row has scale 0. A few rows at a time: no float32 copy of the whole tensor."""
    if w.ndim < 2:
        raise ValueError(f"int8 storage quantises per output channel: expected ndim >= 2, found shape {list(w.shape)}")
    flat = w.detach().reshape(w.shape[0], -1)  # (out, in*...)
    scale = flat.abs().amax(dim=1).to(torch.float32) / INT8_MAX  # (out,)
    if not torch.isfinite(scale).all():
        raise ValueError("cannot quantise a tensor holding inf or nan to int8; fix: store it as float16/float32")
    inv = torch.where(scale > 0, scale, torch.ones_like(scale))  # zero rows divide by 1: q = 0
    q = torch.empty(flat.shape, dtype=torch.int8)
    for r0 in range(0, flat.shape[0], rows_per_step):
        r1 = min(flat.shape[0], r0 + rows_per_step)
        rows = flat[r0:r1].to(torch.float32) / inv[r0:r1, None]
        q[r0:r1] = rows.round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q.view(w.shape), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q * scale`` per output channel, computed in float32 and cast to ``dtype`` (the loader's exact maths)."""
    flat = q.reshape(q.shape[0], -1).to(torch.float32) * scale.to(torch.float32)[:, None]
    return flat.to(dtype).view(q.shape)


def has_scales(stored: str) -> bool:
    """Whether a tensor stored as ``stored`` comes with ``key + ".scale"`` (int8 and int4)."""
    return stored == "int8" or int4.any_group_of(stored) is not None


def scale_elements(spec: TensorSpec, stored: str) -> int:
    """float32 scales of ``spec`` stored as ``stored``: one per output channel (int8) or group (int4)."""
    group = int4.any_group_of(stored)
    if group is not None:
        return spec.shape[0] * int4.row_elements(spec.shape) // group
    return spec.shape[0] if stored == "int8" else 0


def stored_nbytes(spec: TensorSpec, stored: str) -> int:
    """Bytes of ``spec``'s data stored as ``stored`` (without its scales)."""
    if int4.any_group_of(stored) is not None:
        return spec.nbytes // dtype_from_name(spec.dtype).itemsize // 2
    return spec.nbytes // dtype_from_name(spec.dtype).itemsize * dtype_from_name(stored).itemsize


def to_storage(key: str, t: torch.Tensor, stored: str) -> dict[str, torch.Tensor]:
    """The tensors a file holds for ``key`` stored as ``stored``: itself (cast), or int8/int4 plus its scales."""
    group = int4.any_group_of(stored)
    if group is not None:
        packed, scale = int4.quantize_int4(t, group)
        if int4.kernel_of(stored) is not None:
            packed = int4_to_kernel(packed)  # the same nibbles in the kernel's order
        return {key: packed, scale_key(key): scale}
    if stored == "int8" and t.dtype != torch.int8:
        q, scale = quantize_int8(t)
        return {key: q, scale_key(key): scale}
    return {key: t.detach().to(dtype_from_name(stored))}


def from_storage(t: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype,
                 shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """A stored tensor (and its scales when int8 or int4) back in the compute ``dtype``; int4 (packed uint8 with
    2-D scales) needs the tensor's ``shape`` when it is not 2-D."""
    if scale is not None and t.dtype == torch.uint8:
        return int4.dequantize_int4(t, scale, shape or (t.shape[0], 2 * t[0].numel()), dtype)
    if scale is not None:
        return dequantize_int8(t, scale, dtype)
    return t.to(dtype)


def convert_in_place(region: torch.Tensor, spec: TensorSpec, stored: str, scale: torch.Tensor | None,
                     tmp: torch.Tensor) -> None:
    """Widen a stored tensor held at the tail of its slot ``region`` (flat uint8 of ``spec.nbytes``) into the
    whole region, through ``tmp`` (float32, at least ``chunk_elements(spec, stored)``); ``scale`` for int8.

    Chunk k reads stored elements [x, x+c) and writes compute elements [x, x+c); since the stored bytes
    start ``numel * (a - b)`` bytes in (a, b = compute and stored itemsize), the write ends at or before
    the first stored byte not yet read whenever ``x + c <= numel``: front to back never clobbers input.
    """
    dst_dtype = dtype_from_name(spec.dtype)
    n = region.numel() // dst_dtype.itemsize
    if n == 0:
        return
    group = int4.group_of(stored)
    if group is not None:
        assert scale is not None
        src4 = region[region.numel() - n // 2:]  # (n/2,) packed
        int4.widen(src4, region.view(dst_dtype), scale, group, chunk_elements(spec, stored), tmp)
        return
    src_dtype = dtype_from_name(stored)
    src = region[region.numel() - n * src_dtype.itemsize:].view(src_dtype)  # (n,) stored
    dst = region.view(dst_dtype)  # (n,) compute
    step = chunk_elements(spec, stored)
    cols = n // spec.shape[0] if scale is not None else 1
    for x in range(0, n, step):
        c = min(step, n - x)
        t = tmp[:c]
        t.copy_(src[x : x + c])  # widen to float32 (exact for every stored dtype here)
        if scale is not None:  # whole rows: [x / cols, (x + c) / cols)
            rows = t.view(c // cols, cols)
            sc = scale[x // cols : (x + c) // cols, None]
            if dst_dtype == torch.float32:
                torch.mul(rows, sc, out=dst[x : x + c].view(c // cols, cols))
                continue
            rows.mul_(sc)
        dst[x : x + c].copy_(t)


def chunk_elements(spec: TensorSpec, stored: str) -> int:
    """Elements converted per step for ``spec`` stored as ``stored`` (whole rows for int8)."""
    n = 1
    for s in spec.shape:
        n *= s
    rows = spec.shape[0] if spec.shape else 0
    group = int4.group_of(stored)
    if group is not None:
        return int4.chunk_elements(spec.shape, group, CHUNK_ELEMENTS)
    if stored != "int8" or n == 0:
        return max(1, min(n, CHUNK_ELEMENTS))
    cols = n // rows
    return max(1, min(rows, CHUNK_ELEMENTS // cols)) * cols  # whole rows; one row if a row is longer than a chunk


def tmp_elements(spec: TensorSpec, stored: str) -> int:
    """float32 elements of the loader's widening buffer that ``spec`` stored as ``stored`` needs."""
    step = chunk_elements(spec, stored)
    return int4.tmp_elements(step) if int4.group_of(stored) is not None else step


def stored_dtypes(plan: Plan, storage: dict[str, str | None], packed: Collection[str] = ()) -> dict[str, str]:
    """Every streamed tensor's stored dtype for ``storage`` (block name -> storage dtype or None); ``packed``: the
    keys of the weights the packed kernels compute (``packed_compute.packed_keys``)."""
    return {t.key: stored_dtype(t, storage.get(b.name), t.key in packed) for b in plan.blocks for t in b.tensors}


def check_stored(plan: Plan, segments: dict[str, Segment], where: str) -> None:
    """Check each streamed tensor's stored form can be widened into its compute dtype by the loader: the
    same dtype, a narrower float, int8 with float32 ``(out,)`` scales, or int4 with ``(out, K/G)`` ones (in the
    int4 kernel's order: this machine's kernel). Raises StoreError naming all problems."""
    bad = []
    for b in plan.blocks:
        for spec in b.tensors:
            seg = segments[spec.key]
            scale = segments.get(scale_key(spec.key))
            if seg.shape != spec.shape:
                bad.append(f"{spec.key}: shape {list(seg.shape)}, expected {list(spec.shape)}")
            elif seg.dtype == spec.dtype or spec.dtype not in FLOAT_DTYPES:
                if seg.dtype != spec.dtype:
                    bad.append(f"{spec.key}: {seg.dtype}, expected {spec.dtype}")
            elif int4.any_group_of(seg.dtype) is not None:
                group = int4.any_group_of(seg.dtype)
                want = int4.scale_shape(spec.shape, group)
                kernel = int4.kernel_of(seg.dtype)
                if kernel is not None and kernel[0] != int4_layout():
                    bad.append(f"{spec.key}: stored as {seg.dtype}, the nibble order of PyTorch's {kernel[0]} int4 "
                               f"kernel, but this machine runs its {int4_layout()} kernel (expected "
                               f"{int4.kernel_name(group)})")
                elif kernel is not None and not int4_supported(spec.shape):
                    bad.append(f"{spec.key}: stored as {seg.dtype}, but the int4 kernel cannot take its shape "
                               f"{list(spec.shape)}")
                elif not int4.fits(spec.shape, group):
                    bad.append(f"{spec.key}: stored as {seg.dtype}, but its shape {list(spec.shape)} has rows that "
                               f"are not a multiple of {group}")
                elif scale is None or scale.dtype != SCALE_DTYPE or list(scale.shape) != want:
                    found = "none" if scale is None else f"{scale.dtype}{list(scale.shape)}"
                    bad.append(f"{spec.key}: {seg.dtype} needs {scale_key(spec.key)!r} float32{want}, found {found}")
            elif seg.dtype == "int8":
                if scale is None or scale.dtype != SCALE_DTYPE or scale.shape != spec.shape[:1] or len(spec.shape) < 2:
                    found = "none" if scale is None else f"{scale.dtype}{list(scale.shape)}"
                    bad.append(f"{spec.key}: int8 needs {scale_key(spec.key)!r} float32{list(spec.shape[:1])}, "
                               f"found {found}")
            elif seg.dtype not in FLOAT_DTYPES or \
                    dtype_from_name(seg.dtype).itemsize > dtype_from_name(spec.dtype).itemsize:
                bad.append(f"{spec.key}: stored as {seg.dtype}, which does not widen into {spec.dtype}")
    if bad:
        shown = bad[:10] + ([f"... and {len(bad) - 10} more"] if len(bad) > 10 else [])
        raise StoreError(f"{where} holds tensors the loader cannot turn into the model's dtypes: " + "; ".join(shown)
                         + "; fix: rewrite the store (delete it) or convert the checkpoint with blockrt.convert_store")
