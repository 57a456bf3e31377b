"""4-bit weight-only storage: group-wise symmetric scales, two values per byte.

A floating tensor ``w`` (out, ...) is flattened to (out, K); K must be a multiple of the group size G (an even
number, ``INT4_GROUPS``). Each run of G consecutive elements of a row is one group with a float32 scale
``s = max|w_group| / 7`` (0 for an all-zero group) and ``q = round(w / s)`` in [-7, 7] (so the error is at most
``s / 2`` per element). Stored:

- ``key``: uint8 (out, K / 2), element 2j in the low nibble and 2j + 1 in the high nibble, each as ``q + 8``;
- ``key + ".scale"``: float32 (out, K / G), row-major: group g of the flattened tensor is scale ``g``.

Dequantised ``(nibble - 8) * s`` in float32, then cast to the compute dtype. A store names the stored dtype
``int4-g<G>`` (``stored_name``); the storage dtype ``"int4"`` means ``int4-g128``. Tensors whose K is not a
multiple of G are refused by ``quantize_int4`` (``quantize.stored_dtype`` stores them as int8 instead).

The loader widens in place (``widen``), a chunk of whole groups at a time through the float32 ``tmp`` buffer,
whose tail (an eighth more) holds the chunk's nibbles as bytes; every op releases the GIL.

``RunConfig(packed_compute=True)`` stores ``nn.Linear`` weights as ``int4pack-<layout>-g<G>`` (``kernel_name``):
the same nibbles and scales, the nibbles in the order PyTorch's int4 CPU kernel reads them on this machine
(``packed_kernels.int4_to_kernel``; ``<layout>`` names the CPU kernel, e.g. ``avx512``). They are never widened:
the kernel multiplies them (``packed_compute.py``).
"""

from __future__ import annotations

import re

import torch

from .packed_kernels import int4_layout

INT4_GROUPS = (32, 64, 128, 256)
INT4_DEFAULT_GROUP = 128
INT4_STORAGE = ("int4",) + tuple(f"int4-g{g}" for g in INT4_GROUPS)  # the storage dtype names RunConfig accepts
INT4_QMAX = 7
_OFFSET = 8  # a nibble holds q + 8
_NAME = re.compile(r"int4-g(\d+)")
_KERNEL_NAME = re.compile(r"int4pack-([a-z0-9_]+)-g(\d+)")


def group_of(name: str | None) -> int | None:
    """The group size of an int4 storage or stored dtype name (``"int4"`` -> 128, ``"int4-g64"`` -> 64), or None
    when ``name`` is not one."""
    if name == "int4":
        return INT4_DEFAULT_GROUP
    m = _NAME.fullmatch(name or "")
    return int(m.group(1)) if m else None


def kernel_name(group: int) -> str:
    """The stored dtype name of int4 with groups of ``group`` in the int4 kernel's order on this machine."""
    return f"int4pack-{int4_layout()}-g{group}"


def kernel_of(name: str | None) -> tuple[str, int] | None:
    """(layout, group) of a stored dtype name in the int4 kernel's order (``"int4pack-avx512-g128"``), or None."""
    m = _KERNEL_NAME.fullmatch(name or "")
    return (m.group(1), int(m.group(2))) if m else None


def any_group_of(name: str | None) -> int | None:
    """The group size of int4 stored in either nibble order (the scales and the byte count are the same)."""
    k = kernel_of(name)
    return k[1] if k else group_of(name)


def stored_name(group: int) -> str:
    """The stored dtype name of int4 with groups of ``group`` (as the manifest and the segments record it)."""
    return f"int4-g{group}"


def row_elements(shape: tuple[int, ...] | list[int]) -> int:
    """K: elements per output row of a tensor of ``shape`` (everything but dim 0)."""
    k = 1
    for s in shape[1:]:
        k *= s
    return k


def fits(shape: tuple[int, ...] | list[int], group: int) -> bool:
    """Whether a tensor of ``shape`` can be stored as int4 with groups of ``group``."""
    return len(shape) >= 2 and shape[0] > 0 and row_elements(shape) % group == 0


