"""Where a Runtime's block weights come from: a checkpoint read in place, a blockrt store, a store converted
once from a checkpoint (storage dtypes it does not hold, or ``mapped=True`` where its tensors are not aligned),
or the in-memory model spilled into a store; and binding the pinned part, which stays resident, once at set-up."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import tempdirs
from .binding import Binder, meta_leftovers
from .config import RunConfig
from .conversion import converted_store
from .errors import BlockrtError
from .hub import resolve_weights
from .mapping import mappable
from .partitioners.plan import Plan, dtype_from_name
from .quantize import stored_dtypes
from .sources import CheckpointSource, WeightSource
from .store import needs_conversion, open_or_write, open_store, require_storage


def open_weights(model: nn.Module, plan: Plan, config: RunConfig, storage: Any, weights: str | Path | None,
                 store: str | Path | None, packed: Collection[str] = ()) -> tuple[WeightSource, str | None]:
    """The source of ``plan``'s tensors, and the temporary directory it lives in (None unless the in-memory
    model was spilled without a ``store`` path; the caller removes it at close). ``storage`` is the per-block
    storage dtypes asked for; ``packed`` the keys the packed kernels compute (``packed_compute.packed_keys``)."""
    verify = config.verify != "never"  # the pinned file's crc32 on opening a store (blocks': as they load)
    if weights is not None:
        weights = resolve_weights(weights)  # a repo id: its checkpoint in the local Hugging Face cache
        if store is not None:
            raise ValueError("pass either weights= (stream from a checkpoint) or store= (spill the model), not both")
        if (Path(weights) / "manifest.json").exists():
            found = open_store(weights, plan, fingerprint=None, verify=verify)
            require_storage(found, plan, storage, packed)
            return found, None
        source = CheckpointSource(weights)
        converted = {k for b in plan.blocks if storage.get(b.name) for k in b.keys}  # rewritten in a storage dtype
        converted |= {s.key for s in plan.pinned} if converted else set()  # a converted store's pinned: as computed
        source.resolve(plan, strict=config.strict_keys, prefix=config.weights_prefix, converted=converted)
        unaligned = config.mapped and not all(mappable(b.tensors, map(source.segment, b.keys)) for b in plan.blocks)
        if needs_conversion(source, plan, storage, packed) or unaligned:  # once, then cached (RunConfig.store_path)
            return converted_store(source, plan, storage, config.store_path, config.weights_prefix, verify=verify,
                                   packed=packed), None
        return source, None
    binder = Binder(model)
    tensors = {k: binder.tensor(k) for k in plan.all_specs()}
    on_meta = [k for k, t in tensors.items() if t.is_meta]
    if on_meta:
        raise BlockrtError(
            f"{type(model).__name__} has weights on the meta device ({on_meta[:3]}...) and no weights= was "
            "given (a skeleton, or a model a closed Runtime streamed with RunConfig(restore=False), keeps meta "
            "placeholders); fix: pass weights=<checkpoint or blockrt store directory> to stream them")
    store = store if store is not None else config.store_path
    tmpdir = None
    if store is None:
        tmpdir = tempdirs.create()
        store = Path(tmpdir) / "store"
    try:
        stored = stored_dtypes(plan, storage, packed)
        return open_or_write(store, plan, tensors, stored, storage, verify=verify), tmpdir
    except BaseException:
        if tmpdir is not None:
            tempdirs.remove(tmpdir)
        raise


def bind_pinned(model: nn.Module, plan: Plan, rows: dict[str, Any], binder: Binder, source: WeightSource | None,
                device: torch.device) -> None:
    """Bind the pinned tensors on ``device`` (read from ``source``, or the model's own), leave the tables read by
    rows (``rows``) and every block's tensors as ``meta`` placeholders, and refuse a model whose remaining
    ``meta`` tensors no weight file provides."""
    pinned = [s for s in plan.pinned if s.key not in rows]
    if source is not None:
        pairs = [(s, source.read_tensor(s.key, device, dtype_from_name(s.dtype))) for s in pinned]
    else:
        pairs = [(s, binder.tensor(s.key).detach().to(device)) for s in pinned]
    binder.materialize(pairs)
    binder.evict([s for s in plan.pinned if s.key in rows], "pinned (read by rows)")  # read by rows on each call
    streamed = {k for b in plan.blocks for k in b.keys} | set(plan.aliases) | set(rows)
    leftovers = meta_leftovers(model, streamed)
    if leftovers:
        raise BlockrtError(
            f"{type(model).__name__} has tensors on the meta device that no weight file provides: {leftovers[:10]}; "
            "these are non-persistent buffers (computed, not stored) or weights missing from the plan; "
            "fix: build the skeleton inside `with blockrt.meta_weights():` (computed buffers stay real), "
            "or materialise those tensors before blockrt.run")
    for block in plan.blocks:
        binder.evict(block.tensors, block.name)
