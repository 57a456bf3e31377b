"""Packed compute: ``nn.Linear`` weights kept packed in their block's slot and multiplied by PyTorch's kernels.

With ``RunConfig(packed_compute=True)`` the ``nn.Linear`` weights of int4/int8-stored blocks (``packed_keys``) are
never widened. Their slot region holds the stored bytes (int4 in the kernel's nibble order, ``int4pack-*``; int8
as stored) and their scales in the kernel's form (``layout_of``), which the loader fills from the stored float32
scales (``packed_kernels.fill_scales``); the ledger and the budget count exactly those bytes. While the block is
resident the user's own ``nn.Parameter`` object holds a ``PackedWeight`` (``bindings``; swapped in and out by
``Binder``, as every weight is): a tensor of the weight's shape and dtype whose ``F.linear`` runs
``packed_kernels.linear_int4``/``linear_int8`` and whose any other use raises. At ``close`` the model gets its
original weights back (``restore.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import int4
from .errors import BlockrtError, StoreError
from .loader import ALIGN, BlockLayout, scale_keys
from .packed_kernels import int8_supported, linear_int4, linear_int8
from .partitioners.plan import Block, Plan, TensorSpec, dtype_from_name
from .quantize import scale_elements, scale_key
from .safetensors_format import Segment


@dataclass(frozen=True)
class PackedSpec:
    """One weight computed packed: its compute ``weight`` spec and the two slot tensors that stand for it.

    ``data``: uint8 (N, K/2) in the int4 kernel's order, or int8 (N, K); ``scales``: the kernel's scales in
    ``dtype`` (int4: (K/G, N, 2), scale and zero 0; int8: (N,)); ``stored_scale_bytes``: the float32 scales as
    stored, which the loader reads into its staging buffer before ``packed_kernels.fill_scales``."""

    weight: TensorSpec
    group: int | None  # None: int8
    dtype: str
    data: TensorSpec
    scales: TensorSpec
    stored_scale_bytes: int

    def bind(self, data: torch.Tensor, scales: torch.Tensor) -> PackedWeight:
        """The tensor the weight's Parameter holds while its block is resident (slot views, no copy)."""
        return PackedWeight(self, data, scales)


def packed_keys(model: nn.Module, plan: Plan) -> frozenset[str]:
    """Keys of the streamed weights a packed kernel may compute: those of modules that are exactly ``nn.Linear``
    (a subclass may use its weight otherwise, as ``nn.MultiheadAttention`` does its ``out_proj``'s) and that no
    other name shares (a tied weight is read by another module too)."""
    streamed = {k for b in plan.blocks for k in b.keys}
    tied = set(plan.aliases.values())
    keys = set()
    for name, m in model.named_modules():
        key = f"{name}.weight" if name else "weight"
        if type(m) is nn.Linear and key in streamed and key not in tied:
            keys.add(key)
    return frozenset(keys)


