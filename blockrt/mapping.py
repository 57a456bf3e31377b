"""Copy-free loading: a streamed block's weights bound to the pages of its file (``RunConfig(mapped=True)``).

Copying a block into a slot costs a pass over its bytes even when the file is in the page cache, which for
token-by-token generation is most of a step. A *mapped* block instead binds each weight to a view of a
private, read-only-in-practice mapping of its file (``mmap`` ``ACCESS_COPY``: a stray write makes a private copy
instead of a crash or a changed file). The loader thread only prefetches: ``madvise(WILLNEED)`` starts the
readahead of the block's byte range (the cold case) and ``MADV_POPULATE_READ`` maps its pages (they are read
here, on the loader thread, not faulted in by compute); after the block computes, ``madvise(DONTNEED)`` unmaps
them again. So at most the streaming window of a block's pages is mapped at once, and those pages are clean and
file-backed: the page cache keeps them and the OS may drop them, which is also how iOS counts clean mapped
memory. The runtime's ledger holds that window as ``mapped`` bytes beside the anonymous kinds.

A block is mapped only when every tensor of it is stored as computed (no widening, no packed compute) and sits
at a ``MAP_ALIGN``-byte offset of its file: a weight at another alignment can compute differently (the batch-1
matrix-vector kernels split their sums by address), and parity with the resident model comes first. blockrt's
own stores lay every tensor out at that alignment (``safetensors_format.write_file``); a checkpoint that does not
is converted once into such a store (``weights.open_weights``).

A file is mapped while a block of it is in the window (each mapping holds a descriptor), and a mapping lives as
long as any view of it (``torch.frombuffer`` holds the ``mmap``): this object only drops its references, so a
tensor a caller kept never points at unmapped memory. A weight file truncated while
mapped makes the OS raise ``SIGBUS`` on access; the loader checks each file's size before it maps a block.
"""

from __future__ import annotations

import mmap
import os
import threading
import zlib
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from .errors import LoadError
from .guards import open_regular
from .partitioners.plan import TensorSpec, dtype_from_name
from .safetensors_format import Segment

__all__ = ["MAP_ALIGN", "MappedFiles", "mappable", "mapped_blocks"]

MAP_ALIGN = 64  # bytes: the CPU allocator's alignment, so a mapped weight computes like a resident one
MADV_POPULATE_READ = 22  # Linux >= 5.14; older kernels: the pages are touched instead
_PAGE = mmap.PAGESIZE


def mappable(specs: Sequence[TensorSpec], segments: Iterable[Segment]) -> bool:
    """True when every tensor of a block (``specs``, with their stored ``segments`` in the same order) can be
    bound to its file's pages: stored in its compute dtype and shape, at a ``MAP_ALIGN``-aligned offset."""
    segs = list(segments)
    return bool(specs) and len(segs) == len(specs) and all(
        seg.dtype == spec.dtype and seg.nbytes == spec.nbytes and seg.offset % MAP_ALIGN == 0
        for spec, seg in zip(specs, segs))


def mapped_blocks(layouts: Sequence, source) -> frozenset[int]:
    """The indices of the blocks (``loader.BlockLayout``s) that ``source`` (a ``WeightSource``) can serve mapped:
    no packed weights, every tensor ``mappable``."""
    return frozenset(i for i, lay in enumerate(layouts) if not lay.packed and
                     mappable(lay.block.tensors, [source.segment(t.key) for t in lay.block.tensors]))


