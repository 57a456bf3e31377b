"""Giving an in-memory model its weights back when its runtime closes: the same objects, dtypes, devices, bytes.

``blockrt.run`` spills an in-memory model to a block store and swaps ``meta`` placeholders into the tensors it
streams (the blocks' and the embedding tables read by rows); the pinned part stays bound to the model's own data
(a copy on ``RunConfig.device`` when that is another device). When the runtime closes (also after a pass that
raised or was interrupted, and when set-up fails halfway) every tensor that is not its original any more is read
back from disk and swapped into the user's own ``nn.Parameter``/buffer object (``Binder.materialize``), so
``model(x)`` gives what it gave before the run and a second ``blockrt.run`` on the model works.

Where the originals are read from:

- the store, for every tensor it holds as computed (the default storage): no extra disk;
- ``restore.safetensors`` in the run's temporary directory, for tensors the store holds narrower
  (``storage_dtype`` float16/bfloat16/int8 lose bits): written at spill time in the model's own dtype. Disk cost:
  the original bytes of those tensors (an fp32 model stored int8: 1.0x its size beside the store's ~0.25x),
  written once per run and removed with the temporary directory.

Cost at close: one read of the streamed bytes into fresh memory (the model's size again, outside the budget: the
model held that memory before the run), one tensor at a time. ``RunConfig(restore=False)`` skips the restore file
and the read-back; the model then keeps its placeholders and a later run needs ``weights=``.

The garbage collector restores nothing: a Runtime's hooks on the model hold it, so it is collected only once its
model is unreachable too (or at interpreter exit), when no one can call the model again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import tempdirs
from .binding import Binder
from .errors import RestoreError
from .partitioners.plan import Plan, TensorSpec
from .safetensors_format import read_header, write_file
from .sources import WeightSource

RESTORE_FILE = "restore.safetensors"


@dataclass
class Originals:
    """What an in-memory model's tensors were before a run, and where to read each one back exactly.

    Args:
        specs: every owner key of the plan (tied aliases share the owner's object).
        where: key -> (device, dtype, data pointer) of the original tensor.
        streamed: keys swapped for placeholders (block tensors, tables read by rows): always read back; any other
            key is read back only when it is not its original any more (on another device, say).
        exact: the store (it holds ``specs`` as computed except the keys of ``lossy``).
        lossy: the restore file holding the originals of the tensors the store holds narrower, or None.
        tmpdir: the temporary directory the restore file is in (the run's, or one made for it).
    """

    specs: dict[str, TensorSpec]
    where: dict[str, tuple[torch.device, torch.dtype, int]]
    streamed: set[str]
    exact: WeightSource
    lossy: WeightSource | None = None
    tmpdir: str | None = None
    done: bool = field(default=False)
    bytes_read: int = 0

    def restore(self, binder: Binder) -> None:
        """Read back every tensor that is not its original and bind it into the model. Once; later calls do
        nothing. Gives back all it can, then raises ``RestoreError`` naming the tensors it could not put back."""
        if self.done:
            return
        self.done = True
        failed: list[str] = []
        cause: BaseException | None = None
        for key, spec in self.specs.items():
            device, dtype, ptr = self.where[key]
            t = binder.tensor(key)
            if key not in self.streamed and not t.is_meta and t.device == device and t.dtype == dtype \
                    and t.data_ptr() == ptr:
                continue  # the original itself (the pinned part on its own device)
            src = self.lossy if self.lossy is not None and key in self.lossy.segments else self.exact
            try:
                data = src.read_tensor(key, device, dtype)  # one tensor at a time: never two copies of the model
            except Exception as e:  # noqa: BLE001 - every other tensor is still given back; reported below
                failed.append(key)
                cause = cause or e
                continue
            self.bytes_read += src.segment(key).nbytes
            binder.materialize([(spec, data)])
            back = binder.tensor(key)
            if back.device != device or back.shape != data.shape:
                failed.append(key)  # swap_tensors refused (something held the placeholder) and .data cannot cross devices
        if failed:
            why = f"{type(cause).__name__}: {cause}" if cause is not None else \
                "something else still holds them (a traceback's frame, say)"
            raise RestoreError(f"the model's weights could not all be put back after the run: {failed[:5]} "
                               f"({len(failed)} tensor(s)) stay meta placeholders ({why}); the rest was restored; "
                               "fix: keep the store's files until close, or stream the model again with "
                               "weights=<its store or checkpoint>")

def keep_originals(model: nn.Module, plan: Plan, rows: dict[str, object], source: WeightSource,
                   tmpdir: str | None) -> Originals:
    """Record ``model``'s tensors before they are bound for streaming from ``source`` (the store it was spilled
    to), writing the originals of those the store holds narrower to a restore file in ``tmpdir`` (a new temporary
    directory if None; it is ``Originals.tmpdir``, to be removed with the run's)."""
    binder = Binder(model)
    specs = plan.all_specs()
    tensors = {k: binder.tensor(k) for k in specs}
    where = {k: (t.device, t.dtype, t.data_ptr()) for k, t in tensors.items()}
    streamed = {k for b in plan.blocks for k in b.keys} | set(rows)
    kept = Originals(specs, where, streamed, source, tmpdir=tmpdir)
    narrower = [k for k, spec in specs.items() if source.segment(k).dtype != spec.dtype]
    if not narrower:
        return kept
    made = tmpdir is None
    if made:
        tmpdir = tempdirs.create()
    try:
        path = Path(tmpdir) / RESTORE_FILE  # type: ignore[arg-type]
        write_file(path, {k: tensors[k] for k in narrower}, {"blockrt": "originals of tensors stored narrower"})
        kept.lossy = WeightSource(read_header(path)[0])
    except BaseException:
        if made:  # the run's own temporary directory goes with the run's failed set-up
            tempdirs.remove(tmpdir)  # type: ignore[arg-type]
        raise
    kept.tmpdir = tmpdir
    return kept

