"""The runtime: ``blockrt.run(model, budget)`` and the ``Runtime`` handle it returns.

Removable forward hooks on the user's own modules drive everything; ``forward`` is never rewritten.
A block's pre-hook makes it resident (``residency.py``); the post-hook of its last module (also when
forward raises) releases it. Hooks on the root module mark the passes and run the measuring cycle:

1. the first pass (and the first after the inputs' shapes change) tracks the working set live against the
   budget, with no retention, so it stays inside the budget while measuring;
2. the next pass measures each block's load and compute time at full speed;
3. then the free budget (budget - pinned - slots - working set) is filled with retained blocks, chosen by
   simulating the schedule (``predict.choose_retained``); later passes load only the rest.
"""

from __future__ import annotations

import logging
import shutil
import weakref
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from .binding import Binder, meta_leftovers
from .budget import format_bytes
from .config import RunConfig
from .device import DeviceProfile, resolve_budget
from .embedding_rows import EmbeddingRows, row_streamed_tables
from .errors import BlockrtError, BudgetError, PartitionError
from .ledger import Ledger
from .loader import BlockLayout, Loader, Slot, Staging
from .memory import RssSampler, drop_page_cache, pin_malloc_mmap_threshold, trim_malloc
from .partitioners.plan import Plan, dtype_from_name
from .predict import BlockTiming, RetentionDecision, choose_retained
from .profile import Profile
from .residency import Residency
from .quantize import stored_dtypes
from .weights import open_weights
from .working_set import LiveBytes, warm_up

log = logging.getLogger(__name__)