def packed_spec(spec: TensorSpec, stored: str, dtype: str | None) -> PackedSpec | None:
    """How ``spec`` stored as ``stored`` sits packed in a slot, computing in ``dtype`` (None: its own), or None
    when the kernels cannot take it (it is then widened)."""
    dtype = dtype or spec.dtype
    kernel = int4.kernel_of(stored)
    if kernel is not None:
        n, k = spec.shape
        group = kernel[1]
        data = TensorSpec(spec.key, "uint8", (n, k // 2))
        scales = TensorSpec(scale_key(spec.key), dtype, (k // group, n, 2))
    elif stored == "int8" and int8_supported(spec.shape, dtype_from_name(dtype)):
        group = None
        data = TensorSpec(spec.key, "int8", tuple(spec.shape))
        scales = TensorSpec(scale_key(spec.key), dtype, (spec.shape[0],))
    else:
        return None
    return PackedSpec(spec, group, dtype, data, scales, 4 * scale_elements(spec, stored))


def layout_of(block: Block, stored: dict[str, str], packed: frozenset[str], dtype: str | None) -> BlockLayout:
    """The slot layout of ``block``: each packed weight of ``packed`` as its data and its scales, the rest as
    computed (``stored``: key -> stored dtype)."""
    tensors: list[TensorSpec] = []
    specs: dict[str, PackedSpec] = {}
    for t in block.tensors:
        p = packed_spec(t, stored.get(t.key, t.dtype), dtype) if t.key in packed else None
        if p is None:
            tensors.append(t)
            continue
        specs[t.key] = p
        tensors += [p.data, p.scales]
    if not specs:
        return BlockLayout.of(block)
    offsets, end = [], 0
    for t in tensors:
        end += -end % ALIGN
        offsets.append(end)
        end += t.nbytes
    return BlockLayout(replace(block, tensors=tuple(tensors)), tuple(offsets), end, specs)


def check_packed_bound(layouts: list[BlockLayout], segments: Mapping[str, Segment], where: str) -> None:
    """Refuse weights stored in the int4 kernel's order that this run would widen (it cannot: only the kernel
    reads that order), naming the options that compute them packed."""
    packed = {k for lay in layouts for k in lay.packed}
    found = [(t.key, segments[t.key].dtype) for lay in layouts for t in lay.block.tensors
             if t.key not in packed and t.key in segments and int4.kernel_of(segments[t.key].dtype) is not None]
    if found:
        key, dtype = found[0]
        raise StoreError(f"{where} holds {len(found)} weight(s) in the int4 kernel's nibble order ({key!r}: {dtype}), "
                         f"which only packed compute reads, but this run widens them; fix: "
                         f"RunConfig(storage_dtype='int4-g{int4.kernel_of(dtype)[1]}', packed_compute=True)")


def bindings(layout: BlockLayout, buf: torch.Tensor) -> list[tuple[TensorSpec, torch.Tensor]]:
    """What binds a block's weights to the model from its slot ``buf``: its typed views (``BlockLayout.views``),
    each packed weight's data and scales as one ``PackedWeight`` of the weight's own spec."""
    views = layout.views(buf)
    if not layout.packed:
        return views
    by_key = {spec.key: v for spec, v in views}
    scales = scale_keys(layout)
    out = []
    for spec, v in views:
        p = layout.packed.get(spec.key)
        if p is not None:
            out.append((p.weight, p.bind(v, by_key[p.scales.key])))
        elif spec.key not in scales:
            out.append((spec, v))
    return out


class PackedWeight(torch.Tensor):
    """A packed ``nn.Linear`` weight while its block is resident: shape (N, K) and the layer's dtype, data in the
    slot. ``F.linear(x, w, b)`` runs the packed kernel (in ``PackedSpec.dtype``, the result cast back to ``x``'s
    dtype); ``detach`` (``nn.Parameter`` wrapping it) keeps it; metadata reads work; any op raises a
    ``BlockrtError``."""

    packed: PackedSpec
    data_view: torch.Tensor
    scales_view: torch.Tensor

    @staticmethod
    def __new__(cls, packed: PackedSpec, data: torch.Tensor, scales: torch.Tensor) -> PackedWeight:  # noqa: PYI034
        w = packed.weight
        t = torch.Tensor._make_wrapper_subclass(cls, w.shape, dtype=dtype_from_name(w.dtype), device=data.device)
        t.packed, t.data_view, t.scales_view = packed, data, scales
        return t

    def __repr__(self) -> str:  # the default repr would dispatch ops on the data
        kind = "int8" if self.packed.group is None else f"int4-g{self.packed.group}"
        return f"PackedWeight({self.packed.weight.key!r}, {kind}, shape={tuple(self.shape)}, dtype={self.dtype})"

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x (..., K) @ w.T + bias`` -> (..., N) through the packed kernel."""
        compute = self.scales_view.dtype
        xk = x if x.dtype == compute else x.to(compute)
        if self.packed.group is None:
            y = linear_int8(xk, self.data_view, self.scales_view)
        else:
            y = linear_int4(xk, self.data_view, self.packed.group, self.scales_view)
        y = y if y.dtype == x.dtype else y.to(x.dtype)
        return y if bias is None else y + bias

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear and isinstance(args[1], PackedWeight) and not isinstance(args[0], PackedWeight):
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            return args[1].linear(args[0], bias)
        if func is torch.Tensor.detach:  # here, not in __torch_dispatch__: a dispatch mode (working_set.py)
            t = args[0]  # would look for the storage this wrapper does not have
            return PackedWeight(t.packed, t.data_view, t.scales_view)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)  # metadata reads pass; ops reach __torch_dispatch__

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        w = next(a for a in args if isinstance(a, PackedWeight))
        owner = w.packed.weight.key.rpartition(".")[0]
        raise BlockrtError(
            f"{func} used the packed weight {w.packed.weight.key!r}: with RunConfig(packed_compute=True) an "
            f"nn.Linear weight of an int4/int8-stored block is only multiplied by its own layer (F.linear), and "
            f"this model uses it otherwise; fix: packed_compute=False, or RunConfig(pin=[{owner!r}])")