def packed_shape(shape: tuple[int, ...] | list[int]) -> list[int]:
    """The stored uint8 shape (out, K / 2)."""
    return [shape[0], row_elements(shape) // 2]


def scale_shape(shape: tuple[int, ...] | list[int], group: int) -> list[int]:
    """The float32 scales' shape (out, K / G)."""
    return [shape[0], row_elements(shape) // group]


def quantize_int4(w: torch.Tensor, group: int = INT4_DEFAULT_GROUP,
                  rows_per_step: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` (out, ...) -> (packed uint8 (out, K/2), scales float32 (out, K/G)); a few rows at a time (no float32
    copy of the whole tensor). Raises ValueError for ndim < 2, K not a multiple of ``group``, an odd or unknown
    ``group``, or a tensor holding inf/nan."""
    if group not in INT4_GROUPS:
        raise ValueError(f"int4 group size {group} is not one of {INT4_GROUPS}")
    if w.ndim < 2:
        raise ValueError(f"int4 storage quantises rows in groups: expected ndim >= 2, found shape {list(w.shape)}")
    if not fits(tuple(w.shape), group):
        raise ValueError(f"int4 with groups of {group}: a row of shape {list(w.shape)} has {row_elements(w.shape)} "
                         f"elements, not a multiple of {group}; fix: a group size dividing it, or int8 storage")
    out, k = w.shape[0], row_elements(w.shape)
    flat = w.detach().reshape(out, k)  # (out, K)
    packed = torch.empty(out, k // 2, dtype=torch.uint8)
    scales = torch.empty(out, k // group, dtype=torch.float32)
    for r0 in range(0, out, rows_per_step):
        r1 = min(out, r0 + rows_per_step)
        g = flat[r0:r1].to(torch.float32).reshape(r1 - r0, k // group, group)  # (rows, K/G, G)
        s = g.abs().amax(dim=2) / INT4_QMAX  # (rows, K/G)
        if not torch.isfinite(s).all():
            raise ValueError("cannot quantise a tensor holding inf or nan to int4; fix: store it as float16/float32")
        scales[r0:r1] = s
        q = (g / torch.where(s > 0, s, torch.ones_like(s))[:, :, None]).round_().clamp_(-INT4_QMAX, INT4_QMAX)
        q = (q + _OFFSET).to(torch.uint8).reshape(r1 - r0, k // 2, 2)  # (rows, K/2, 2): low, high
        packed[r0:r1] = q[:, :, 0] | (q[:, :, 1] << 4)
    return packed, scales


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, shape: tuple[int, ...] | list[int],
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The tensor of ``shape`` that ``packed`` and ``scales`` hold, computed as the loader does, in ``dtype``."""
    out, k = shape[0], row_elements(shape)
    group = k // scales.shape[-1]
    b = packed.reshape(out, k // 2)
    q = torch.stack([b & 15, b >> 4], dim=-1).reshape(out, k // group, group).to(torch.float32) - _OFFSET
    return (q * scales.reshape(out, k // group, 1).to(torch.float32)).to(dtype).reshape(shape)


def chunk_elements(shape: tuple[int, ...], group: int, chunk: int) -> int:
    """Elements widened per step: whole groups, about ``chunk``."""
    n = shape[0] * row_elements(shape) if shape else 0
    return max(group, min(n, chunk) // group * group)


def tmp_elements(step: int) -> int:
    """float32 elements of the buffer widening ``step`` elements needs: the chunk plus its bytes (an eighth)."""
    return step + (step + 7) // 8


def widen(src: torch.Tensor, dst: torch.Tensor, scales: torch.Tensor, group: int, step: int,
          tmp: torch.Tensor) -> None:
    """Dequantise packed ``src`` (uint8, n/2) into ``dst`` (n, the compute dtype) front to back, ``step`` elements
    (whole groups) at a time; ``scales`` float32 (n / group,). ``src`` may sit at the tail of ``dst``'s bytes: a
    chunk's bytes are read into ``tmp`` before its output is written, and the output of elements [0, x) ends at
    or before the first unread stored byte (x * itemsize <= total - n/2 + x/2 when x <= n)."""
    n = dst.numel()
    t_all = tmp[:step]
    nib = tmp[step: tmp_elements(step)].view(torch.uint8)[: step // 2]
    for x in range(0, n, step):
        c = min(step, n - x)
        t, b, s = t_all[:c].view(c // 2, 2), src[x // 2: (x + c) // 2], nib[: c // 2]
        torch.bitwise_and(b, 15, out=s)
        t[:, 0].copy_(s)
        torch.bitwise_right_shift(b, 4, out=s)
        t[:, 1].copy_(s)
        rows = t_all[:c].sub_(_OFFSET).view(c // group, group)
        sc = scales[x // group: (x + c) // group, None]
        if dst.dtype == torch.float32:
            torch.mul(rows, sc, out=dst[x: x + c].view(c // group, group))
        else:
            rows.mul_(sc)
            dst[x: x + c].copy_(t_all[:c])
