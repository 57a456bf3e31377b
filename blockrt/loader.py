"""The loader: a background thread that reads blocks into preallocated, reused slots.

Follows PyTorch's pin-memory thread idiom: a named daemon thread, a bounded queue polled with timeouts,
a stop event, and exceptions carried back to the compute thread with the block and file named.

On CPU the loader ``preadv``s each tensor's bytes straight into the slot (the thread touches every byte
itself, and ``preadv`` releases the GIL). On CUDA it reads into one pinned host staging buffer and copies
to the device slot on a side stream, waiting for the compute stream to release the slot first.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import zlib
from dataclasses import dataclass, field

import torch

from .errors import LoadError
from .plan import Block, TensorSpec
from .sources import WeightSource, read_exactly

log = logging.getLogger(__name__)
ALIGN = 64  # bytes; the CPU allocator's alignment, so slot views compute exactly like ordinary tensors


@dataclass(frozen=True)
class BlockLayout:
    """Where each tensor of a block sits inside a slot: byte offsets aligned to ``ALIGN``."""

    block: Block
    offsets: tuple[int, ...]  # slot offset of each tensor in block.tensors
    nbytes: int  # slot bytes the block needs (including padding)

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
        from .plan import dtype_from_name

        out = []
        for spec, off in zip(self.block.tensors, self.offsets):
            raw = buf[off : off + spec.nbytes]
            out.append((spec, raw.view(dtype_from_name(spec.dtype)).view(spec.shape)))
        return out


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


@dataclass
class LoadRequest:
    """A block to read into a slot; ``done`` is set when it finished or failed (``error``)."""

    block_index: int
    layout: BlockLayout
    slot: Slot
    pass_idx: int
    verify: bool
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class Loader:
    """Owns the loader thread. ``submit`` requests; ``wait`` blocks the compute thread on one."""

    def __init__(self, source: WeightSource, profile, device: torch.device, *, read_bytes_per_s: float | None,
                 slot_bytes: int, name: str = "blockrt-loader", max_queue: int = 8) -> None:
        self.source = source
        self.profile = profile
        self.device = device
        self.read_bytes_per_s = read_bytes_per_s
        self._queue: queue.Queue[LoadRequest | None] = queue.Queue(maxsize=max_queue)
        self._stop = threading.Event()
        self._cuda = device.type == "cuda"
        self._staging = torch.empty(slot_bytes, dtype=torch.uint8).pin_memory() if self._cuda else None
        self._stream = torch.cuda.Stream(device) if self._cuda else None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, req: LoadRequest) -> None:
        while True:
            if self._stop.is_set() or not self._thread.is_alive():
                raise LoadError(f"cannot load block {req.layout.block.name!r}: the loader thread has stopped")
            try:
                self._queue.put(req, timeout=0.1)
                return
            except queue.Full:
                continue

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

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the thread; pending requests fail with a LoadError. Never hangs past ``timeout_s``."""
        self._stop.set()
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)
        while True:
            try:
                req = self._queue.get_nowait()
            except queue.Empty:
                break
            if req is not None:
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

    def _load(self, req: LoadRequest) -> None:
        layout, slot = req.layout, req.slot
        start = self.profile.now()
        host = self._staging if self._cuda else slot.buf
        arr = host.numpy()
        # file order: coalesce tensors that are adjacent on disk into one scatter read
        segs = sorted(((self.source.segment(t.key), off) for t, off in zip(layout.block.tensors, layout.offsets)),
                      key=lambda so: (so[0].path, so[0].offset))
        crc, done_bytes = 0, 0
        i = 0
        while i < len(segs):
            j = i + 1
            while j < len(segs) and segs[j][0].path == segs[i][0].path and \
                    segs[j][0].offset == segs[j - 1][0].offset + segs[j - 1][0].nbytes:
                j += 1
            views = [memoryview(arr[off : off + s.nbytes]) for s, off in segs[i:j] if s.nbytes]
            with open(segs[i][0].path, "rb", buffering=0) as f:
                done_bytes += read_exactly(f.fileno(), views, segs[i][0].offset, segs[i][0].path)
            if req.verify:
                for v in views:
                    crc = zlib.crc32(v, crc)
            self._throttle(start, done_bytes)
            i = j
        if req.verify:
            expected = self.source.block_crc32(req.block_index)
            if expected is not None and crc != expected:
                raise LoadError(
                    f"block {layout.block.name!r} from {segs[0][0].path}: crc32 {crc:#010x} does not match the "
                    f"manifest's {expected:#010x}: the file is corrupt; fix: delete the store so it is rewritten")
        if self._cuda:
            assert self._stream is not None
            with torch.cuda.stream(self._stream):
                if slot.release_event is not None:
                    self._stream.wait_event(slot.release_event)
                slot.buf[: layout.nbytes].copy_(host[: layout.nbytes], non_blocking=True)
            self._stream.synchronize()  # the staging buffer is free and the slot is ready
        self.profile.record("load", layout.block.name, req.pass_idx, start, self.profile.now(), done_bytes, "loader")

    def _throttle(self, start: float, nbytes: int) -> None:
        if self.read_bytes_per_s:
            delay = start + nbytes / self.read_bytes_per_s - self.profile.now()
            if delay > 0:
                self._stop.wait(delay)
