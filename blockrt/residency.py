"""Residency: which block's weights sit where, and what the loader fetches next.

Residency owns the slots: it creates them (reserving them and the loader's staging in the ledger), hands
them to loads and frees them at ``close``. Streamed blocks rotate through ``prefetch_depth + 1`` slots;
retained blocks (the paper's Dynamic Loading) get a buffer of their own, loaded once and reused every pass.
The prefetch window after block i is the next ``prefetch_depth`` blocks predicted by the order learned from
what runs (``order.py``; plan order, cyclically, until something is observed) that still need loading, so
while retained blocks compute the loader is already on the next streamed one. A slot is reclaimed from the
block predicted furthest ahead.

With ``RunConfig(mapped=True)`` a streamed block in ``mapped`` (stored as computed, aligned; ``mapping.py``) takes
no slot bytes: its load binds views of its file's pages, unmapped again when it is released. The slots then
hold only the other blocks, and the ledger holds the window of mapped pages (``prefetch_depth + 1`` of the
largest mapped block) as ``mapped`` bytes: file-backed, where every other kind is anonymous.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .binding import Binder
from .config import RunConfig
from .errors import LoadError
from .ledger import Ledger
from .loader import BlockLayout, Loader, LoadRequest, Slot
from .order import START, Order
from .packed_compute import bindings
from .partitioners.plan import Plan


class Residency:
    """Slots, retained buffers and load requests of one runtime; used from the compute thread only."""

    def __init__(self, plan: Plan, layouts: list[BlockLayout], loader: Loader, ledger: Ledger, binder: Binder,
                 profile, config: RunConfig, device: torch.device, *, n_slots: int, staging_bytes: int,
                 mapped: frozenset[int] = frozenset()) -> None:
        self.plan, self.layouts = plan, layouts
        self.loader, self.ledger, self.binder, self.profile = loader, ledger, binder, profile
        self.config, self.device = config, device
        self.mapped = mapped  # blocks bound to their file's pages when streamed
        slot_bytes = max((lay.nbytes for i, lay in enumerate(layouts) if i not in mapped), default=0)
        self._map_bytes = n_slots * max((layouts[i].nbytes for i in mapped), default=0)
        ledger.reserve("mapped", self._map_bytes, "the window of mapped (file-backed) blocks")
        self.slots: list[Slot] = []
        for s in range(n_slots):
            ledger.reserve("slots", slot_bytes, f"slot {s}")
            self.slots.append(Slot(s, slot_bytes, device))
        self._staging_bytes = staging_bytes
        ledger.reserve("slots", staging_bytes, "the loader's staging buffer (scales, widening)")
        self.slot_of: dict[int, Slot] = {}  # streamed block -> the slot it is in (loading, loaded or active)
        self.retained: dict[int, Slot] = {}  # retained block -> its own buffer
        self._nbytes = [lay.block.nbytes for lay in layouts]  # as held in a slot; Block.nbytes sums on every read
        self.bound: set[int] = set()  # retained blocks whose weights stay bound to the model between passes
        self.verified: set[int] = set()
        self.active: int | None = None
        self.pass_idx = -1
        self.in_pass = False  # blocks called between passes (an encoder via get_encoder()) belong to the next pass
        self.order = Order(len(plan.blocks), [b.modules[-1] for b in plan.blocks])
        self.wrap = True  # prefetch past the last block into the next pass (off for a pass known to be last)
        self._compute_start = 0.0
        self._in_flight: dict[int, tuple[str, int]] = {}  # id(request) -> (ledger kind of its buffer, bytes)

    @property
    def tag(self) -> int:
        """The pass that what runs now counts in: the running pass, or between passes the next one."""
        return self.pass_idx if self.in_pass else self.pass_idx + 1

    def acquire(self, i: int) -> None:
        """Make block ``i`` resident and bound (waiting for its load if needed), then prefetch."""
        self.order.observe(i)
        if i in self.bound:  # retained, loaded and still bound from an earlier turn: the steady path
            self.profile.record_reuse(self.plan.blocks[i].name, self.tag, self._nbytes[i])
            self.active = i
            self._compute_start = self.profile.now()
            self.prefetch(i)
            return
        t0 = self.profile.now()
        slot = self.retained.get(i) or self.slot_of.get(i)
        if slot is None or slot.request is None:  # not prefetched (depth 0, or an unexpected order)
            slot = slot or self._free_slot(i)
            self._request(i, slot, self.tag)
        req = slot.request
        assert req is not None
        waited = not req.done.is_set()
        try:
            self.loader.wait(req, self.config.load_timeout_s)
        except BaseException:
            self.settle(req)
            self._forget(i, slot)
            raise
        self.settle(req)
        name = self.plan.blocks[i].name
        if waited:
            self.profile.record("wait", name, self.tag, t0, self.profile.now(), 0, "compute")
        elif i in self.retained and req.pass_idx < self.tag:
            self.profile.record_reuse(name, self.tag, self._nbytes[i])
        self.verified.add(i)
        self.binder.materialize(req.views if req.mapped else bindings(self.layouts[i], slot.buf))
        self.active = i
        self._compute_start = self.profile.now()
        self.prefetch(i)

    def release(self, i: int) -> None:
        """Block ``i`` finished: a retained block stays bound (its own buffer does not move until it is unretained);
        a streamed one is unbound and its slot freed. Then prefetch into what was freed."""
        end = self.profile.now()
        block = self.plan.blocks[i]
        self.profile.record("compute", block.name, self.tag, self._compute_start, end, 0, "compute")
        self.active = None
        if i in self.retained:
            self.bound.add(i)  # its weights stay bound until it is unretained (or the runtime resets or closes)
        else:
            self.binder.evict(block.tensors, block.name)
            slot = self.slot_of.pop(i)
            self._unmap(slot.request)
            slot.block, slot.request = None, None
            if self.device.type == "cuda":
                slot.release_event = torch.cuda.Event()
                slot.release_event.record()
            self.profile.record("evict", block.name, self.tag, end, self.profile.now(), self._nbytes[i], "compute")
        self.prefetch(i)

    def prefetch(self, i: int) -> None:
        """Request the next ``prefetch_depth`` blocks predicted after ``i`` (``-1``: the start of a pass) that
        still need loading."""
        if len(self.bound) == len(self.plan.blocks):
            return  # every block retained and bound: nothing can need loading (the steady state, kept O(1))
        wanted, tag = 0, self.tag
        for j, crossed in self.order.upcoming(START if i < 0 else i):
            if wanted >= self.config.prefetch_depth:
                return
            if crossed and not self.wrap:
                return  # the caller said no pass follows: its first blocks would be read for nothing
            ret = self.retained.get(j)
            if ret is not None and ret.request is not None:
                continue  # retained and loaded (or loading): costs the loader nothing
            wanted += 1
            if j == self.active or j in self.slot_of:
                continue
            target = ret or next((s for s in self.slots if s.block is None), None)
            if target is None:
                return
            self._request(j, target, tag + (1 if crossed else 0))

    def retain(self, blocks: Iterable[int]) -> None:
        """Give each block a buffer of its own (reserved in the ledger). A block already loaded in a slot is
        copied over; the others load through the prefetch window on their next turn."""
        for i in sorted(blocks):
            lay = self.layouts[i]
            self.ledger.reserve("retained", lay.nbytes, f"retaining block {lay.block.name!r}")
            buf = Slot(-1 - i, lay.nbytes, self.device, prefault=False)  # the loader's read faults the pages in
            buf.block = i
            slot = self.slot_of.get(i)
            if slot is not None and slot.request is not None and i != self.active:
                if not slot.request.mapped:  # mapped: nothing to copy; its own buffer loads on its next turn
                    try:
                        self.loader.wait(slot.request, self.config.load_timeout_s)
                        buf.buf.copy_(slot.buf[: lay.nbytes])
                        buf.request = slot.request
                    except LoadError:
                        pass
                self.settle(slot.request)
                self._forget(i, slot)
            self.retained[i] = buf

    def unretain(self, i: int) -> None:
        """Drop block ``i``'s own buffer (it is not running); it streams through the slots from now on."""
        buf = self.retained.pop(i)
        if i in self.bound:
            self.bound.discard(i)
            self.binder.evict(self.plan.blocks[i].tensors, self.plan.blocks[i].name)
        if buf.request is not None and not buf.request.done.is_set():
            try:
                self.loader.wait(buf.request, self.config.load_timeout_s)
            except LoadError:
                pass
        self.settle(buf.request)
        buf.request = None
        self.ledger.release("retained", buf.buf.numel())

    def unretain_all(self) -> None:
        """Drop every retained buffer (between passes), returning its bytes to the ledger."""
        for i in list(self.retained):
            self.unretain(i)

    def _request(self, j: int, slot: Slot, pass_idx: int) -> None:
        verify = self.config.verify == "always" or (self.config.verify == "first" and j not in self.verified)
        slot.block = j
        slot.request = LoadRequest(j, self.layouts[j], slot, pass_idx, verify,
                                   mapped=j in self.mapped and j not in self.retained)
        if j not in self.retained:
            self.slot_of[j] = slot
        kind = "retained" if j in self.retained else "slots"
        self._in_flight[id(slot.request)] = (kind, slot.buf.numel())  # first: an interrupt between the two
        self.ledger.move(kind, "in_flight", slot.buf.numel())  # lines leaves a record _settle_all can trim
        self.loader.submit(slot.request)

    def settle(self, req: LoadRequest | None) -> None:
        """A load the compute thread has seen finish: its buffer's bytes are no longer in flight."""
        entry = self._in_flight.pop(id(req), None) if req is not None else None
        if entry is not None:
            self.ledger.move("in_flight", entry[0], entry[1])

    def _settle_all(self) -> None:
        """Every load is over (drained or the loader stopped): no buffer's bytes are in flight any more. A record
        whose move an interrupt cut off moves only what the ledger holds in flight."""
        for kind, n in self._in_flight.values():
            n = min(n, self.ledger.held().get("in_flight", 0))
            if n:
                self.ledger.move("in_flight", kind, n)
        self._in_flight.clear()

    def _forget(self, i: int, slot: Slot) -> None:
        if i in self.retained and self.retained[i] is slot:
            slot.request = None
            return
        self._unmap(slot.request)
        slot.block, slot.request = None, None
        self.slot_of.pop(i, None)

    def _unmap(self, req: LoadRequest | None) -> None:
        """Drop a finished mapped load's views and unmap its pages (they stay in the page cache)."""
        if req is not None and req.views is not None and req.done.is_set():
            req.views = None
            self.loader.maps.drop(self.loader.source.segment(t.key) for t in req.layout.block.tensors)

    def _free_slot(self, i: int) -> Slot:
        free = [s for s in self.slots if s.block is None]
        if free:
            return free[0]
        # reclaim the slot whose block is predicted furthest ahead (not predicted at all: furthest)
        ahead = self.order.distance(i)
        victim = max((s for s in self.slots if s.block != self.active), key=lambda s: ahead.get(s.block, len(ahead)))
        assert victim.request is not None and victim.block is not None
        try:
            self.loader.wait(victim.request, self.config.load_timeout_s)
        except LoadError:
            pass  # that block is not needed now; its error will resurface if it is loaded again
        self.settle(victim.request)
        self._forget(victim.block, victim)
        return victim

    def reset(self) -> None:
        """Back to a consistent state after a pass torch's hooks did not close (a ``KeyboardInterrupt`` can land
        anywhere, inside this class too): every submitted load finished, no block bound, the streamed slots
        free; a retained buffer stays loaded if its load completed, else it loads again on its next turn."""
        self.loader.drain(self.config.load_timeout_s)
        self._in_flight.clear()
        retained = self.retained.values()  # the buffers themselves are the truth, whatever move an interrupt cut
        self.ledger.correct({"in_flight": 0, "retained": sum(b.buf.numel() for b in retained),
                             "slots": sum(s.buf.numel() for s in self.slots) + self._staging_bytes,
                             "mapped": self._map_bytes})
        for s in self.slots:
            self._unmap(s.request)
            s.block, s.request = None, None
        for buf in self.retained.values():
            if buf.request is not None and not (buf.request.done.is_set() and buf.request.error is None):
                buf.request = None
        self.slot_of.clear()
        self.active = None
        self.wrap = True
        self.bound.clear()
        for b in self.plan.blocks:
            self.binder.evict(b.tensors, b.name)

    def close(self) -> None:
        """Return every buffer's bytes to the ledger and drop the buffers (the loader has stopped)."""
        self._settle_all()
        self.unretain_all()
        for s in self.slots:
            self._unmap(s.request)
            s.request = None
            self.ledger.release("slots", s.buf.numel())
        self.ledger.release("slots", self._staging_bytes)
        self.ledger.release("mapped", self._map_bytes)
        self._staging_bytes = self._map_bytes = 0
        if self.loader.maps is not None:
            self.loader.maps.close()  # each mapping goes with its last view
        self.slots.clear()
        self.slot_of.clear()
