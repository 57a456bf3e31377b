"""The runtime: ``blockrt.run(model, budget)`` and the ``Runtime`` handle it returns.

Removable forward hooks on the user's own modules drive everything; ``forward`` is never rewritten.
A block's pre-hook makes it resident (waiting for its load if needed, and recording the wait); the
post-hook of its last module (also when forward raises) releases it and asks the loader for the next
blocks, cyclically: the block after the last one is block 0 of the next pass. Hooks on the root module
mark the passes.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .binding import Binder, meta_leftovers
from .budget import format_bytes, parse_budget
from .config import RunConfig
from .errors import BlockrtError, BudgetError, LoadError, PartitionError
from .ledger import Ledger
from .loader import BlockLayout, Loader, LoadRequest, Slot
from .plan import Plan
from .profile import Profile
from .sources import CheckpointSource, WeightSource
from .store import fingerprint, open_store, write_store

log = logging.getLogger(__name__)


def run(model: nn.Module, budget: int | str, *, weights: str | Path | None = None, store: str | Path | None = None,
        partitioner: Any = None, config: RunConfig | None = None) -> "Runtime":
    """Stream ``model`` block by block under a memory budget.

    Args:
        model: the model, in memory (its blocks spill to a store on disk) or built on the ``meta`` device
            (then ``weights`` is required and nothing is ever materialised whole).
        budget: bytes as an int, or a string like ``"3.3GB"`` (10^9), ``"3GiB"`` (2^30), ``"512MB"``.
        weights: a safetensors checkpoint (file, sharded index, or directory) to stream from in place.
        store: directory of the block store for an in-memory model (reused when it holds these weights);
            default: a temporary directory removed on ``close()``.
        partitioner: a function ``(model, *, target_bytes) -> Plan``; default: the registry's choice.
        config: rare knobs (``RunConfig``).

    Returns:
        A ``Runtime``: call it like the model; ``.profile`` has the timeline; use ``with`` or ``.close()``.

    Example:
        >>> with blockrt.run(model, budget="512MB") as rt:
        ...     out = rt(x)
        ...     print(rt.profile)
    """
    return Runtime(model, budget, weights=weights, store=store, partitioner=partitioner, config=config)


class Runtime:
    """A model streamed block by block; see ``blockrt.run``."""

    def __init__(self, model: nn.Module, budget: int | str, *, weights: str | Path | None = None,
                 store: str | Path | None = None, partitioner: Any = None, config: RunConfig | None = None) -> None:
        from partitioners import partition

        self.config = config = config or RunConfig()
        self.budget = parse_budget(budget)
        self.model = model
        self.device = torch.device(config.device)
        self.profile = Profile(budget=self.budget, device=str(self.device))
        self._closed = True
        self._hooks: list[Any] = []
        self.plan: Plan = partition(model, target_bytes=config.target_block_bytes, partitioner=partitioner)
        if not self.plan.blocks:
            raise PartitionError(f"the plan for {type(model).__name__} has no blocks to stream")
        self._layouts = [BlockLayout.of(b) for b in self.plan.blocks]
        self._check_budget()

        self._tmpdir: str | None = None
        self.source = self._open_source(weights, store)
        self.ledger = Ledger(self.budget, on_change=lambda total: self.profile.counter("ledger_bytes", self.profile.now(), total))
        self._binder = Binder(model)
        self._bind_pinned(from_source=weights is not None)
        for block in self.plan.blocks:
            self._binder.evict(block.tensors)
        streamed = {k for b in self.plan.blocks for k in b.keys} | set(self.plan.aliases)
        leftovers = meta_leftovers(model, streamed)
        if leftovers:
            raise BlockrtError(
                f"{type(model).__name__} has tensors on the meta device that no weight file provides: {leftovers[:10]}; "
                "these are non-persistent buffers (computed, not stored) or weights missing from the plan; "
                "fix: build the skeleton inside `with blockrt.meta_weights():` (computed buffers stay real), "
                "or materialise those tensors before blockrt.run")

        self._slot_bytes = max(lay.nbytes for lay in self._layouts)
        self.slots: list[Slot] = []
        for s in range(self._n_slots):
            self.ledger.reserve("slots", self._slot_bytes, f"slot {s}")
            self.slots.append(Slot(s, self._slot_bytes, self.device))
        self.loader = Loader(self.source, self.profile, self.device, read_bytes_per_s=config.read_bytes_per_s,
                             slot_bytes=self._slot_bytes)
        self._slot_of: dict[int, Slot] = {}
        self._verified: set[int] = set()
        self._active: int | None = None
        self._running = 0
        self._pass = -1
        self._in_pass = False
        self._compute_start = 0.0
        self._closed = False
        self._finalizer = weakref.finalize(self, _shutdown, self.loader, self._tmpdir)
        self._install_hooks()
        self._prefetch(-1)  # block 0 (and beyond) start loading now, before the first call

    # -- set-up ---------------------------------------------------------------------------------------------

    @property
    def _n_slots(self) -> int:
        return min(self.config.prefetch_depth + 1, len(self.plan.blocks))

    def minimum_budget(self) -> int:
        """The smallest budget this plan and prefetch depth run in: pinned + slots x the largest block."""
        return self.plan.pinned_bytes + self._n_slots * max(lay.nbytes for lay in self._layouts)

    def _check_budget(self) -> None:
        need = self.minimum_budget()
        if need > self.budget:
            big = max(self._layouts, key=lambda lay: lay.nbytes)
            raise BudgetError(
                f"budget {format_bytes(self.budget)} is below the smallest feasible {format_bytes(need)} "
                f"({need} bytes): block {big.block.name!r} needs {format_bytes(big.nbytes)} in each of "
                f"{self._n_slots} slot(s) (prefetch_depth={self.config.prefetch_depth}) plus "
                f"{format_bytes(self.plan.pinned_bytes)} pinned; fix: raise the budget to at least {need} bytes, "
                "lower prefetch_depth, or split the model into smaller blocks")

    def _open_source(self, weights: str | Path | None, store: str | Path | None) -> WeightSource:
        if weights is not None:
            if store is not None:
                raise ValueError("pass either weights= (stream from a checkpoint) or store= (spill the model), not both")
            if (Path(weights) / "manifest.json").exists():
                return open_store(weights, self.plan, fingerprint=None)
            source = CheckpointSource(weights)
            source.resolve(self.plan, strict=self.config.strict_keys)
            return source
        tensors = {k: self._binder_tensor(k) for k in self.plan.all_specs()}
        on_meta = [k for k, t in tensors.items() if t.is_meta]
        if on_meta:
            raise BlockrtError(
                f"{type(self.model).__name__} has weights on the meta device ({on_meta[:3]}...) and no weights= was "
                "given (a model streamed by a closed Runtime keeps meta placeholders); fix: pass weights=<checkpoint "
                "or blockrt store directory> to stream them")
        fp = fingerprint(self.plan, tensors)
        if store is None:
            self._tmpdir = tempfile.mkdtemp(prefix="blockrt-")
            store = Path(self._tmpdir) / "store"
        return open_store(store, self.plan, fp) or write_store(store, self.plan, tensors, fp)

    def _binder_tensor(self, key: str) -> torch.Tensor:
        return Binder(self.model).tensor(key)

    def _bind_pinned(self, from_source: bool) -> None:
        self.ledger.reserve("pinned", self.plan.pinned_bytes, "the pinned part")
        if from_source:
            pairs = [(s, self.source.read_tensor(s.key, self.device)) for s in self.plan.pinned]
        else:
            pairs = [(s, self._binder.tensor(s.key).detach().to(self.device)) for s in self.plan.pinned]
        self._binder.materialize(pairs)

    def _install_hooks(self) -> None:
        m = self.model
        self._hooks.append(m.register_forward_pre_hook(lambda mod, args: self._begin_pass()))
        self._hooks.append(m.register_forward_hook(lambda mod, args, out: self._end_pass(), always_call=True))
        for i, block in enumerate(self.plan.blocks):
            for path in block.modules:
                sub = m.get_submodule(path)
                last = path == block.modules[-1]
                self._hooks.append(sub.register_forward_pre_hook(lambda mod, args, i=i: self._pre(i)))
                self._hooks.append(sub.register_forward_hook(lambda mod, args, out, i=i, last=last: self._post(i, last),
                                                             always_call=True))

    # -- the handle -----------------------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the model (one pass) under ``torch.no_grad()``; same call and result as ``model(...)``."""
        if self._closed:
            raise BlockrtError("this Runtime is closed; create a new one with blockrt.run(...)")
        with torch.no_grad():
            return self.model(*args, **kwargs)

    def close(self) -> None:
        """Remove the hooks, stop the loader, free the slots and any temporary store. Idempotent.

        Streamed weights stay ``meta`` placeholders in the model afterwards (it never held them all).
        """
        if self._closed:
            return
        self._closed = True
        if self._active is not None:
            self._release(self._active)
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._finalizer()
        self._slot_of.clear()
        for s in self.slots:
            self.ledger.release("slots", s.buf.numel())
        self.slots.clear()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- hooks ----------------------------------------------------------------------------------------------

    def _begin_pass(self) -> None:
        if torch.is_grad_enabled():
            raise BlockrtError("blockrt streams weights for inference only: call the model under torch.no_grad() "
                               "(Runtime.__call__ does this for you)")
        self._pass += 1
        self._running = 0
        self._in_pass = True
        self.profile.begin_pass(self._pass, self.profile.now())

    def _end_pass(self) -> None:
        if not self._in_pass:  # begin_pass refused the call
            return
        self._in_pass = False
        if self._active is not None:
            self._release(self._active)
        self._running = 0
        self.profile.end_pass(self._pass, self.profile.now())

    def _pre(self, i: int) -> None:
        if self._active is not None and self._active != i:
            if self._running:
                raise BlockrtError(f"block {self.plan.blocks[i].name!r} was called from inside block "
                                   f"{self.plan.blocks[self._active].name!r}; nested blocks are not supported")
            self._release(self._active)
        self._running += 1
        if self._active is None:
            self._acquire(i)

    def _post(self, i: int, last: bool) -> None:
        self._running = max(0, self._running - 1)
        if last and not self._running and self._active == i:
            self._release(i)

    # -- residency ------------------------------------------------------------------------------------------

    def _acquire(self, i: int) -> None:
        t0 = self.profile.now()
        slot = self._slot_of.get(i)
        if slot is None:  # not prefetched (depth 0, or an unexpected order): load on demand
            slot = self._free_slot(i)
            self._request(i, slot, self._pass)
        req = slot.request
        assert req is not None
        waited = not req.done.is_set()
        try:
            self.loader.wait(req, self.config.load_timeout_s)
        except BaseException:
            slot.block, slot.request = None, None
            self._slot_of.pop(i, None)
            raise
        if waited:
            self.profile.record("wait", self.plan.blocks[i].name, self._pass, t0, self.profile.now(), 0, "compute")
        self._verified.add(i)
        self._binder.materialize(self._layouts[i].views(slot.buf))
        self._active = i
        self._compute_start = self.profile.now()
        self._prefetch(i)

    def _release(self, i: int) -> None:
        end = self.profile.now()
        name = self.plan.blocks[i].name
        self.profile.record("compute", name, self._pass, self._compute_start, end, 0, "compute")
        self._binder.evict(self.plan.blocks[i].tensors)
        slot = self._slot_of.pop(i)
        slot.block, slot.request = None, None
        if self.device.type == "cuda":
            slot.release_event = torch.cuda.Event()
            slot.release_event.record()
        self._active = None
        self.profile.record("evict", name, self._pass, end, self.profile.now(), self.plan.blocks[i].nbytes, "compute")
        self._prefetch(i)

    def _request(self, j: int, slot: Slot, pass_idx: int) -> None:
        verify = self.config.verify == "always" or (self.config.verify == "first" and j not in self._verified)
        slot.block = j
        slot.request = LoadRequest(j, self._layouts[j], slot, pass_idx, verify)
        self._slot_of[j] = slot
        self.loader.submit(slot.request)

    def _prefetch(self, i: int) -> None:
        """Request the ``prefetch_depth`` blocks after block ``i`` (cyclically) into free slots."""
        n = len(self.plan.blocks)
        for k in range(1, self.config.prefetch_depth + 1):
            j = (i + k) % n
            if j == self._active or j in self._slot_of:
                continue
            free = [s for s in self.slots if s.block is None]
            if not free:
                return
            self._request(j, free[0], self._pass + (1 if j <= i or i < 0 else 0))

    def _free_slot(self, i: int) -> Slot:
        free = [s for s in self.slots if s.block is None]
        if free:
            return free[0]
        n = len(self.plan.blocks)
        # reclaim the slot whose block is needed furthest in the future
        victim = max((s for s in self.slots if s.block != self._active), key=lambda s: (s.block - i) % n)
        assert victim.request is not None and victim.block is not None
        try:
            self.loader.wait(victim.request, self.config.load_timeout_s)
        except LoadError:
            pass  # that block is not needed now; its error will resurface if it is loaded again
        self._slot_of.pop(victim.block, None)
        victim.block, victim.request = None, None
        return victim


def _shutdown(loader: Loader, tmpdir: str | None) -> None:
    loader.close()
    if tmpdir:
        shutil.rmtree(tmpdir, ignore_errors=True)
