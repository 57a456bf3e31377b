"""The runtime: ``blockrt.run(model, budget)`` and the ``Runtime`` handle it returns.

A thin facade over its private collaborators: removable forward hooks on the user's own modules drive
everything (``forward`` is never rewritten). A block's pre-hook makes it resident (``residency.py``); the
post-hook of its last module (also when forward raises) releases it (``entry_points.py``). Root hooks mark the
passes, which drive the measuring cycle and the retained set (``retention.py``); the ledger holds every byte.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import tempdirs
from .binding import Binder
from .budget import Floor
from .config import RunConfig
from .device import DeviceProfile, get_profile, resolve_budget
from .embedding_rows import EmbeddingRows, row_streamed_tables
from .errors import BlockrtError, PartitionError, RestoreError
from .entry_points import BlockHooks
from .ledger import Ledger
from .loader import Loader, Staging
from .malloc import trim_malloc
from .mapping import MappedFiles, mapped_blocks
from .memory import RssSampler, start_rss
from .page_cache import drop_page_cache
from .packed_compute import check_packed_bound, layout_of, packed_keys
from .partitioners import partition
from .partitioners.plan import Plan
from .predict import Prediction
from .profile import Profile
from .quantize import stored_dtypes
from .residency import Residency
from .restore import Originals, keep_originals
from .retention import Retention, RetentionState
from .schedule import BlockTiming
from .state import measure_state
from .weights import bind_pinned, open_weights
from .working_set import warm_up

log = logging.getLogger(__name__)
UNHOOKED = "(every block, retained)"  # the profile's block name for a pass run without the blocks' hooks


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
    """A model streamed block by block; see ``blockrt.run``.

    The public surface: call it like the model; ``profile``, ``plan``, ``config``, ``budget``,
    ``set_budget``, ``minimum_budget``, ``expect_last_pass``, ``retention`` (a read-only snapshot),
    ``ledger`` (bytes held by kind; read it, never reserve from it), ``timings``, ``predict``,
    ``read_bytes_per_s``, ``weight_files``, and ``close`` (or ``with``).
    """

    def __init__(self, model: nn.Module, budget: int | str | DeviceProfile, *, weights: str | Path | None = None,
                 store: str | Path | None = None, partitioner: Any = None, config: RunConfig | None = None) -> None:
        self.config = config = config or RunConfig()
        budget_bytes, budget_profile = resolve_budget(budget)
        profile = config.resolved_profile() or budget_profile
        self.read_bytes_per_s = config.read_bytes_per_s or (profile.read_bytes_per_s if profile else None)
        self.model = model
        self._device = torch.device(config.device)
        self.profile = Profile(budget=budget_bytes, device=str(self._device))
        self._closed = True
        self._hooks: list[Any] = []  # the root's and the row readers'; the blocks' are ``_blocks``
        self._blocks: BlockHooks | None = None
        self._tmpdir: str | None = None
        self._loader: Loader | None = None
        self._originals: Originals | None = None  # an in-memory model's weights, given back at close
        self._rss = start_rss(self.profile, config.rss_interval_s, exact=config.exact_rss)  # before allocating
        try:
            self._setup(model, budget_bytes, weights, store, partitioner)
        except BaseException:
            for h in self._hooks:  # a failure while installing them
                h.remove()
            self._hooks.clear()
            if self._blocks is not None:
                self._blocks.set(False)
            try:
                _shutdown(self._loader, self._rss, None)
                self._restore()  # the model is never left with placeholders by a failed set-up
            except RestoreError as e:
                log.warning("%s", e)  # the set-up's own error is the one to raise
            finally:
                _shutdown(None, None, self._tmpdir)
            raise

    def _setup(self, model: nn.Module, budget: int, weights: Any, store: Any, partitioner: Any) -> None:
        config = self.config
        self.plan: Plan = partition(model, target_bytes=config.target_block_bytes, partitioner=partitioner,
                                    pin=config.pin)
        if not self.plan.blocks:
            raise PartitionError(f"the plan for {type(model).__name__} has no blocks to stream")
        storage = {b.name: config.storage_for(b.name) for b in self.plan.blocks}
        packed = packed_keys(model, self.plan) if config.packed_compute else frozenset()
        stored = stored_dtypes(self.plan, storage, packed)
        layouts = [layout_of(b, stored, packed, config.packed_dtype) for b in self.plan.blocks]
        self._block_bytes = sum(lay.block.nbytes for lay in layouts)  # what a pass served by every block reuses
        self._rows = row_streamed_tables(model, self.plan, config.row_stream_min_bytes)  # tables read by rows
        n_slots = min(config.prefetch_depth + 1, len(self.plan.blocks))
        big = max(layouts, key=lambda lay: lay.nbytes)
        pinned_bytes = sum(s.nbytes for s in self.plan.pinned if s.key not in self._rows)

        def floor_for(staging: Staging) -> Floor:
            return Floor(pinned_bytes, big.nbytes, n_slots, staging.nbytes, 0, big.block.name, config.prefetch_depth)

        floor_for(Staging.of(layouts, stored)).check(budget)  # before any spilling
        source, self._tmpdir = open_weights(model, self.plan, config, storage, weights, store, packed)
        self._source = source
        check_packed_bound(layouts, source.segments, source.description)
        staging = Staging.of(layouts, {k: source.segment(k).dtype for b in self.plan.blocks for k in b.keys})
        floor = floor_for(staging)
        floor.check(budget)  # a checkpoint stored narrower than computed needs staging too
        if config.cold_reads:
            drop_page_cache(source.files())
        self.ledger = ledger = Ledger(budget, on_change=lambda total: self.profile.counter(
            "ledger_bytes", self.profile.now(), total))
        binder = Binder(model)
        ledger.reserve("pinned", pinned_bytes, "the pinned part")
        if weights is None and config.restore:  # from here on the model's tensors are bound for streaming
            self._originals = keep_originals(model, self.plan, self._rows, source, self._tmpdir)
            self._tmpdir = self._originals.tmpdir
        bind_pinned(model, self.plan, self._rows, binder, source if weights is not None else None, self._device)
        mapped = mapped_blocks(layouts, source) if config.mapped else frozenset()
        self._loader = Loader(source, self.profile, self._device, read_bytes_per_s=self.read_bytes_per_s,
                              slot_bytes=floor.slot_bytes, staging=staging,
                              maps=MappedFiles({f: os.path.getsize(f) for f in source.files()}) if mapped else None)
        self._residency = Residency(self.plan, layouts, self._loader, ledger, binder, self.profile, config,
                                    self._device, n_slots=n_slots, staging_bytes=staging.nbytes, mapped=mapped)
        self._retention = Retention(self.plan, layouts, self._residency, ledger, self.profile, config, floor,
                                    self.read_bytes_per_s)
        self._rows_reader = EmbeddingRows(model, self.plan, self._rows, source, binder, ledger, self.profile,
                                          self._device, lambda: self._residency.tag)
        self._blocks = BlockHooks(model, self.plan, self._residency, self._retention, lambda: self.paused)
        self.paused = False  # exporters set it while they call block modules with weights bound by themselves
        self._in_pass = False
        self._pass_ok = False
        self._unhooked_since: float | None = None
        self._turn = threading.Condition()  # guards _owner: the thread whose pass is running, or None
        self._owner: int | None = None
        self._closed = False
        self._finalizer = weakref.finalize(self, _shutdown, self._loader, self._rss, self._tmpdir)
        warm_up()
        self._install_hooks()
        self._residency.prefetch(-1)  # block 0 (and beyond) start loading now, before the first call

    def _install_hooks(self) -> None:
        m = self.model  # the root's hooks mark the passes; the blocks' load and release them
        self._hooks.append(m.register_forward_pre_hook(lambda mod, args, kwargs: self._begin_pass(args, kwargs),
                                                       with_kwargs=True))
        self._hooks.append(m.register_forward_hook(lambda mod, args, out: setattr(self, "_pass_ok", True)))
        self._hooks.append(m.register_forward_hook(lambda mod, args, out: self._end_pass(), always_call=True))
        self._hooks += self._rows_reader.install()
        self._blocks.set(True)  # off while every block is retained (``_begin_pass``)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the model (one pass) under ``torch.no_grad()``; same call and result as ``model(...)``.

        Calls from several threads are serialised. However a pass ends (returns, raises, ``KeyboardInterrupt``)
        the runtime is ready for the next call and nothing is left installed in the process."""
        if self._closed:
            raise BlockrtError("this Runtime is closed; create a new one with blockrt.run(...)")
        grad = torch.is_grad_enabled()  # restored in `finally`: a Ctrl-C inside no_grad's own exit left it off
        try:
            torch.set_grad_enabled(False)
            return self.model(*args, **kwargs)
        except BaseException:
            self._abort_pass()  # torch runs the always-call hooks for an Exception, never for KeyboardInterrupt
            raise
        finally:
            torch.set_grad_enabled(grad)

    @property
    def budget(self) -> int:
        """The memory budget in bytes (held by the ledger; change it with ``set_budget``)."""
        return self.ledger.budget

    @property
    def retention(self) -> RetentionState:
        """A read-only snapshot: measuring phase, the retained blocks and why, the measured working set."""
        return self._retention.state()

    @property
    def weight_files(self) -> list[str]:
        """The files the blocks and the pinned part are read from (e.g. for ``drop_page_cache``)."""
        return self._source.files()

    def read_tensor(self, key: str) -> torch.Tensor:
        """Read one of the plan's tensors from the weights this runtime streams, into fresh memory (outside the
        ledger; for tools such as the CoreML exporter that take weights one block at a time between passes)."""
        if self._in_pass:
            raise BlockrtError("the runtime is in the middle of a pass; read its weights between passes")
        return self._source.read_tensor(key)

    def minimum_budget(self) -> int:
        """The smallest budget for this plan and prefetch depth (``blockrt.budget.Floor``): pinned (less the
        tables read by rows) + slots x the largest block + the loader's staging, plus the measured working set
        (which holds the rows read) once the first pass has run."""
        return self._retention.floor().nbytes

    def expect_last_pass(self) -> None:
        """Say that the next call is the last one: its final blocks do not prefetch the start of a pass that
        never comes (a whole block's read saved, e.g. 771 MB for T5-XXL). Applies to one call; a further call
        still works, loading its first blocks on demand."""
        self._residency.wrap = False

    def set_budget(self, budget: int | str | DeviceProfile) -> None:
        """Change the budget between passes; retention is planned again for the new budget."""
        if self._in_pass:
            raise BlockrtError("set_budget must be called between passes, not during one")
        new, _ = resolve_budget(budget)
        self._retention.floor().check(new)
        self.ledger.budget = self.profile.budget = new  # the profile records what the ledger holds
        self._retention.budget_changed()
        self._blocks.set(not self._blocks.all_retained())  # a block called before the next pass loads

    def timings(self, pass_idx: int | None = None) -> tuple[list[BlockTiming], float]:
        """Per-block load/compute/gap seconds measured in one pass (default: the timing pass), and ``head_s``;
        see ``retention.measured_timings``."""
        return self._retention.timings(pass_idx)

    def predict(self, budget: int | str | None = None, device_profile: str | DeviceProfile | None = None,
                pass_idx: int | None = None) -> Prediction:
        """Predict this model's steady pass (sequential / concurrent / concurrent + retention) at ``budget`` from
        per-block timings measured in ``pass_idx`` (default: the timing pass), loads rescaled to
        ``device_profile``'s flash if given; needs the measuring passes. Compute measured while every block
        streams includes the loader's memory traffic, so budgets that retain most blocks come out pessimistic;
        a later ``pass_idx`` re-bases the prediction on that pass's conditions.
        """
        at = resolve_budget(budget)[0] if budget is not None else self.budget
        return self._retention.predict(at, get_profile(device_profile) if isinstance(device_profile, str)
                                       else device_profile, pass_idx)

    def close(self) -> None:
        """Remove the hooks, stop the loader, free the slots, give an in-memory model its weights back and remove
        any temporary store. Idempotent.

        A model that was in memory when ``blockrt.run`` got it has its original weights again afterwards (the same
        Parameter objects, dtypes and values, read back from disk; see ``restore.py``), also after a pass that
        raised or was interrupted; ``RunConfig(restore=False)`` leaves ``meta`` placeholders instead. A model
        streamed with ``weights=`` is a skeleton and stays one: its blocks' tensors are ``meta`` placeholders (the
        pinned part keeps what set-up read), so calling it fails on them; stream it again with
        ``blockrt.run(skeleton, budget, weights=...)``.
        """
        if self._closed:
            return
        self._closed = True
        try:
            self._abort_pass()  # a pass this thread left open (interrupted outside Runtime.__call__)
            self._retention.stop_tracking()
            if self._residency.active is not None:
                self._residency.release(self._residency.active)
            self._rows_reader.release_all()
        finally:
            for h in self._hooks:
                h.remove()
            self._hooks.clear()
            self._blocks.set(False)
            try:
                try:
                    _shutdown(self._loader, self._rss, None)  # the restore below is no part of the run's timeline
                finally:
                    self._residency.close()
                self._restore()
            finally:
                self._finalizer()  # the loader stops, the sampler stops, a temporary store goes, whatever happened

    def _restore(self) -> None:
        if self._originals is not None:
            self._originals.restore(Binder(self.model))

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            self.close()
        except RestoreError as e:
            if exc is None:
                raise
            log.warning("%s", e)  # the exception leaving the with-block is the one to see

    def _begin_pass(self, args: tuple, kwargs: dict) -> None:
        me = threading.get_ident()
        if self._owner == me:  # this thread's last pass never ended: an interrupt skipped torch's hooks
            self._abort_pass()
        if torch.is_grad_enabled():
            raise BlockrtError("blockrt streams weights for inference only: call the model under torch.no_grad() "
                               "(Runtime.__call__ does this for you)")
        with self._turn:  # one pass at a time: another thread's pass runs to its end first
            while self._owner is not None:
                self._turn.wait()
            self._owner = me
        self._retention.begin_pass(args, kwargs)
        self._residency.pass_idx += 1
        self._residency.in_pass = True
        self._blocks.running = 0
        self._in_pass = True
        self._pass_ok = False
        self.profile.begin_pass(self._residency.pass_idx, self.profile.now())
        self._retention.hold_state(measure_state(args, kwargs))  # a KV cache passed in grows every step
        # every block retained and bound, nothing measured: the blocks' hooks come off (a pass then costs the
        # root's hooks alone); whatever changes that puts them back before a block runs
        self._unhooked_since = self.profile.now() if self._blocks.all_retained() else None
        self._blocks.set(self._unhooked_since is None)

    def _end_pass(self) -> None:
        if self._owner != threading.get_ident():  # begin_pass refused the call before it took the runtime
            return
        try:
            self._in_pass = False
            self._residency.wrap = True
            if self._residency.active is not None:
                self._blocks.release(self._residency.active)
            if self._unhooked_since is not None:  # one event for the pass, which had every block bound
                p, now = self._residency.pass_idx, self.profile.now()
                self.profile.record("compute", UNHOOKED, p, self._unhooked_since, now, 0, "compute")
                self.profile.record_reuse(UNHOOKED, p, self._block_bytes)
            self._residency.in_pass = False
            self._residency.order.pass_ended()
            self._blocks.running = 0
            if self.config.exact_rss:
                trim_malloc()  # freed activations that glibc served from old heap chunks leave RSS again
            self.profile.end_pass(self._residency.pass_idx, self.profile.now())
            self._retention.end_pass(self._residency.pass_idx, self._pass_ok)
        finally:
            self._hand_over()

    def _abort_pass(self) -> None:
        """End this thread's pass from whatever state an interrupt left it in, so the next call is right."""
        if self._owner != threading.get_ident():
            return
        try:
            self._rows_reader.release_all()
            self._residency.reset()
            with contextlib.suppress(ValueError):  # the pass may have been closed in the profile already
                self.profile.end_pass(self._residency.pass_idx, self.profile.now())
            self._retention.end_pass(self._residency.pass_idx, ok=False)  # a partial measurement: measure again
        finally:
            self._in_pass = False
            self._residency.in_pass = False
            self._residency.order.pass_ended()
            self._blocks.running = 0
            if not self._closed:
                self._blocks.set(True)  # the reset unbound every block
            self._hand_over()

    def _hand_over(self) -> None:
        with self._turn:
            self._owner = None
            self._turn.notify()


def _shutdown(loader: Loader | None, rss: RssSampler | None, tmpdir: str | None) -> None:
    if loader is not None:
        loader.close()
    if rss is not None:
        rss.stop()
    if tmpdir:
        tempdirs.remove(tmpdir)
