"""Retention (the paper's Dynamic Loading): measure a model's passes, then keep what fits resident.

The measuring cycle, per kind of input (shapes, dtypes and flags of the call):

1. ``Phase.MEASURE_MEMORY``: the first pass tracks the working set (live activation bytes, ``working_set.py``)
   against the budget, with nothing retained, so it stays inside the budget while measuring;
2. ``Phase.MEASURE_TIME``: the next pass measures each block's load and compute time at full speed;
3. ``Phase.STEADY``: the free budget (budget - what the ledger holds - the reserve) is filled with retained
   blocks, chosen on the schedule simulator (``predict.choose_retained``); later passes load only the rest.

A new input kind in the steady phase is measured with the retained blocks in place; if its activations
need their room, retained blocks are shed one by one before anything fails. Used from the compute thread.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import Enum

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
from torch.utils._pytree import tree_leaves

from .budget import Floor, format_bytes
from .config import RunConfig
from .device import DeviceProfile
from .errors import BlockrtError, BudgetError
from .ledger import Ledger
from .loader import BlockLayout
from .partitioners.plan import Plan
from .predict import Prediction, predict
from .recording import Recording
from .residency import Residency
from .schedule import BlockTiming, RetentionDecision, choose_retained
from .state import LEAVES, State
from .working_set import LiveBytes

log = logging.getLogger(__name__)


class Phase(Enum):
    """Where a runtime is in its measuring cycle (see the module docstring)."""

    MEASURE_MEMORY = "measure_memory"
    MEASURE_TIME = "measure_time"
    STEADY = "steady"


@dataclass(frozen=True)
class RetentionState:
    """What ``Runtime.retention`` shows: a read-only snapshot of the measuring cycle and the retained set."""

    phase: Phase
    decision: RetentionDecision | None  # the planned set and why (None before the steady phase)
    retained: tuple[int, ...]  # block indices resident now (the decision less any shed for activations)
    working_set: dict[str, int]  # block name -> peak live activation bytes while it ran
    working_set_bytes: int  # the largest pass peak over the input kinds seen, held in the ledger
    timing_pass: int  # the pass whose per-block timings planned the retention (-1 before)

    def __str__(self) -> str:
        return str(self.decision) if self.decision is not None else f"retention: {self.phase.value}, nothing retained"


class Retention:
    """The measuring cycle, the measured working set and the retained blocks of one runtime."""

    def __init__(self, plan: Plan, layouts: Sequence[BlockLayout], residency: Residency, ledger: Ledger,
                 profile: Recording, config: RunConfig, floor: Floor, read_bytes_per_s: float | None) -> None:
        self._plan, self._layouts, self._residency, self._ledger = plan, layouts, residency, ledger
        self._profile, self._config, self._floor, self._read_bytes_per_s = profile, config, floor, read_bytes_per_s
        self.phase = Phase.MEASURE_MEMORY
        self.decision: RetentionDecision | None = None
        self.working_set: dict[str, int] = {}
        self.working_set_bytes = 0
        self.timing_pass = -1  # the pass whose per-block timings plan the retention
        self._seen: dict[tuple, int] = {}  # input kind -> its measured working set (peak live bytes)
        self._signature: tuple | None = None
        self._block_ws: dict[str, int] = {}
        self._tracker: LiveBytes | None = None
        self._overrun: str | None = None  # where this pass's working set first passed the budget
        self.state_bytes = 0  # state that outlives a pass (a KV cache), held in the ledger as "state"

    @property
    def retained(self) -> tuple[int, ...]:
        """Indices of the blocks kept resident now (empty before the steady phase)."""
        return tuple(sorted(self._residency.retained))

    def floor(self) -> Floor:
        """The smallest budget now: the set-up's floor plus the measured working set."""
        return replace(self._floor, working_set_bytes=self.working_set_bytes)

    def state(self) -> RetentionState:
        return RetentionState(self.phase, self.decision, self.retained, dict(self.working_set), self.working_set_bytes,
                              self.timing_pass)

    def begin_pass(self, args: tuple, kwargs: dict) -> None:
        """A pass starts with these inputs; track its working set if their kind (``signature_of``) is new (kinds
        seen before keep their measurement; the ledger holds the largest)."""
        signature = signature_of(args, kwargs)
        new = signature not in self._seen
        if new:
            self._signature = signature
            if self.working_set_bytes:
                self._ledger.release("working_set", self.working_set_bytes)
                self.working_set_bytes = 0
            if self.phase is Phase.STEADY:
                log.info("new input shapes or flags: measuring their working set with retention in place")
            else:
                self._drop_retained()
                self.phase = Phase.MEASURE_MEMORY
        if new or self.phase is Phase.MEASURE_MEMORY:
            self._tracker = LiveBytes(on_change=self._working_set_changed)
            self._tracker.__enter__()

    def end_pass(self, pass_idx: int, ok: bool) -> None:
        """Pass ``pass_idx`` ended (``ok``: it returned normally); advance the measuring cycle."""
        if self._tracker is not None:
            peak, overrun = self._tracker.peak, self._overrun
            self.stop_tracking()
            if not ok:  # forward raised: the measurement is partial; measure again next pass
                return
            if overrun is not None:
                need = self.floor().nbytes + peak
                raise BudgetError(
                    f"the measured working set passed the budget while running {overrun}; measured to the end of the "
                    f"pass, this run needs at least {format_bytes(need)} ({need} bytes) with these input shapes (the "
                    "pass's output is discarded); fix: raise the budget, use smaller inputs, or lower prefetch_depth")
            self._seen[self._signature] = peak
            self.working_set.update(self._block_ws)
            need = max(self._seen.values())
            self._ledger.reserve("working_set", need, "the measured working set")
            self.working_set_bytes = need
            if self.phase is Phase.MEASURE_MEMORY:
                self.phase = Phase.MEASURE_TIME
                self.timing_pass = pass_idx + 1
        elif self.phase is Phase.MEASURE_TIME and not ok:
            self.timing_pass = pass_idx + 1
        elif self.phase is Phase.MEASURE_TIME and pass_idx == self.timing_pass:
            self.phase = Phase.STEADY
            if self._config.retention:
                self.plan_retention()

    @property
    def measuring(self) -> bool:
        """True while passes are measured (the working set of a new input kind, or the timing pass)."""
        return self.phase is not Phase.STEADY or self._tracker is not None

    def stop_tracking(self) -> None:
        """Remove the working-set tracker if one runs (pass end, or closing)."""
        tracker, self._tracker = self._tracker, None
        self._overrun = None
        if tracker is None:
            return
        if tracker in _get_current_dispatch_mode_stack():  # not when a Ctrl-C cut its __enter__ short
            tracker.__exit__(None, None, None)
        tracker.detach()
        self._ledger.release("working_set", self._ledger.held()["working_set"])

    def hold_state(self, state: State) -> None:
        """Hold ``state`` (measured at a pass's begin: a KV cache that grows every step) in the ledger as "state".
        Retained blocks are shed to make room; when even that is not enough, ``BudgetError`` names the state, its
        size and the budget the run needs."""
        held = self.state_bytes
        if state.nbytes == held:  # most passes: no state, or a cache that did not grow
            return
        if state.nbytes < held:
            self._ledger.release("state", held - state.nbytes)
            self.state_bytes = state.nbytes
            return
        while True:
            try:
                self._ledger.reserve("state", state.nbytes - held, f"state {state.largest}")
                self.state_bytes = state.nbytes
                return
            except BudgetError:
                if self._shed_one():
                    continue
                need = self._ledger.total - held + state.nbytes
                budget = self._ledger.budget
                raise BudgetError(
                    f"{state.largest} holds {format_bytes(state.largest_bytes)} ({state.largest_bytes} bytes) that "
                    f"outlive each pass (state in all: {format_bytes(state.nbytes)}); beside the pinned part, the "
                    f"slots and the working set this run needs at least {format_bytes(need)} ({need} bytes), over the "
                    f"budget of {format_bytes(budget)}; fix: raise the budget to at least {format_bytes(need)}, or "
                    "generate fewer tokens or a smaller batch (the cache grows with both)") from None

    def block_started(self, i: int) -> None:
        if self._tracker is not None:
            self._tracker.start_window()

    def block_finished(self, i: int) -> None:
        if self._tracker is not None:
            name = self._plan.blocks[i].name
            self._block_ws[name] = max(self._block_ws.get(name, 0), self._tracker.window_peak)

    def plan_retention(self) -> None:
        """Fill the free budget with retained blocks, chosen on the simulated schedule of the timing pass."""
        budget = self._ledger.budget
        free = max(0, budget - self._ledger.total - self._config.reserve_for(budget))
        # simulated in the order the timing pass ran its blocks (not plan order: a mid block registered after the
        # up blocks, two stacks), positions mapped back to block indices
        order = execution_order(self._profile, self._plan, self.timing_pass)
        timings, head = measured_timings(self._profile, self._plan, self._layouts, self.timing_pass,
                                         self._read_bytes_per_s, order)
        chosen = choose_retained(timings, prefetch_depth=self._config.prefetch_depth, free_bytes=free, head_s=head)
        self.decision = replace(chosen, retained=tuple(sorted(order[k] for k in chosen.retained)),
                                reasons={order[k]: why for k, why in chosen.reasons.items()})
        self._residency.retain(self.decision.retained)

    def budget_changed(self) -> None:
        """The budget changed between passes: drop the retained set and, once measured, plan it again."""
        self._drop_retained()
        if self.phase is Phase.STEADY and self._config.retention:
            self.plan_retention()

    def _drop_retained(self) -> None:
        self._residency.unretain_all()
        self.decision = None

    def _working_set_changed(self, delta: int) -> None:
        if delta < 0:
            self._ledger.release("working_set", min(-delta, self._ledger.held()["working_set"]))
            return
        if self._overrun is not None:  # past the budget already: only the peak is measured now
            return
        active = self._residency.active
        where = f"block {self._plan.blocks[active].name!r}" if active is not None else "the pinned modules"
        while True:
            try:
                self._ledger.reserve("working_set", delta, f"activations of {where}")
                return
            except BudgetError as e:
                if self._shed_one():  # retained blocks make room before anything fails
                    continue
                # measure on to the end of the pass, so the error can name a budget that runs (the ledger stays
                # under the budget; the process holds the rest of this one pass's activations unaccounted)
                self._overrun = f"{where}: {e}"
                return

    def _shed_one(self) -> bool:
        """Give up one retained block (not the running one) to make room for activations or state; False if none."""
        candidates = [i for i in self._residency.retained if i != self._residency.active]
        if not candidates:
            return False
        victim = max(candidates)
        self._residency.unretain(victim)
        if self.decision is not None:
            kept = tuple(i for i in self.decision.retained if i != victim)
            self.decision = replace(self.decision, retained=kept, nbytes=sum(self._layouts[i].nbytes for i in kept))
        log.info("shed retained block %s to make room for activations or state", self._plan.blocks[victim].name)
        return True

    def predict(self, budget: int, device_profile: DeviceProfile | None, pass_idx: int | None) -> Prediction:
        """``Runtime.predict``: the three configurations at ``budget`` from timings measured in ``pass_idx``."""
        if self.phase is not Phase.STEADY:
            raise BlockrtError("predict() needs the measuring passes: call the runtime at least twice first")
        timings, head = self.timings(pass_idx)
        if device_profile is not None:
            timings = [replace(t, load_s=t.nbytes / device_profile.read_bytes_per_s) for t in timings]
        floor = self.floor()
        return predict(timings, budget=budget, pinned_bytes=floor.pinned_bytes, working_set_bytes=floor.working_set_bytes,
                       prefetch_depth=self._config.prefetch_depth, head_s=head, reserve_bytes=self._config.reserve_for(budget),
                       staging_bytes=floor.staging_bytes)

    def timings(self, pass_idx: int | None = None) -> tuple[list[BlockTiming], float]:
        """``measured_timings`` of pass ``pass_idx`` (default: the timing pass)."""
        p = self.timing_pass if pass_idx is None else pass_idx
        return measured_timings(self._profile, self._plan, self._layouts, p, self._read_bytes_per_s)


