"""Embedding rows on demand: a large pinned ``nn.Embedding`` table is never read whole; each call reads the
rows its ids use (a T5-large token table is 131.6 MB; a 300-token prompt uses ~1.2 MB of it).

A table is *row-streamed* when it is pinned, is the ``weight`` of ``nn.Embedding`` modules only (a tied LM
head keeps it pinned), has ``max_norm=None``, a float dtype and at least ``RunConfig.row_stream_min_bytes``;
its parameter stays a ``meta`` placeholder. A pre-hook reads the sorted unique ids' rows (one ``preadv`` per
run of adjacent rows, widened as ``read_tensor`` does), binds the compact ``[U, d]`` table and hands the
module the remapped ids, which look up exactly the rows the full table would; a forward hook (also when
forward raises) puts the placeholder back. ``padding_idx`` is None during the call: only gradients use it.

Memory: the rows buffer holds ``min(ids.numel(), num_embeddings)`` rows, fixed by the input's shape, so the
working set pass 0 measured for a shape covers any ids; while held its bytes move from the ledger's
``working_set`` to ``rows`` (reserved anew when no working set covers them). Each read is a ``load`` event.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .binding import Binder
from .guards import open_regular
from .ledger import Ledger
from .partitioners.plan import FLOAT_DTYPES, Plan, TensorSpec, dtype_from_name
from .recording import Recording
from .safetensors_format import Segment
from .sources import WeightSource, read_exactly


def row_streamed_tables(model: nn.Module, plan: Plan, min_bytes: int | None) -> dict[str, tuple[str, ...]]:
    """The pinned tensors to stream by rows: owner key -> paths of the distinct Embedding modules using it
    (``min_bytes`` None: none; 0: every eligible table)."""
    if min_bytes is None:
        return {}
    names_of: dict[str, list[str]] = {}
    for alias, owner in plan.aliases.items():
        names_of.setdefault(owner, []).append(alias)
    out: dict[str, tuple[str, ...]] = {}
    for spec in plan.pinned:
        if spec.nbytes < min_bytes or spec.dtype not in FLOAT_DTYPES or len(spec.shape) != 2:
            continue
        modules: dict[int, str] = {}  # id(module) -> its first path (one module may have several names)
        for key in [spec.key, *names_of.get(spec.key, [])]:
            prefix, _, leaf = key.rpartition(".")
            module = model.get_submodule(prefix) if prefix else model
            if leaf != "weight" or not isinstance(module, nn.Embedding) or module.max_norm is not None:
                break
            modules.setdefault(id(module), prefix)
        else:
            out[spec.key] = tuple(modules.values())
    return out


@dataclass
class _Held:
    """The rows one call holds between its pre- and post-hook."""

    buf: torch.Tensor  # (cap, d) in the compute dtype; rows [:U] are the compact table
    moved: int  # bytes moved from the ledger's working_set to rows
    reserved: int  # bytes reserved as rows on top
    padding_idx: int | None


@dataclass
class EmbeddingRows:
    """Row streaming for the ``tables`` (from ``row_streamed_tables``) of one runtime, read from ``source``;
    ``pass_idx`` gives the current pass for the profile's load events."""

    model: nn.Module
    plan: Plan
    tables: dict[str, tuple[str, ...]]
    source: WeightSource
    binder: Binder
    ledger: Ledger
    profile: Recording
    device: torch.device
    pass_idx: Callable[[], int]
    _held: dict[str, _Held] = field(default_factory=dict)

    def install(self) -> list[Any]:
        """Register the hooks on every Embedding module using a table; returns the removable handles."""
        specs = self.plan.all_specs()
        handles = []
        for key, paths in self.tables.items():
            for path in paths:
                module = self.model.get_submodule(path)
                handles.append(module.register_forward_pre_hook(
                    lambda mod, args, kwargs, spec=specs[key]: self._pre(mod, spec, args, kwargs), with_kwargs=True))
                handles.append(module.register_forward_hook(
                    lambda mod, args, out, spec=specs[key]: self._post(mod, spec), always_call=True))
        return handles

    def _pre(self, module: nn.Embedding, spec: TensorSpec, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        ids = args[0] if args else kwargs.get("input")
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"embedding {spec.key!r}: expected its input ids as a tensor, found {type(ids).__name__}")
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"embedding {spec.key!r}: expected ids of dtype int64 or int32, found {ids.dtype}; "
                            "fix: pass token ids as a LongTensor")
        if spec.key in self._held:
            raise RuntimeError(f"embedding {spec.key!r} was called from inside its own call; nested calls of a "
                               "row-streamed embedding are not supported")
        vocab, dim = spec.shape
        uniq, inverse = torch.unique(ids, sorted=True, return_inverse=True)  # (U,), ids.shape
        if uniq.numel() and (int(uniq[0]) < 0 or int(uniq[-1]) >= vocab):
            raise IndexError(f"index out of range in self: embedding {spec.key!r} has {vocab} rows, found ids from "
                             f"{int(uniq[0])} to {int(uniq[-1])}; fix: keep token ids in [0, {vocab})")
        seg = self.source.segment(spec.key)
        compute = dtype_from_name(spec.dtype)
        cap = min(ids.numel(), vocab)  # fixed by the input's shape: the working set measured for it covers any ids
        buf = torch.empty((cap, dim), dtype=compute)  # (cap, d)
        nbytes = buf.numel() * buf.element_size()
        moved = min(nbytes, self.ledger.held()["working_set"])
        self.ledger.move("working_set", "rows", moved)
        try:
            self.ledger.reserve("rows", nbytes - moved, f"rows of embedding {spec.key!r}")
        except BaseException:
            self.ledger.move("rows", "working_set", moved)
            raise
        self._held[spec.key] = _Held(buf, moved, nbytes - moved, module.padding_idx)
        rows = uniq.cpu().tolist()
        start = self.profile.now()
        read = _read_rows(seg, rows, buf, dim)
        self.profile.record("load", f"rows:{spec.key}", max(0, self.pass_idx()), start, self.profile.now(),
                            nbytes=read, thread="compute")
        self.profile.record_materialised(f"rows:{spec.key}", max(0, self.pass_idx()), len(rows) * dim * buf.element_size())
        table = buf[: len(rows)].to(self.device)  # (U, d)
        self.binder.materialize([(spec, table)])
        module.padding_idx = None  # only gradients use it; the compact table has no row at the old index
        new_ids = inverse.reshape(ids.shape)
        if args:
            return (new_ids, *args[1:]), kwargs
        return args, {**kwargs, "input": new_ids}

    def _post(self, module: nn.Embedding, spec: TensorSpec) -> None:
        held = self._held.pop(spec.key, None)
        if held is None:  # the pre-hook failed before holding anything
            return
        self.binder.evict([spec], f"rows of {spec.key}")
        module.padding_idx = held.padding_idx
        self.ledger.release("rows", held.reserved)
        self.ledger.move("rows", "working_set", held.moved)  # before the buffer dies: the tracker releases it then
        held.buf = torch.empty(0)

    def release_all(self) -> None:
        """Put back every held table (a runtime closing mid-call)."""
        specs = self.plan.all_specs()
        for key, paths in self.tables.items():
            if key in self._held:
                self._post(self.model.get_submodule(paths[0]), specs[key])


def _read_rows(seg: Segment, rows: list[int], out: torch.Tensor, dim: int) -> int:
    """``preadv`` the table rows ``rows`` (sorted, unique) of ``seg`` into ``out[:len(rows)]`` (compute dtype),
    one read per run of adjacent rows; a narrower stored float is widened. Returns the bytes read."""
    if not rows:
        return 0
    stored = dtype_from_name(seg.dtype)
    dst = out if stored == out.dtype else torch.empty(out.shape, dtype=stored)  # (cap, d) as stored: shape-fixed too
    row_bytes = dim * stored.itemsize
    flat = memoryview(dst.reshape(-1).view(torch.uint8).numpy())
    with open_regular(seg.path) as f:
        run_start = 0
        for i in range(1, len(rows) + 1):
            if i == len(rows) or rows[i] != rows[i - 1] + 1:  # a run [run_start, i) of adjacent rows ends
                view = flat[run_start * row_bytes: i * row_bytes]
                read_exactly(f.fileno(), [view], seg.offset + rows[run_start] * row_bytes, seg.path)
                run_start = i
    if dst is not out:
        out[: len(rows)].copy_(dst[: len(rows)])
    return len(rows) * row_bytes
