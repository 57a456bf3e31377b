"""The loader: a background thread that reads blocks into preallocated, reused slots.

Follows PyTorch's pin-memory thread idiom: a named daemon thread, a bounded queue polled with timeouts,
a stop event, and exceptions carried back to the compute thread with the block and file named.

On CPU the loader ``preadv``s each tensor's bytes straight into the slot (the thread touches every byte
itself, and ``preadv`` releases the GIL). On CUDA it reads into one pinned host staging buffer and copies
to the device slot on a side stream, waiting for the compute stream to release the slot first.

Slots hold the compute dtype. A tensor stored narrower (float16/bfloat16, or int8/int4 weight-only)
is read into the tail of its own slot region and widened in place (``quantize.convert_in_place``); int8/int4
scales go to a small per-loader buffer. That buffer and the widening chunk buffer are the loader's
``Staging``, which the runtime holds in the ledger. Load events record the bytes read (as stored).
A weight computed packed (``BlockLayout.packed``, ``packed_compute.py``) stays as stored in the slot: its bytes are
only read, and its float32 scales go through the staging buffer into the slot in the kernel's form. A mapped
request (``mapping.py``) copies nothing: its tensors become views of the file's pages, which the thread prefetches.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import LoadError
from .guards import open_regular
from .mapping import MappedFiles
from .packed_kernels import fill_scales
from .partitioners.plan import Block, TensorSpec, dtype_from_name
from .quantize import convert_in_place, has_scales, scale_elements, scale_key, tmp_elements
from .safetensors_format import Segment
from .sources import WeightSource, read_exactly

log = logging.getLogger(__name__)
ALIGN = 64  # bytes; the CPU allocator's alignment, so slot views compute exactly like ordinary tensors


@dataclass(frozen=True)
class BlockLayout:
    """Where each tensor of a block sits inside a slot: byte offsets aligned to ``ALIGN``. With ``packed`` (weight
    key -> ``packed_compute.PackedSpec``) ``block.tensors`` holds each packed weight as its data and its scales
    (``packed_compute.bindings`` binds them)."""

    block: Block
    offsets: tuple[int, ...]  # slot offset of each tensor in block.tensors
    nbytes: int  # slot bytes the block needs (including padding)
    packed: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, block: Block) -> "BlockLayout":
        offsets, end = [], 0
        for t in block.tensors:
            end += -end % ALIGN
            offsets.append(end)
            end += t.nbytes
        return cls(block, tuple(offsets), end)

    def views(self, buf: torch.Tensor) -> list[tuple[TensorSpec, torch.Tensor]]:
        """Typed views of ``buf`` (a flat uint8 tensor) for every tensor of the block."""
        out = []
        for spec, off in zip(self.block.tensors, self.offsets):
            raw = buf[off : off + spec.nbytes]
            out.append((spec, raw.view(dtype_from_name(spec.dtype)).view(spec.shape)))
        return out


def _aligned(n: int) -> int:
    return n + (-n % ALIGN)


def scale_keys(layout: BlockLayout) -> set[str]:
    """The slot keys of the packed weights' scales in ``layout``."""
    return {p.scales.key for p in layout.packed.values()}


PACKED_SCALES = "packed scales"  # a _Widen that fills a packed weight's scales in the slot


@dataclass(frozen=True)
class Staging:
    """The loader's own buffers for stored tensors narrower than their compute dtype.

    ``scale_bytes``: the int8/int4 scales of the block that has the most (64-byte aligned each);
    ``tmp_elements``: float32 elements of the chunk buffer widening goes through.
    """

    scale_bytes: int = 0
    tmp_elements: int = 0

    @property
    def nbytes(self) -> int:
        return self.scale_bytes + 4 * self.tmp_elements

    @classmethod
    def of(cls, layouts: list[BlockLayout], stored: dict[str, str]) -> "Staging":
        """What loading ``layouts`` needs when tensor ``key`` is stored as ``stored[key]`` (default: as computed)."""
        scale_bytes, tmp = 0, 0
        for lay in layouts:
            block_scales = sum(_aligned(p.stored_scale_bytes) for p in lay.packed.values())
            packed = set(lay.packed) | scale_keys(lay)
            for t in lay.block.tensors:
                if t.key in packed:
                    continue  # packed: read as stored; its scales are counted above
                dtype = stored.get(t.key, t.dtype)
                if dtype == t.dtype:
                    continue
                tmp = max(tmp, tmp_elements(t, dtype))
                if has_scales(dtype):
                    block_scales += _aligned(4 * scale_elements(t, dtype))
            scale_bytes = max(scale_bytes, block_scales)
        return cls(scale_bytes, tmp)


