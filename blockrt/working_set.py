"""Measuring the working set: bytes of tensors that ops allocate while a pass runs, until they are freed.

A ``TorchDispatchMode`` sees every op's outputs; one whose storage is new (shared with no input, not yet
tracked) is an allocation, counted until the last tracked tensor viewing it dies (``weakref.finalize``). The
peak of the live total is the pass's activation footprint (the caller's inputs are not counted), on any
device; only measuring passes pay for it.

Some CPU kernels allocate scratch that no tensor shows and free it before they return: a convolution's
im2col columns (``C_in x kernel volume x output positions`` values: 130 MB for a 32-channel 3x3x3 Conv3d on
9x64x64 at batch 1 fp32, beside a 4.7 MB output), which kept a video VAE's RSS over its budget. For those ops
(``SCRATCH_OPS``) the process's RSS rise during the op (``memory.rise_during``) less the outputs it allocated
is counted as a spike: live for the op's duration.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .memory import rise_during

SCRATCH_OPS = frozenset({torch.ops.aten.convolution.default})  # CPU kernels with hidden scratch


class LiveBytes(TorchDispatchMode):
    """Tracks live bytes of storages allocated by ops inside the mode.

    Args:
        on_change: called with the signed change in live bytes after each allocation and free.
    """

    def __init__(self, on_change: Callable[[int], None] | None = None) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.window_peak = 0  # peak since the last ``start_window``
        self._refs: dict[int, list[int]] = {}  # storage data_ptr -> [tracked tensors alive, nbytes]
        self._on_change = on_change

    def start_window(self) -> None:
        """Begin a new sub-interval (a block); ``window_peak`` restarts from the bytes live now."""
        self.window_peak = self.live

    def detach(self) -> None:
        """Stop reporting changes (tensors that die later no longer call ``on_change``)."""
        self._on_change = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        leaves = [t for t in tree_leaves((args, kwargs)) if _real(t)]
        rise = None
        if func in SCRATCH_OPS and leaves and leaves[0].device.type == "cpu":
            out, rise = rise_during(lambda: func(*args, **(kwargs or {})))
        else:
            out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in leaves}
        allocated = 0
        for t in tree_leaves(out):
            if not _real(t):
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            entry = self._refs.get(ptr)
            if entry is None:
                if ptr in inputs or storage.nbytes() == 0:
                    continue  # a view of, or in-place write into, memory someone else allocated
                entry = self._refs[ptr] = [0, storage.nbytes()]
                self._change(entry[1])
                allocated += entry[1]
            entry[0] += 1
            weakref.finalize(t, self._drop, ptr)
        if rise is not None and rise > allocated:  # scratch, freed by now: live while the op ran
            self._change(rise - allocated)
            self._change(allocated - rise)
        return out

    def _drop(self, ptr: int) -> None:
        entry = self._refs.get(ptr)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            del self._refs[ptr]
            self._change(-entry[1])

    def _change(self, delta: int) -> None:
        self.live += delta
        if self.live > self.peak:
            self.peak = self.live
        if self.live > self.window_peak:
            self.window_peak = self.live
        if self._on_change is not None:
            self._on_change(delta)


def _real(t: object) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type != "meta"


def warm_up() -> None:
    """Pay the one-time cost of the first dispatch-mode op (torch imports its compile machinery, ~1 s)
    at set-up, so it does not land inside the first pass's timeline."""
    with torch.no_grad(), LiveBytes():
        torch.zeros(1) + 1