def run(model: nn.Module, budget: int | str | DeviceProfile, *, weights: str | Path | None = None,
        store: str | Path | None = None, partitioner: Any = None, config: RunConfig | None = None) -> "Runtime":
    """Stream ``model`` block by block under a memory budget.

    Args:
        model: the model, in memory (its blocks spill to a store on disk) or built on the ``meta`` device
            (then ``weights`` is required and nothing is ever materialised whole; see ``meta_weights``).
        budget: bytes as an int, a string like ``"3.3GB"`` (10^9), ``"3GiB"`` (2^30), ``"512MB"``, or a device
            profile name such as ``"iphone15pro"`` (its memory, and loads throttled to its flash speed).
        weights: a safetensors checkpoint (file, sharded index, directory) or a blockrt store to stream from.
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

    def __init__(self, model: nn.Module, budget: int | str | DeviceProfile, *, weights: str | Path | None = None,
                 store: str | Path | None = None, partitioner: Any = None, config: RunConfig | None = None) -> None:
        from blockrt.partitioners import partition

        self.config = config = config or RunConfig()
        self.budget, budget_profile = resolve_budget(budget)
        self.device_profile = config.resolved_profile() or budget_profile
        self.read_bytes_per_s = config.read_bytes_per_s or (self.device_profile.read_bytes_per_s if self.device_profile else None)
        self.model = model
        self.device = torch.device(config.device)
        self.profile = Profile(budget=self.budget, device=str(self.device))
        self._closed = True
        self._hooks: list[Any] = []
        self._tmpdir: str | None = None
        self.loader: Loader | None = None
        if config.pin_malloc_threshold:
            pin_malloc_mmap_threshold()
            trim_malloc()  # what glibc kept from before the runtime goes back to the OS: an honest baseline
        self._rss = RssSampler(self.profile, interval_s=config.rss_interval_s) if config.rss_interval_s else None
        if self._rss:
            self._rss.start()  # baseline: the process before the runtime allocates anything
        try:
            self._setup(model, weights, store, partitioner, partition)
        except BaseException:
            if getattr(self, "loader", None) is not None:
                self.loader.close()
            if self._rss:
                self._rss.stop()
            if getattr(self, "_tmpdir", None):
                shutil.rmtree(self._tmpdir, ignore_errors=True)
            raise

    def _setup(self, model: nn.Module, weights: Any, store: Any, partitioner: Any, partition: Any) -> None:
        config = self.config
        self.plan: Plan = partition(model, target_bytes=config.target_block_bytes, partitioner=partitioner)
        if not self.plan.blocks:
            raise PartitionError(f"the plan for {type(model).__name__} has no blocks to stream")
        self._layouts = [BlockLayout.of(b) for b in self.plan.blocks]
        self._storage = {b.name: config.storage_for(b.name) for b in self.plan.blocks}
        self._staging = Staging.of(self._layouts, stored_dtypes(self.plan, self._storage))  # before any spilling
        self._rows = row_streamed_tables(model, self.plan, config.row_stream_min_bytes)  # tables read by rows
        self._pinned_bytes = sum(s.nbytes for s in self.plan.pinned if s.key not in self._rows)
        self._check_budget()
        self.source, self._tmpdir = open_weights(self.model, self.plan, self.config, self._storage, weights, store)
        held = {k: self.source.segment(k).dtype for b in self.plan.blocks for k in b.keys}
        self._staging = Staging.of(self._layouts, held)
        self._check_budget()  # a checkpoint stored narrower than computed needs staging too
        if config.cold_reads:
            drop_page_cache(self.source.files())
        self.ledger = Ledger(self.budget, on_change=lambda total: self.profile.counter("ledger_bytes", self.profile.now(), total))
        binder = Binder(model)
        self._bind_pinned(binder, from_source=weights is not None)
        streamed = {k for b in self.plan.blocks for k in b.keys} | set(self.plan.aliases) | set(self._rows)
        leftovers = meta_leftovers(model, streamed)
        if leftovers:
            raise BlockrtError(
                f"{type(model).__name__} has tensors on the meta device that no weight file provides: {leftovers[:10]}; "
                "these are non-persistent buffers (computed, not stored) or weights missing from the plan; "
                "fix: build the skeleton inside `with blockrt.meta_weights():` (computed buffers stay real), "
                "or materialise those tensors before blockrt.run")
        for block in self.plan.blocks:
            binder.evict(block.tensors)
        slot_bytes = max(lay.nbytes for lay in self._layouts)
        slots = []
        for s in range(self._n_slots):
            self.ledger.reserve("slots", slot_bytes, f"slot {s}")
            slots.append(Slot(s, slot_bytes, self.device))
        self.ledger.reserve("slots", self._staging.nbytes, "the loader's staging buffer (scales, widening)")
        self.loader = Loader(self.source, self.profile, self.device, read_bytes_per_s=self.read_bytes_per_s,
                             slot_bytes=slot_bytes, max_queue=len(self.plan.blocks) + self._n_slots,
                             staging=self._staging)
        self.residency = Residency(self.plan, self._layouts, slots, self.loader, self.ledger, binder, self.profile,
                                   config, self.device)
        self.embedding_rows = EmbeddingRows(model, self.plan, self._rows, self.source, binder, self.ledger, self.profile,
                                            self.device, lambda: self.residency.pass_idx)
        self.residency.on_acquire = self._block_started
        self.residency.on_release = self._block_finished
        self.retention: RetentionDecision | None = None
        self.working_set: dict[str, int] = {}  # block name -> peak live activation bytes while it ran
        self.working_set_bytes = 0  # the pass's peak, held in the ledger once measured
        self._phase = "measure_memory"
        self._signature: tuple | None = None
        self._seen: dict[tuple, int] = {}  # input kind -> its measured working set (peak live bytes)
        self._block_ws: dict[str, int] = {}
        self._tracker: LiveBytes | None = None
        self._timing_pass = -1
        self._running = 0
        self._in_pass = False
        self._pass_ok = False
        self._closed = False
        self._finalizer = weakref.finalize(self, _shutdown, self.loader, self._rss, self._tmpdir)
        warm_up()
        self._install_hooks()
        self.residency.prefetch(-1)  # block 0 (and beyond) start loading now, before the first call

    # -- set-up ---------------------------------------------------------------------------------------------

    @property
    def _n_slots(self) -> int:
        return min(self.config.prefetch_depth + 1, len(self.plan.blocks))

    def minimum_budget(self) -> int:
        """The smallest budget for this plan and prefetch depth: pinned (less the tables read by rows) + slots x
        the largest block + the loader's staging (for blocks stored narrower than computed), plus the measured
        working set (which holds the rows read) once the first pass has run."""
        ws = getattr(self, "working_set_bytes", 0)
        staging = self._staging.nbytes
        return self._pinned_bytes + self._n_slots * max(lay.nbytes for lay in self._layouts) + staging + ws

    def _check_budget(self) -> None:
        need = self.minimum_budget()
        if need > self.budget:
            big = max(self._layouts, key=lambda lay: lay.nbytes)
            raise BudgetError(
                f"budget {format_bytes(self.budget)} is below the smallest feasible {format_bytes(need)} "
                f"({need} bytes): block {big.block.name!r} needs {format_bytes(big.nbytes)} in each of "
                f"{self._n_slots} slot(s) (prefetch_depth={self.config.prefetch_depth}) plus "
                f"{format_bytes(self._pinned_bytes)} pinned and {format_bytes(self._staging.nbytes)} of loader "
                "staging (storage dtypes narrower than computed), before any activations; fix: raise the budget "
                f"to at least {need} bytes, lower prefetch_depth, or split the model into smaller blocks")

    def _bind_pinned(self, binder: Binder, from_source: bool) -> None:
        self.ledger.reserve("pinned", self._pinned_bytes, "the pinned part")
        pinned = [s for s in self.plan.pinned if s.key not in self._rows]
        if from_source:
            pairs = [(s, self.source.read_tensor(s.key, self.device, dtype_from_name(s.dtype))) for s in pinned]
        else:
            pairs = [(s, binder.tensor(s.key).detach().to(self.device)) for s in pinned]
        binder.materialize(pairs)
        binder.evict([s for s in self.plan.pinned if s.key in self._rows])  # read by rows on each call

    def _install_hooks(self) -> None:
        m = self.model
        self._hooks.append(m.register_forward_pre_hook(lambda mod, args, kwargs: self._begin_pass(args, kwargs),
                                                       with_kwargs=True))
        self._hooks.append(m.register_forward_hook(lambda mod, args, out: setattr(self, "_pass_ok", True)))
        self._hooks.append(m.register_forward_hook(lambda mod, args, out: self._end_pass(), always_call=True))
        self._hooks += self.embedding_rows.install()
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

    def expect_last_pass(self) -> None:
        """Say that the next call is the last one: its final blocks do not prefetch the start of a pass that
        never comes (a whole block's read saved, e.g. 771 MB for T5-XXL). Applies to one call; a further call
        still works, loading its first blocks on demand."""
        self.residency.wrap = False

    def set_budget(self, budget: int | str | DeviceProfile) -> None:
        """Change the budget between passes; retention is planned again for the new budget."""
        if self._in_pass:
            raise BlockrtError("set_budget must be called between passes, not during one")
        new, _ = resolve_budget(budget)
        old = self.budget
        self.budget = new
        try:
            self._check_budget()
        except BudgetError:
            self.budget = old
            raise
        self.residency.unretain_all()
        self.retention = None
        self.ledger.budget = self.profile.budget = new
        if self._phase == "steady":
            self._plan_retention()

    def close(self) -> None:
        """Remove the hooks, stop the loader, free the slots and any temporary store. Idempotent.

        Streamed weights stay ``meta`` placeholders in the model afterwards (it never held them all).
        """
        if self._closed:
            return
        self._closed = True
        if self._tracker is not None:
            self._stop_tracking()
        if self.residency.active is not None:
            self.residency.release(self.residency.active)
        self.embedding_rows.release_all()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._finalizer()
        self.residency.settle_all()
        self.residency.unretain_all()
        for s in self.residency.slots:
            s.request = None
            self.ledger.release("slots", s.buf.numel())
        self.ledger.release("slots", self._staging.nbytes)
        self.residency.slots.clear()
        self.residency.slot_of.clear()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- passes and measurement -----------------------------------------------------------------------------

    def _begin_pass(self, args: tuple, kwargs: dict) -> None:
        if torch.is_grad_enabled():
            raise BlockrtError("blockrt streams weights for inference only: call the model under torch.no_grad() "
                               "(Runtime.__call__ does this for you)")
        signature = _signature(args, kwargs)
        measure = False
        if signature not in self._seen:
            # an unseen input kind (shapes, dtypes, flags such as merge_frames): measure its working set.
            # Kinds seen before keep their measurement (the ledger holds the largest of them).
            self._signature = signature
            if self.working_set_bytes:
                self.ledger.release("working_set", self.working_set_bytes)
                self.working_set_bytes = 0
            if self._phase == "steady":
                # keep the retained blocks and measure live against the budget; blocks are shed from
                # retention if the new kind's activations need their room (see _working_set_changed)
                log.info("new input shapes or flags: measuring their working set with retention in place")
            else:
                self.residency.unretain_all()
                self.retention = None
                self._phase = "measure_memory"
            measure = True
        self.residency.pass_idx += 1
        self._running = 0
        self._in_pass = True
        self._pass_ok = False
        self.profile.begin_pass(self.residency.pass_idx, self.profile.now())
        if measure or self._phase == "measure_memory":
            self._tracker = LiveBytes(on_change=self._working_set_changed)
            self._tracker.__enter__()

    def _end_pass(self) -> None:
        if not self._in_pass:  # begin_pass refused the call
            return
        self._in_pass = False
        self.residency.wrap = True
        if self.residency.active is not None:
            self.residency.release(self.residency.active)
        self._running = 0
        if self.config.pin_malloc_threshold:
            trim_malloc()  # freed activations that glibc served from old heap chunks leave RSS again
        self.profile.end_pass(self.residency.pass_idx, self.profile.now())
        if self._tracker is not None:
            peak = self._tracker.peak
            self._stop_tracking()
            if not self._pass_ok:  # forward raised: the measurement is partial; measure again next pass
                return
            self._seen[self._signature] = peak
            self.working_set.update(self._block_ws)
            need = max(self._seen.values())
            self.ledger.reserve("working_set", need, "the measured working set")
            self.working_set_bytes = need
            if self._phase == "measure_memory":
                self._phase = "measure_time"
                self._timing_pass = self.residency.pass_idx + 1
        elif self._phase == "measure_time" and not self._pass_ok:
            self._timing_pass = self.residency.pass_idx + 1
        elif self._phase == "measure_time" and self.residency.pass_idx == self._timing_pass:
            self._phase = "steady"
            if self.config.retention:
                self._plan_retention()

    def _stop_tracking(self) -> None:
        tracker, self._tracker = self._tracker, None
        assert tracker is not None
        tracker.__exit__(None, None, None)
        tracker.detach()
        self.ledger.release("working_set", self.ledger.held()["working_set"])

    def _working_set_changed(self, delta: int) -> None:
        if delta < 0:
            self.ledger.release("working_set", min(-delta, self.ledger.held()["working_set"]))
            return
        active = self.residency.active
        where = f"block {self.plan.blocks[active].name!r}" if active is not None else "the pinned modules"
        while True:
            try:
                self.ledger.reserve("working_set", delta, f"activations of {where}")
                return
            except BudgetError as e:
                if self._shed_one():  # retained blocks make room before anything fails
                    continue
                need = self.minimum_budget() + self.ledger.held()["working_set"] + delta
                raise BudgetError(
                    f"the measured working set passed the budget while running {where}: {e}; this run needs at "
                    f"least {format_bytes(need)} ({need} bytes) with these input shapes; fix: raise the budget, use "
                    "smaller inputs, or lower prefetch_depth") from None

    def _shed_one(self) -> bool:
        """Give up one retained block (not the running one) to make room for activations; False if none."""
        candidates = [i for i in self.residency.retained if i != self.residency.active]
        if not candidates:
            return False
        victim = max(candidates)
        self.residency.unretain(victim)
        if self.retention is not None:
            kept = tuple(i for i in self.retention.retained if i != victim)
            self.retention = replace(self.retention, retained=kept, nbytes=sum(self._layouts[i].nbytes for i in kept))
        log.info("shed retained block %s to make room for activations", self.plan.blocks[victim].name)
        return True

    def _block_started(self, i: int) -> None:
        if self._tracker is not None:
            self._tracker.start_window()

    def _block_finished(self, i: int) -> None:
        if self._tracker is not None:
            name = self.plan.blocks[i].name
            self._block_ws[name] = max(self._block_ws.get(name, 0), self._tracker.window_peak)

    def timings(self, pass_idx: int | None = None) -> tuple[list[BlockTiming], float]:
        """Per-block load/compute/gap seconds measured in one pass (default: the timing pass), and ``head_s``;
        see ``planning.measured_timings``."""
        from .planning import measured_timings

        p = self._timing_pass if pass_idx is None else pass_idx
        return measured_timings(self.profile, self.plan, self._layouts, p, self.read_bytes_per_s)

    def predict(self, budget: int | str | None = None, device_profile: str | DeviceProfile | None = None,
                pass_idx: int | None = None):
        """Predict this model's steady pass (sequential / concurrent / concurrent + retention) at ``budget``
        from per-block timings measured in ``pass_idx`` (default: the timing pass, as the runtime's own plan),
        with loads rescaled to ``device_profile``'s flash if given.

        Compute measured while every block streams includes the loader's memory traffic (on this 2-core
        machine it slows memory-bound compute by up to a third), so budgets that retain most blocks come out
        pessimistic; timings from a later pass re-base the prediction on that pass's conditions.
        Returns a ``blockrt.Prediction``; needs the measuring passes.
        """
        from .device import get_profile
        from .planning import runtime_prediction

        if self._phase != "steady":
            raise BlockrtError("predict() needs the measuring passes: call the runtime at least twice first")
        profile = get_profile(device_profile) if isinstance(device_profile, str) else device_profile
        p = self._timing_pass if pass_idx is None else pass_idx
        return runtime_prediction(self, resolve_budget(budget)[0] if budget is not None else None, profile, p)

    def _plan_retention(self) -> None:
        free = max(0, self.budget - self.ledger.total - self.config.reserve_for(self.budget))
        timings, head = self.timings()
        self.retention = choose_retained(timings, prefetch_depth=self.config.prefetch_depth, free_bytes=free,
                                         head_s=head)
        self.residency.retain(self.retention.retained)

    # -- block hooks ----------------------------------------------------------------------------------------

    def _pre(self, i: int) -> None:
        active = self.residency.active
        if active is not None and active != i:
            if self._running:
                raise BlockrtError(f"block {self.plan.blocks[i].name!r} was called from inside block "
                                   f"{self.plan.blocks[active].name!r}; nested blocks are not supported")
            self.residency.release(active)
        self._running += 1
        if self.residency.active is None:
            self.residency.acquire(i)

    def _post(self, i: int, last: bool) -> None:
        self._running = max(0, self._running - 1)
        if last and not self._running and self.residency.active == i:
            self.residency.release(i)


def _signature(args: tuple, kwargs: dict) -> tuple:
    """What makes two calls need the same memory: each tensor's shape, dtype and device, and the flags
    (bools, ints, strings, Nones) among the arguments. Floats are left out: a timestep passed as a float
    changes every call without changing what a pass allocates."""
    leaves = tree_leaves((args, kwargs))
    return tuple((tuple(x.shape), x.dtype, x.device.type) if isinstance(x, torch.Tensor) else
                 (type(x).__name__, x) if isinstance(x, (bool, int, str)) or x is None else type(x).__name__
                 for x in leaves)


def _shutdown(loader: Loader, rss: RssSampler | None, tmpdir: str | None) -> None:
    loader.close()
    if rss is not None:
        rss.stop()
    if tmpdir:
        shutil.rmtree(tmpdir, ignore_errors=True)