@dataclass(frozen=True)
class _Read:
    """One stored tensor's bytes to read: ``seg`` into the slot at ``offset`` (or the scale buffer)."""
    seg: Segment
    offset: int
    into_scales: bool = False


@dataclass(frozen=True)
class _Widen:
    """Widen ``spec`` (at slot ``offset``, stored as ``stored``) once the reads up to ``after`` are done."""
    spec: TensorSpec
    offset: int
    stored: str
    scale_offset: int | None
    after: int  # index into the block's sorted reads


class Slot:
    """One reusable buffer that holds one block at a time."""

    def __init__(self, index: int, nbytes: int, device: torch.device, prefault: bool = True) -> None:
        self.index = index
        self.buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
        if prefault:
            self.buf.zero_()  # fault the pages in now, not during the first load
        self.block: int | None = None  # block index assigned to this slot
        self.request: LoadRequest | None = None
        self.release_event: torch.cuda.Event | None = None  # CUDA: compute finished with the slot


class Signal:
    """A one-shot "done" flag the loader sets and the compute thread waits on, safe against ``KeyboardInterrupt``.

    ``threading.Event`` is a Python-level Condition: Ctrl-C landing inside its ``wait`` can leave its lock held,
    and the loader then blocks forever in ``set``. Here ``set`` never blocks (a flag, then a C lock's release)
    and ``wait`` is one C ``acquire`` with a timeout; a lock an interrupt leaves held is never needed again.
    """

    def __init__(self) -> None:
        self._flag = False
        self._lock = threading.Lock()
        self._lock.acquire()

    def set(self) -> None:
        if not self._flag:
            self._flag = True
            self._lock.release()

    def is_set(self) -> bool:
        return self._flag

    def wait(self, timeout: float) -> bool:
        if self._flag:
            return True
        if self._lock.acquire(timeout=timeout):
            self._lock.release()
        return self._flag


@dataclass
class LoadRequest:
    """A block to read into a slot; ``done`` is set when it finished or failed (``error``)."""

    block_index: int
    layout: BlockLayout
    slot: Slot
    pass_idx: int
    verify: bool
    mapped: bool = False  # bind the block to its file's pages (``views``) instead of copying it into ``slot``
    done: Signal = field(default_factory=Signal)
    error: BaseException | None = None
    views: list[tuple[TensorSpec, torch.Tensor]] | None = None  # a mapped block's tensors, once loaded


