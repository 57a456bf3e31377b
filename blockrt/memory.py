"""Process memory as the operating system sees it: RSS split by kind, and a sampler thread.

What the numbers mean (Linux ``/proc/self/status``; all in bytes here):

- ``rss`` (VmRSS): every page of the process in RAM now; the sum of the three below.
- ``anon`` (RssAnon): the heap, torch tensors, slots, activations, written pages of private file mappings.
  Only freeing gives it back; it is what iOS charges an app against its limit (the "phys_footprint"), so
  it is the number to hold against a phone budget such as 3.3 GB.
- ``file`` (RssFile): clean pages of mapped files (mmap'd weights, code). The OS may drop them at any time
  and iOS does not count them: a model "loaded" with mmap shows its whole size in RSS once touched, yet
  none of it is anonymous. Read ``anon`` for what the runtime holds, ``file`` for what the page cache lends.
- ``shmem`` (RssShmem): shared memory (``/dev/shm``, torch's multiprocessing tensors).
- ``hwm`` (VmHWM): the kernel's exact high-water mark of ``rss``, which sampling can miss. Writing ``5`` to
  ``/proc/self/clear_refs`` (Linux >= 4.0, no root) resets it to the current RSS. There is no mark per kind.

Without ``/proc`` (macOS, Windows) ``read_rss`` falls back to ``psutil``: ``anon = rss, file = shmem = 0``,
``split = False``, and :class:`RssSampler` records only ``rss_bytes`` rather than pass mmap'd pages off as
anonymous memory. Cold reads are in ``page_cache.py``; glibc's allocator tuning in ``malloc.py``.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from .malloc import pin_malloc_mmap_threshold, trim_malloc

if TYPE_CHECKING:
    from .recording import Recording

__all__ = ["COUNTERS", "RssSample", "RssSampler", "read_rss", "rise_during"]

logger = logging.getLogger(__name__)

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"
_FIELDS = {b"VmRSS": "rss", b"RssAnon": "anon", b"RssFile": "file", b"RssShmem": "shmem", b"VmHWM": "hwm"}

# Counter names in a Profile: sample field -> counter. "rss_hwm_bytes" holds the kernel's high-water mark.
COUNTERS = {"rss": "rss_bytes", "anon": "rss_anon_bytes", "file": "rss_file_bytes"}
HWM_COUNTER = "rss_hwm_bytes"
DEFAULT_INTERVAL_S = 0.005
DEFAULT_RESOLUTION_BYTES = 2**20


@dataclass(frozen=True)
class RssSample:
    """One reading of the process's resident memory, in bytes (meanings in the module docstring); ``split`` is
    False where the kinds are unknown, ``hwm`` None where the OS reports no high-water mark."""

    rss: int
    anon: int
    file: int
    shmem: int
    hwm: int | None = None
    split: bool = True


def _read_proc_status() -> RssSample | None:
    try:
        with open(_STATUS, "rb") as f:
            data = f.read()
    except OSError:
        return None
    values: dict[str, int] = {}
    for line in data.splitlines():
        key, _, rest = line.partition(b":")
        field = _FIELDS.get(key)
        if field is not None:
            values[field] = int(rest.split()[0]) * 1024  # "VmRSS:\t  1732 kB"
    if "rss" not in values:
        return None
    rss = values["rss"]
    if "anon" not in values:  # kernels before 4.5 have no split
        return RssSample(rss, rss, 0, 0, values.get("hwm"), split=False)
    return RssSample(rss, values["anon"], values.get("file", 0), values.get("shmem", 0), values.get("hwm"))


def read_rss() -> RssSample:
    """The process's resident memory now: from ``/proc/self/status``, else from ``psutil``.

    Example:
        >>> s = read_rss()
        >>> s.rss >= s.anon > 0
        True
    """
    sample = _read_proc_status()
    if sample is not None:
        return sample
    import psutil

    info = psutil.Process().memory_info()
    peak = getattr(info, "peak_wset", None)  # Windows reports its own high-water mark
    return RssSample(int(info.rss), int(info.rss), 0, 0, None if peak is None else int(peak), split=False)


def _reset_hwm() -> bool:
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


T = TypeVar("T")
_marking: "weakref.WeakSet[RssSampler]" = weakref.WeakSet()  # running samplers that read the high-water mark


def rise_during(fn: Callable[[], T]) -> tuple[T, int | None]:
    """Run ``fn()``; return its result and how far the process's RSS rose, at the call's peak, above its level
    before the call (the kernel's high-water mark, reset for the call), or None where that cannot be read. It
    sees what no tensor shows, such as a CPU convolution's im2col scratch freed before the op returns; any
    other thread's growth meanwhile counts too (an upper bound). The mark a running sampler relies on is
    carried over to it, so its ``hwm`` stays the peak of its whole window."""
    before = _read_proc_status()
    if before is None or before.hwm is None:
        return fn(), None
    for sampler in list(_marking):
        sampler._carry(before.hwm)
    if not _reset_hwm():
        return fn(), None
    out = fn()
    after = _read_proc_status()
    return out, None if after is None or after.hwm is None else max(0, after.hwm - before.rss)


class RssSampler:
    """A daemon thread sampling :func:`read_rss` into a :class:`~blockrt.profile.Profile`.

    The sample taken in :meth:`start` is the baseline (start it before the runtime allocates). Samples go to
    the counters ``rss_bytes``, ``rss_anon_bytes`` and ``rss_file_bytes`` (the last two where the kinds are
    known) when they moved by ``resolution_bytes`` or are a new maximum, so every peak is kept without a
    sample every few ms. :meth:`stop` writes the high-water mark as ``rss_hwm_bytes`` where it was reset at
    start. ``peak_*_delta`` are peaks minus the baseline.

    Args:
        profile: where the counters go; None keeps only the peaks on the sampler.
        interval_s: seconds between samples (a sample costs about 20 us).
        resolution_bytes: the smallest change written to the profile's counters.
        reset_hwm: reset the kernel's high-water mark at start (process-wide: another sampler running at the
            same time only makes this one's ``hwm_rss_delta`` a lower bound, never too high).
        name: the thread's name.

    Example:
        >>> with RssSampler(profile) as rss:
        ...     x = torch.ones(50_000_000)  # 200 MB
        >>> rss.peak_anon_delta > 190e6
        True
    """

    def __init__(self, profile: Recording | None = None, interval_s: float = DEFAULT_INTERVAL_S, *,
                 resolution_bytes: int = DEFAULT_RESOLUTION_BYTES, reset_hwm: bool = True,
                 name: str = "blockrt-rss") -> None:
        if not (isinstance(interval_s, (int, float)) and 0 < interval_s < float("inf")):
            raise ValueError(f"interval_s must be a positive number of seconds; got {interval_s!r}")
        if isinstance(resolution_bytes, bool) or not isinstance(resolution_bytes, int) or resolution_bytes < 0:
            raise ValueError(f"resolution_bytes must be an int >= 0; got {resolution_bytes!r}")
        self.profile = profile
        self.interval_s = float(interval_s)
        self.resolution_bytes = resolution_bytes
        self._reset_hwm_at_start = reset_hwm
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = self._stopped = False
        self._hwm_valid = False
        self._carried = 0  # the high-water mark as it stood before a ``rise_during`` reset it
        self._written: dict[str, float] = {}  # counter -> last value written
        self._top: dict[str, float] = {}  # counter -> largest value written
        self.baseline: RssSample | None = None
        self.last: RssSample | None = None
        self.samples = 0
        self.peak_rss = self.peak_anon = self.peak_file = 0  # sampled maxima
        self.hwm: int | None = None  # the kernel's high-water mark at stop, if it was reset at start
        self.error: BaseException | None = None  # what stopped the thread early, if anything

    def start(self) -> RssSampler:
        """Take the baseline sample and start the thread. Returns self."""
        if self._started:
            raise RuntimeError("this RssSampler was started already; make a new one")
        self._started = True
        self._hwm_valid = self._reset_hwm_at_start and _reset_hwm()
        if self._hwm_valid:
            _marking.add(self)
        self.baseline = self._take()
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 1.0) -> None:
        """Stop the thread (waits at most ``timeout_s``) and take a last sample. Idempotent; never hangs."""
        if not self._started or self._stopped:
            return
        self._stopped = True
        self._stop.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():  # a daemon thread: it cannot keep the process alive
            logger.warning("RSS sampler thread %r did not stop within %.1f s", self._thread.name, timeout_s)
        _marking.discard(self)
        last = self._take()
        if self._hwm_valid and last.hwm is not None:
            with self._lock:
                self.hwm = max(last.hwm, self._carried)
            if self.profile is not None:
                self.profile.counter(HWM_COUNTER, self.profile.now(), float(self.hwm))

    def _carry(self, hwm: int) -> None:
        with self._lock:
            self._carried = max(self._carried, hwm)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def __enter__(self) -> RssSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.interval_s):
                self._take()
        except BaseException as e:  # noqa: BLE001 - a sampler must never take the process down
            self.error = e
            logger.warning("RSS sampler stopped early: %r", e)

    def _take(self) -> RssSample:
        s = read_rss()
        with self._lock:
            self.samples += 1
            self.last = s
            self.peak_rss = max(self.peak_rss, s.rss)
            self.peak_anon = max(self.peak_anon, s.anon)
            self.peak_file = max(self.peak_file, s.file)
            if self.profile is not None:
                t = self.profile.now()
                for field, counter in COUNTERS.items():
                    if field != "rss" and not s.split:
                        continue
                    v = float(getattr(s, field))
                    last = self._written.get(counter)
                    if last is None or abs(v - last) >= self.resolution_bytes or v > self._top[counter]:
                        self.profile.counter(counter, t, v)
                        self._written[counter] = v
                        self._top[counter] = max(v, self._top.get(counter, v))
        return s

    @property
    def hwm_rss_delta(self) -> int | None:
        """The kernel's exact peak RSS of the window minus the baseline; None before stop or without a reset."""
        if self.hwm is None or self.baseline is None:
            return None
        return self.hwm - self.baseline.rss

    @property
    def peak_rss_delta(self) -> int | None:
        """Peak RSS minus the baseline: the larger of the sampled peak and the kernel's high-water mark."""
        if self.baseline is None:
            return None
        return max(self.peak_rss, self.hwm or 0) - self.baseline.rss

    @property
    def peak_anon_delta(self) -> int | None:
        """Sampled peak of anonymous memory minus the baseline (None where the kinds are unknown)."""
        if self.baseline is None or not self.baseline.split:
            return None
        return self.peak_anon - self.baseline.anon

    @property
    def peak_file_delta(self) -> int | None:
        """Sampled peak of file-backed resident pages minus the baseline (None where the kinds are unknown)."""
        if self.baseline is None or not self.baseline.split:
            return None
        return self.peak_file - self.baseline.file


def start_rss(profile: Recording, interval_s: float | None, *, exact: bool = False) -> RssSampler | None:
    """A runtime's sampler, started before the runtime allocates (None without ``interval_s``); ``exact``
    (``RunConfig.exact_rss``) first pins glibc's thresholds and trims its heap, and resets the high-water mark."""
    if exact:
        pin_malloc_mmap_threshold()
        trim_malloc()
    return RssSampler(profile, interval_s=interval_s, reset_hwm=exact).start() if interval_s else None