def signature_of(args: tuple, kwargs: dict) -> tuple:
    """What makes two calls need the same memory: each tensor's shape, dtype and device, and the flags
    (bools, ints, strings, Nones) among the arguments. Floats are left out: a timestep passed as a float
    changes every call without changing what a pass allocates."""
    leaves = [*args, *kwargs.values()]  # the common call, flat: what tree_leaves gives, without its cost per pass
    if not all(isinstance(x, LEAVES) for x in leaves):
        leaves = tree_leaves((args, kwargs))
    return tuple((tuple(x.shape), x.dtype, x.device.type) if isinstance(x, torch.Tensor) else
                 (type(x).__name__, x) if isinstance(x, (bool, int, str)) or x is None else type(x).__name__
                 for x in leaves)


def execution_order(profile: Recording, plan: Plan, p: int) -> list[int]:
    """Block indices in the order pass ``p`` first ran them, then the blocks it did not run (in plan order)."""
    index = {b.name: i for i, b in enumerate(plan.blocks)}
    ran: dict[int, None] = {}
    for e in sorted((e for e in profile.events if e.pass_idx == p and e.kind == "compute"), key=lambda e: e.start):
        if e.block in index:
            ran.setdefault(index[e.block])
    return [*ran, *(i for i in range(len(plan.blocks)) if i not in ran)]