class Loader:
    """Owns the loader thread. ``submit`` requests; ``wait`` blocks the compute thread on one."""

    def __init__(self, source: WeightSource, profile, device: torch.device, *, read_bytes_per_s: float | None,
                 slot_bytes: int, name: str = "blockrt-loader",
                 staging: Staging | None = None, maps: MappedFiles | None = None) -> None:
        self.source = source
        self.maps = maps
        self.staging = staging = staging or Staging()
        # scales and the widening chunk buffer (faulted in now, as the slots are); the runtime's ledger holds them
        self._scales = torch.zeros(staging.scale_bytes, dtype=torch.uint8)
        self._tmp = torch.zeros(staging.tmp_elements, dtype=torch.float32)
        self._reads: dict[int, tuple[list[_Read], list[_Widen]]] = {}
        self.profile = profile
        self.device = device
        self.read_bytes_per_s = read_bytes_per_s
        # a C queue: put and get are single calls, so an interrupt cannot leave a lock held between the threads
        self._queue: queue.SimpleQueue[LoadRequest | Signal | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._cuda = device.type == "cuda"
        self._pinned = torch.empty(slot_bytes, dtype=torch.uint8).pin_memory() if self._cuda else None
        self._stream = torch.cuda.Stream(device) if self._cuda else None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, req: LoadRequest) -> None:
        if self._stop.is_set() or not self._thread.is_alive():
            raise LoadError(f"cannot load block {req.layout.block.name!r}: the loader thread has stopped")
        self._queue.put(req)

    def wait(self, req: LoadRequest, timeout_s: float) -> None:
        """Block until ``req`` is done; re-raise its error here, naming the block and file."""
        deadline = time.monotonic() + timeout_s
        while not req.done.wait(0.05):
            if not self._thread.is_alive():
                raise LoadError(f"block {req.layout.block.name!r} was never loaded: the loader thread died")
            if time.monotonic() > deadline:
                raise LoadError(f"block {req.layout.block.name!r} did not load within {timeout_s:g} s "
                                "(RunConfig.load_timeout_s); is the disk or the throttle far too slow?")
        if req.error is not None:
            raise req.error

    def drain(self, timeout_s: float) -> None:
        """Return once every request submitted so far is done (or the thread has stopped, or ``timeout_s``)."""
        marker = Signal()
        self._queue.put(marker)
        deadline = time.monotonic() + timeout_s
        while not marker.wait(0.05) and self._thread.is_alive() and time.monotonic() < deadline:
            pass

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the thread; pending requests fail with a LoadError. Never hangs past ``timeout_s``."""
        self._stop.set()
        self._queue.put(None)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)
        while True:
            try:
                req = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(req, Signal):
                req.set()
            elif req is not None:
                req.error = LoadError(f"block {req.layout.block.name!r} not loaded: the runtime was closed")
                req.done.set()

    # -- the thread ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                req = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if req is None:
                break
            if isinstance(req, Signal):  # drain(): everything before it is done
                req.set()
                continue
            try:
                self._load(req)
            except BaseException as e:  # carried to the compute thread, with the block and file named
                seg = self.source.segment(req.layout.block.tensors[0].key) if req.layout.block.tensors else None
                where = f" from {seg.path}" if seg else ""
                err = e if isinstance(e, LoadError) else LoadError(
                    f"loading block {req.layout.block.name!r}{where} failed: {type(e).__name__}: {e}")
                err.__cause__ = e if err is not e else None
                req.error = err
            finally:
                req.done.set()

    def _plan_reads(self, req: LoadRequest) -> tuple[list[_Read], list[_Widen]]:
        """The block's reads in file order (adjacent ones coalesce) and the widenings after them; cached."""
        cached = self._reads.get(req.block_index)
        if cached is not None:
            return cached
        layout = req.layout
        reads: list[_Read] = []
        pending: list[tuple[TensorSpec, int, str, _Read, _Read | None]] = []
        scale_at = 0
        packed_scales = scale_keys(layout)
        for spec, off in zip(layout.block.tensors, layout.offsets):
            seg = self.source.segment(spec.key)
            if spec.key in packed_scales:  # float32 as stored -> the staging buffer -> the kernel's form
                scale = _Read(seg, scale_at, into_scales=True)
                scale_at += _aligned(seg.nbytes)
                reads.append(scale)
                pending.append((spec, off, PACKED_SCALES, scale, None))
                continue
            if seg.dtype == spec.dtype or spec.key in layout.packed:  # packed data: read as stored
                reads.append(_Read(seg, off))
                continue
            data = _Read(seg, off + spec.nbytes - seg.nbytes)  # the tail of its region: widened front to back
            scale = None
            if has_scales(seg.dtype):
                scale = _Read(self.source.segment(scale_key(spec.key)), scale_at, into_scales=True)
                scale_at += _aligned(scale.seg.nbytes)
            reads += [data] + ([scale] if scale else [])
            pending.append((spec, off, seg.dtype, data, scale))
        if scale_at > self.staging.scale_bytes or any(d != PACKED_SCALES and tmp_elements(s, d) > self.staging.tmp_elements
                                                      for s, _, d, _, _ in pending):
            raise LoadError(f"block {layout.block.name!r} needs more loader staging than was reserved "
                            f"({self.staging}); the runtime computed it from other storage dtypes")
        reads.sort(key=lambda r: (r.seg.path, r.seg.offset))
        pos = {id(r): k for k, r in enumerate(reads)}
        widen = sorted((_Widen(spec, off, dtype, data.offset if dtype == PACKED_SCALES else
                               scale.offset if scale else None, max(pos[id(data)], pos[id(scale)] if scale else -1))
                        for spec, off, dtype, data, scale in pending), key=lambda w: w.after)
        self._reads[req.block_index] = reads, widen
        return reads, widen

    def _load_mapped(self, req: LoadRequest, start: float) -> None:
        specs = req.layout.block.tensors
        views, nbytes, crc = self.maps.load(specs, [self.source.segment(t.key) for t in specs], req.verify)
        self._check_crc(req, crc)
        self._throttle(start, nbytes)
        req.views = views
        self.profile.record("load", req.layout.block.name, req.pass_idx, start, self.profile.now(), nbytes, "loader")
        self.profile.record_materialised(req.layout.block.name, req.pass_idx, req.layout.block.nbytes)

    def _check_crc(self, req: LoadRequest, crc: int) -> None:
        expected = self.source.block_crc32(req.block_index) if req.verify else None
        if expected is not None and crc != expected:
            raise LoadError(f"block {req.layout.block.name!r} from {self.source.segment(req.layout.block.tensors[0].key).path}"
                            f": crc32 {crc:#010x} does not match the manifest's {expected:#010x}: the file is "
                            "corrupt; fix: delete the store so it is rewritten")

    def _load(self, req: LoadRequest) -> None:
        layout, slot = req.layout, req.slot
        start = self.profile.now()
        if req.mapped:  # copy-free: views of the file's pages
            return self._load_mapped(req, start)
        host = self._pinned if self._cuda else slot.buf
        arr, scales = host.numpy(), self._scales.numpy()
        reads, widen = self._plan_reads(req)
        crc, done_bytes = 0, 0
        i, w = 0, 0
        while i < len(reads):
            j = i + 1
            while j < len(reads) and reads[j].seg.path == reads[i].seg.path and \
                    reads[j].seg.offset == reads[j - 1].seg.offset + reads[j - 1].seg.nbytes:
                j += 1
            views = [memoryview((scales if r.into_scales else arr)[r.offset : r.offset + r.seg.nbytes])
                     for r in reads[i:j] if r.seg.nbytes]
            with open_regular(reads[i].seg.path) as f:
                done_bytes += read_exactly(f.fileno(), views, reads[i].seg.offset, reads[i].seg.path)
            if req.verify:
                for v in views:
                    crc = zlib.crc32(v, crc)  # over the stored bytes, before any widening
            while w < len(widen) and widen[w].after < j:
                self._widen(host, widen[w])
                w += 1
            self._throttle(start, done_bytes)
            i = j
        self._check_crc(req, crc)
        if self._cuda:
            assert self._stream is not None
            with torch.cuda.stream(self._stream):
                if slot.release_event is not None:
                    self._stream.wait_event(slot.release_event)
                slot.buf[: layout.nbytes].copy_(host[: layout.nbytes], non_blocking=True)
            self._stream.synchronize()  # the staging buffer is free and the slot is ready
        self.profile.record("load", layout.block.name, req.pass_idx, start, self.profile.now(), done_bytes, "loader")
        self.profile.record_materialised(layout.block.name, req.pass_idx, layout.block.nbytes)

    def _widen(self, host: torch.Tensor, w: _Widen) -> None:
        region = host[w.offset : w.offset + w.spec.nbytes]
        if w.stored == PACKED_SCALES:
            n = w.spec.nbytes // dtype_from_name(w.spec.dtype).itemsize
            n = n // 2 if len(w.spec.shape) == 3 else n  # int4: (K/G, N, 2) holds K/G x N scales
            stored = self._scales[w.scale_offset : w.scale_offset + 4 * n].view(torch.float32)
            fill_scales(stored, region.view(dtype_from_name(w.spec.dtype)).view(w.spec.shape))
            return
        scale = None
        if w.scale_offset is not None:
            n = scale_elements(w.spec, w.stored)
            scale = self._scales[w.scale_offset : w.scale_offset + 4 * n].view(torch.float32)
        convert_in_place(region, w.spec, w.stored, scale, self._tmp)

    def _throttle(self, start: float, nbytes: int) -> None:
        if self.read_bytes_per_s:
            delay = start + nbytes / self.read_bytes_per_s - self.profile.now()
            if delay > 0:
                self._stop.wait(delay)
