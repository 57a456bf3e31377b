"""PyTorch's weight-only int8/int4 CPU matmul kernels (as gpt-fast uses them), fed from blockrt's stored layouts.

The kernels' dequantisation, measured against ``x @ dequant(w).T`` (``tests/test_packed_kernels.py``):

- ``aten._weight_int8pack_mm(x (M, K), w int8 (N, K), scales (N,))`` = ``x @ (w * scales[:, None]).T``; the
  scales must have ``x``'s dtype (float32 or bfloat16/float16: then they are rounded to it).
- ``aten._weight_int4pack_mm_for_cpu(x (M, K), packed, G, scales_and_zeros (K/G, N, 2))`` with
  ``w[n, k] = (q[n, k] - 8) * scales_and_zeros[k // G, n, 0] + scales_and_zeros[k // G, n, 1]`` for nibbles
  ``q`` in 0..15. blockrt's int4 (``int4.py``) stores ``q + 8`` with ``w = (nibble - 8) * s``: the same nibbles,
  scales transposed, zeros 0: exact.
- ``packed`` is ``aten._convert_weight_to_int4pack_for_cpu(q int32 (N, K), inner_k_tiles)``: uint8 (N, K/2) in a
  nibble order that depends on the CPU kernel PyTorch dispatches to (``torch.backends.cpu.get_cpu_capability()``:
  rows interleaved in blocks of 64 for AVX512, another order for AVX2 and for the scalar kernel), so bytes packed
  on one machine are only valid where the capability is the same (``int4_layout``). Both kernels need ``x`` 2-D and
  contiguous; the int4 kernel needs N a multiple of 16 and G in 32/64/128/256. The int8 kernel with bfloat16 or
  float16 activations reads past K when K is not a multiple of 16 (a segmentation fault in PyTorch 2.13,
  measured): ``linear_int8`` refuses those shapes.

Activations in float32 run a scalar path in PyTorch 2.13 (much slower than the float32 matmul of the widened
weight); bfloat16 activations run the vectorised one (``benchmarks/packed_matmul.py`` measures both).
"""

from __future__ import annotations

import torch

INT4_ROW_MULTIPLE = 16  # the int4 kernel's N
INT8_HALF_K_MULTIPLE = 16  # the int8 kernel's K with 16-bit activations (below: a crash, not an error)
_ROWS_PER_STEP = 256  # a multiple of every kernel block (64, 32, 16): converting by steps gives the same bytes


def int4_layout() -> str:
    """The int4 kernel's packed layout on this machine: the CPU capability name, lower case (``"avx512"``)."""
    return torch.backends.cpu.get_cpu_capability().lower()


def int4_supported(shape: tuple[int, ...] | list[int]) -> bool:
    """Whether a weight of ``shape`` (out, in) can run through the int4 kernel (N a multiple of 16)."""
    return len(shape) == 2 and shape[0] > 0 and shape[0] % INT4_ROW_MULTIPLE == 0


def int8_supported(shape: tuple[int, ...] | list[int], dtype: torch.dtype) -> bool:
    """Whether a weight of ``shape`` (out, in) can run through the int8 kernel with activations in ``dtype``."""
    return len(shape) == 2 and (dtype == torch.float32 or shape[1] % INT8_HALF_K_MULTIPLE == 0)


def int4_to_kernel(packed: torch.Tensor) -> torch.Tensor:
    """blockrt's int4 bytes (uint8 (N, K/2), element 2j in the low nibble) -> the int4 kernel's uint8 (N, K/2),
    a few hundred rows at a time (an int32 copy of those rows only)."""
    n, half = packed.shape
    if n % INT4_ROW_MULTIPLE:
        raise ValueError(f"the int4 kernel needs a multiple of {INT4_ROW_MULTIPLE} output rows; found {n}")
    out = torch.empty(n, half, dtype=torch.uint8)
    for r0 in range(0, n, _ROWS_PER_STEP):
        b = packed[r0: r0 + _ROWS_PER_STEP]  # (rows, K/2)
        q = torch.stack([b & 15, b >> 4], dim=-1).reshape(b.shape[0], 2 * half).to(torch.int32)  # (rows, K)
        out[r0: r0 + b.shape[0]] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    return out


def int4_scales_and_zeros(scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """blockrt's int4 scales (float32 (N, K/G)) -> the kernel's (K/G, N, 2) in ``dtype``: scale, zero 0."""
    s = scales.t().to(dtype)  # (K/G, N)
    return torch.stack([s, torch.zeros_like(s)], dim=-1).contiguous()


def linear_int4(x: torch.Tensor, packed: torch.Tensor, group: int, scales_and_zeros: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x (..., K) @ dequant(w).T (+ bias)`` -> (..., N) through the int4 kernel; ``packed`` from ``int4_to_kernel``,
    ``scales_and_zeros`` from ``int4_scales_and_zeros`` in ``x``'s dtype."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()  # (M, K)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, group, scales_and_zeros)  # (M, N)
    y = y.reshape(*x.shape[:-1], y.shape[-1])
    return y if bias is None else y + bias


def linear_int8(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x (..., K) @ (q * scales[:, None]).T (+ bias)`` -> (..., N) through the int8 kernel; ``q`` int8 (N, K),
    ``scales`` (N,) in ``x``'s dtype."""
    if not int8_supported(tuple(q.shape), x.dtype):
        raise ValueError(f"the int8 kernel with {x.dtype} activations needs K a multiple of {INT8_HALF_K_MULTIPLE}; "
                         f"found weight {list(q.shape)}; fix: float32 activations or widen this weight")
    x2 = x.reshape(-1, x.shape[-1]).contiguous()  # (M, K)
    y = torch.ops.aten._weight_int8pack_mm(x2, q, scales)  # (M, N)
    y = y.reshape(*x.shape[:-1], y.shape[-1])
    return y if bias is None else y + bias


def fill_scales(stored: torch.Tensor, out: torch.Tensor) -> None:
    """The kernel's scales ``out`` (int4: (K/G, N, 2); int8: (N,)) from the stored float32 ``stored`` (flat:
    (N * K/G,) or (N,))."""
    if out.ndim == 3:  # int4: scale, zero
        groups, n, _ = out.shape
        out[:, :, 0].copy_(stored.view(n, groups).T)
        out[:, :, 1].zero_()
    else:
        out.copy_(stored)