def measured_timings(profile: Recording, plan: Plan, layouts: Sequence[BlockLayout], p: int,
                     read_bytes_per_s: float | None, order: Sequence[int] | None = None
                     ) -> tuple[list[BlockTiming], float]:
    """Per-block load/compute/gap seconds measured in pass ``p`` of ``profile``, and ``head_s`` (the pinned
    compute before the first block). ``gap_s`` runs until the next block is entered (its wait, else its
    compute), for the last block until the pass ends. One timing per block in ``order`` (block indices;
    default: plan order)."""
    events = [e for e in profile.events if e.pass_idx == p]
    span = next(((s, e) for q, s, e in profile.passes if q == p), None)
    if span is None:
        raise ValueError(f"pass {p} has not completed; completed passes: {[q for q, _, _ in profile.passes]}")
    # a block retained in pass p was not loaded then: take its latest load from an earlier pass
    loads = {e.block: e.end - e.start for e in sorted(profile.events, key=lambda e: e.pass_idx)
             if e.kind == "load" and e.pass_idx <= p}
    waits = {e.block: (e.start, e.end) for e in events if e.kind == "wait"}
    computes = {e.block: e for e in events if e.kind == "compute"}
    order = list(range(len(plan.blocks))) if order is None else list(order)
    blocks = [plan.blocks[k] for k in order]

    def began(name: str) -> float:  # when the block was entered: its wait's start, else its compute's
        return waits[name][0] if name in waits else computes[name].start

    head = began(blocks[0].name) - span[0] if blocks[0].name in computes else 0.0
    out = []
    for pos, b in enumerate(blocks):
        c = computes.get(b.name)
        if c is None:
            compute, gap = 0.0, 0.0
        else:
            compute = c.end - c.start
            nxt = blocks[pos + 1].name if pos + 1 < len(blocks) else None
            gap = (began(nxt) if nxt in computes else span[1]) - c.end if nxt else span[1] - c.end
        default = b.nbytes / read_bytes_per_s if read_bytes_per_s else 0.0
        out.append(BlockTiming(b.name, layouts[order[pos]].nbytes, loads.get(b.name, default), compute, max(gap, 0.0)))
    return out, max(head, 0.0)