class MappedFiles:
    """The mappings of one runtime's weight files: ``load`` (loader thread) maps a block's files, ``drop``
    (compute thread) unmaps its pages and forgets a file no block in the window uses.

    ``expected_sizes``: a file's size as the source recorded it (path -> bytes); a file found at another size
    is refused before it is mapped (a mapped file that shrinks crashes the process).
    """

    def __init__(self, expected_sizes: dict[str, int] | None = None) -> None:
        self._maps: dict[str, mmap.mmap] = {}
        self._users: dict[str, int] = {}  # path -> blocks loaded from it and not dropped yet
        self._sizes = expected_sizes or {}
        self._lock = threading.Lock()
        self._populate = True  # MADV_POPULATE_READ until the kernel refuses it

    def _map(self, path: str, use: bool) -> mmap.mmap:
        with self._lock:
            self._users[path] = self._users.get(path, 0) + use
            mm = self._maps.get(path)
            if mm is None:
                with open_regular(path) as f:
                    size = os.fstat(f.fileno()).st_size
                    want = self._sizes.get(path)
                    if want is not None and size != want:
                        raise LoadError(f"{path} is {size} bytes where {want} were expected: the file changed "
                                        "while the runtime used it; fix: open the runtime again")
                    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # holds its own duplicate descriptor
                self._maps[path] = mm
            return mm

    def check_size(self, path: str) -> None:
        """Refuse a mapped file whose size changed since it was mapped (its lost pages would raise ``SIGBUS``)."""
        mm = self._maps.get(path)
        if mm is not None and os.stat(path).st_size < len(mm):
            raise LoadError(f"{path} shrank to {os.stat(path).st_size} bytes while mapped ({len(mm)}): the file "
                            "was changed in place; fix: never rewrite weight files a runtime uses")

    def load(self, specs: Sequence[TensorSpec], segments: Sequence[Segment], verify: bool
             ) -> tuple[list[tuple[TensorSpec, torch.Tensor]], int, int]:
        """Map a block: prefetch its pages and return ``(typed views in spec order, bytes mapped, crc32)``. The
        crc32 (0 unless ``verify``) runs over the tensors in file order, as the copying loader computes it."""
        views, seen = [], set()
        for spec, seg in zip(specs, segments):
            first = seg.path not in seen  # a file's size is checked once per block, not once per tensor
            mm = self._map(seg.path, use=first)
            if first:
                seen.add(seg.path)
                self.check_size(seg.path)
            if seg.offset + seg.nbytes > len(mm):
                raise LoadError(f"{seg.path}: tensor {seg.key!r} ends at byte {seg.offset + seg.nbytes}, past the "
                                f"file's {len(mm)}; fix: write the checkpoint again")
            self._advise(mm, seg, mmap.MADV_WILLNEED)
            raw = torch.frombuffer(mm, dtype=torch.uint8, count=seg.nbytes, offset=seg.offset) if seg.nbytes \
                else torch.empty(0, dtype=torch.uint8)
            views.append((spec, raw.view(dtype_from_name(spec.dtype)).view(spec.shape)))
        crc = 0
        for spec, seg in sorted(zip(specs, segments), key=lambda p: (p[1].path, p[1].offset)):
            mm = self._maps[seg.path]
            self._prefault(mm, seg)
            if verify and seg.nbytes:
                crc = zlib.crc32(memoryview(mm)[seg.offset : seg.offset + seg.nbytes], crc)
        return views, sum(s.nbytes for s in segments), crc

    def drop(self, segments: Iterable[Segment]) -> None:
        """Unmap a block's pages after it computed (they stay in the page cache). Only whole pages inside a
        tensor are dropped, so a page a neighbouring block shares stays mapped."""
        paths = set()
        for seg in segments:
            mm = self._maps.get(seg.path)
            if mm is None:
                continue
            paths.add(seg.path)
            start = -(-seg.offset // _PAGE) * _PAGE
            end = (seg.offset + seg.nbytes) // _PAGE * _PAGE
            if end > start:
                mm.madvise(mmap.MADV_DONTNEED, start, end - start)
        with self._lock:
            for p in paths:
                self._users[p] -= 1
                if self._users[p] <= 0:
                    del self._users[p], self._maps[p]

    def close(self) -> None:
        """Forget the mappings; each goes away with the last tensor that views it (never unmapped under one)."""
        with self._lock:
            self._maps.clear()
            self._users.clear()

    @staticmethod
    def _range(mm: mmap.mmap, seg: Segment) -> tuple[int, int]:
        start = seg.offset // _PAGE * _PAGE
        return start, min(len(mm), seg.offset + seg.nbytes) - start

    def _advise(self, mm: mmap.mmap, seg: Segment, advice: int) -> None:
        if seg.nbytes:
            mm.madvise(advice, *self._range(mm, seg))

    def _prefault(self, mm: mmap.mmap, seg: Segment) -> None:
        """Map the tensor's pages now, on this thread: one ``MADV_POPULATE_READ`` (reads what is not cached), or
        where the kernel lacks it, one byte read per page."""
        if not seg.nbytes:
            return
        if self._populate:
            try:
                mm.madvise(MADV_POPULATE_READ, *self._range(mm, seg))
                return
            except OSError:
                self._populate = False
        start, n = self._range(mm, seg)
        int(np.frombuffer(mm, dtype=np.uint8, count=n, offset=start)[::_PAGE].sum())
