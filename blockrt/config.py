"""``RunConfig``: the rare knobs of a run, validated in one place (never environment variables)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .device import DeviceProfile

VERIFY_MODES = ("first", "always", "never")
DEFAULT_RESERVE_FRACTION = 0.03  # of the budget, kept out of retention for memory outside the ledger
DEFAULT_RESERVE_CAP = 128 << 20  # the full-size run measured 58-71 MB of RSS outside the ledger at 3.3 GB
DEFAULT_ROW_STREAM_MIN_BYTES = 16 << 20  # a table this large is read by rows (T5-large's is 131.6 MB)
# as blockrt.quantize and blockrt.int4.INT4_STORAGE ("int4" = groups of 128)
PACKED_DTYPES = ("float32", "bfloat16", "float16")
STORAGE_DTYPES = ("float32", "float16", "bfloat16", "int8", "int4", "int4-g32", "int4-g64", "int4-g128", "int4-g256")


@dataclass(frozen=True)
class RunConfig:
    """Options of ``blockrt.run``; every field is checked in ``__post_init__``.

    Args:
        prefetch_depth: blocks loaded ahead of the one computing. 1 = double buffering (two slots);
            0 = load on demand, the paper's sequential baseline.
        device: where compute runs: ``"cpu"`` or ``"cuda"``/``"cuda:N"``.
        target_block_bytes: pack consecutive layers into blocks up to this many bytes (None = the partitioner's
            default; for the whole-model partitioner, blocks up to its largest unit, at most 1/8 of the model).
        read_bytes_per_s: throttle the loader to this read bandwidth (simulates slow flash); None = the device
            profile's flash speed if there is one, else as fast as the disk.
        device_profile: simulate this device's loads (a name such as ``"iphone15pro"`` or a ``DeviceProfile``);
            a profile name given as the budget sets this too.
        retention: after the measuring passes, keep as many blocks resident as the free budget holds.
        cold_reads: drop the weight files from the page cache (``posix_fadvise(DONTNEED)``) before the run.
        rss_interval_s: sample the process RSS this often into the profile; None = do not sample.
        exact_rss: make the process RSS follow the ledger, for measuring (off by default: a library leaves
            the host process alone). On glibc it fixes malloc's mmap and trim thresholds at 128 KiB and trims
            the heap after each pass, so freed activations return to the OS instead of staying in RSS unseen
            by the ledger; on Linux the RSS sampler resets the kernel's high-water mark at start. All three
            are process-wide. The environment ``MALLOC_MMAP_THRESHOLD_=131072 MALLOC_TRIM_THRESHOLD_=131072``
            (as ``make test`` and the benchmarks set) gets the same allocator behaviour from process start.
        verify: check each block's crc32 on its ``"first"`` load (default), on ``"always"``, or ``"never"``.
        strict_keys: with ``weights=``, a checkpoint key the model does not have is an error.
        weights_prefix: with ``weights=``, stream a submodule out of a whole model's checkpoint: the model's
            key ``k`` is stored as ``weights_prefix + k`` (e.g. ``"temporal_vae.decoder."``).
        load_timeout_s: the longest compute waits for one block before declaring the loader stuck.
        storage_dtype: the dtype blocks are stored in: None = as the model (or checkpoint) is; ``"float16"``,
            ``"bfloat16"``, ``"float32"`` (casts), ``"int8"`` (weight-only, per-output-channel scales, for
            matrices; biases and norms stay in the compute dtype), ``"int4"`` / ``"int4-g<32|64|128|256>"``
            (weight-only 4-bit, a float32 scale per group of 128 or G elements of a row; rows that do not split
            into groups are stored int8); or a dict of block-name glob patterns to
            one of those (``{"encoder.block.*": "int8"}``; first match wins, unmatched blocks as they are).
            The loader dequantises into the compute dtype; pinned tensors are always in the compute dtype.
        store_path: where a store is written: the spilled in-memory model's store (as ``store=``), or the store
            a checkpoint is converted into once when ``storage_dtype`` asks for another dtype than it holds
            (default then: ``<user cache>/stores/<hash>``, see ``cache_dir.py``; never inside the checkpoint).
        reserve_bytes: budget the retention planner leaves unfilled for memory the runtime does not own
            (allocator slack, thread stacks, kernels' scratch), so the process RSS, not only the ledger, stays
            under the budget; None = 3% of the budget, at most 128 MiB. Feasibility checks ignore it.
        row_stream_min_bytes: a pinned ``nn.Embedding`` table at least this large is never read whole: each call
            reads only the rows its ids use (``embedding_rows.py``; tables tied to a non-embedding, such as an LM
            head, stay pinned). 0 = every eligible table, None = none (all pinned).
        restore: an in-memory model gets its original weights back at ``close`` (the same Parameter objects,
            dtypes, devices and values; ``restore.py``), read from the store, plus a restore file written at spill
            time for tensors stored narrower (lossy ``storage_dtype``). False: the streamed tensors stay ``meta``
            placeholders after close (no restore file, no read-back). Models streamed with ``weights=`` are
            skeletons and stay so either way.
        pin: module paths whose weights stay resident instead of streaming, whatever the partitioner decided
            (e.g. ``["transformer_blocks.0.norm1"]`` for a module a model calls while another block runs).
        packed_compute: compute the ``nn.Linear`` layers of int4/int8-stored blocks with PyTorch's weight-only
            int4/int8 CPU kernels on the stored bytes (``packed_compute.py``) instead of widening them: a block's
            slot then holds those weights packed (int4: half a byte per weight plus its scales), the loader only
            reads them, and the outputs are those of the packed kernels (not ``torch.equal`` to widening).
            int4 weights are stored in the kernel's nibble order (stored dtype ``int4pack-<cpu>-g<G>``, its own
            store); Linears the kernels cannot take (int4: out features not a multiple of 16; a weight another
            module reads too) are widened as usual. Needs int4/int8 ``storage_dtype`` and ``device="cpu"``.
        packed_dtype: the dtype the packed kernels compute in: None = each layer's own dtype; ``"bfloat16"``
            (or ``"float16"``/``"float32"``) = activations cast to it and the result cast back. PyTorch 2.13 runs
            float32 activations on the kernels' scalar path, which only breaks even with widening at one token;
            bfloat16 ones on the vectorised path (``benchmarks/packed_matmul.py``).
        mapped: copy-free streaming (``mapping.py``): a streamed block whose tensors are stored as computed, each
            at a 64-byte offset of its file (every blockrt store), is bound to its file's pages instead of being
            copied into a slot; a checkpoint whose tensors are not so aligned is converted once into a store, as
            for ``storage_dtype`` (at ``store_path``, else the user cache). The loader thread only prefetches them
            (``madvise``); they are unmapped after the block runs. Those bytes are file-backed (the ledger's
            ``mapped``): clean pages the OS may drop, not anonymous memory. Other blocks, and retained ones,
            load by copying as usual. Outputs stay ``torch.equal`` to copying. ``device="cpu"`` only.

    Example:
        >>> RunConfig(prefetch_depth=2, read_bytes_per_s=1.45e9)
    """

    prefetch_depth: int = 1
    device: str = "cpu"
    target_block_bytes: int | None = None
    read_bytes_per_s: float | None = None
    device_profile: "str | DeviceProfile | None" = None
    retention: bool = True
    cold_reads: bool = False
    rss_interval_s: float | None = 0.005
    exact_rss: bool = False
    verify: str = "first"
    strict_keys: bool = True
    weights_prefix: str = ""
    load_timeout_s: float = 600.0
    storage_dtype: str | dict[str, str] | None = None
    store_path: str | os.PathLike | None = None
    reserve_bytes: int | None = None
    row_stream_min_bytes: int | None = DEFAULT_ROW_STREAM_MIN_BYTES
    restore: bool = True
    pin: tuple[str, ...] = ()
    packed_compute: bool = False
    packed_dtype: str | None = None
    mapped: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.prefetch_depth, bool) or not isinstance(self.prefetch_depth, int) or self.prefetch_depth < 0:
            raise ValueError(f"prefetch_depth must be an int >= 0 (1 = double buffering); got {self.prefetch_depth!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]'; got {self.device!r}")
        if self.target_block_bytes is not None and self.target_block_bytes <= 0:
            raise ValueError(f"target_block_bytes must be positive or None; got {self.target_block_bytes!r}")
        if self.read_bytes_per_s is not None and not (
            isinstance(self.read_bytes_per_s, (int, float)) and math.isfinite(self.read_bytes_per_s) and self.read_bytes_per_s > 0
        ):
            raise ValueError(f"read_bytes_per_s must be a positive number of bytes/s or None; got {self.read_bytes_per_s!r}")
        if self.verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}; got {self.verify!r}")
        if self.rss_interval_s is not None and not (self.rss_interval_s > 0):
            raise ValueError(f"rss_interval_s must be positive or None; got {self.rss_interval_s!r}")
        self.resolved_profile()  # an unknown profile name fails here, listing the known ones
        if not (self.load_timeout_s > 0):
            raise ValueError(f"load_timeout_s must be positive; got {self.load_timeout_s!r}")
        self._check_storage()
        if self.reserve_bytes is not None and (isinstance(self.reserve_bytes, bool) or not isinstance(self.reserve_bytes, int)
                                               or self.reserve_bytes < 0):
            raise ValueError(f"reserve_bytes must be an int >= 0 or None (3% of the budget, at most 128 MiB); "
                             f"got {self.reserve_bytes!r}")
        m = self.row_stream_min_bytes
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 0):
            raise ValueError(f"row_stream_min_bytes must be an int >= 0 (0 = read every eligible embedding table by "
                             f"rows) or None (keep every table pinned); got {m!r}")
        if not isinstance(self.restore, bool):
            raise ValueError(f"restore must be True (give an in-memory model its weights back at close) or False; "
                             f"got {self.restore!r}")
        if not isinstance(self.pin, (list, tuple)) or not all(isinstance(p, str) and p for p in self.pin):
            raise ValueError(f"pin must be a list of module paths such as ['encoder.block.0.layer.0']; got {self.pin!r}")
        object.__setattr__(self, "pin", tuple(self.pin))
        self._check_packed()
        if not isinstance(self.mapped, bool):
            raise ValueError(f"mapped must be True (bind streamed blocks to their files' pages) or False; "
                             f"got {self.mapped!r}")
        if self.mapped and self.device != "cpu":
            raise ValueError(f"mapped=True binds blocks to file pages in host memory, so it needs device='cpu'; "
                             f"got device={self.device!r}; fix: drop mapped=True on {self.device}")
        if self.store_path is not None and not isinstance(self.store_path, (str, os.PathLike)):
            raise ValueError(f"store_path must be a directory path or None; got {self.store_path!r}")

    def _check_storage(self) -> None:
        s = self.storage_dtype
        accepted = (f"expected None, one of {STORAGE_DTYPES}, or a dict of block-name glob patterns to one of "
                    'them, e.g. {"encoder.block.*": "int8"}')
        if s is None or (isinstance(s, str) and s in STORAGE_DTYPES):
            return
        if isinstance(s, dict) and s:
            for pattern, dtype in s.items():
                if not isinstance(pattern, str) or not pattern:
                    raise ValueError(f"storage_dtype: pattern {pattern!r} is not a non-empty string; {accepted}")
                if not isinstance(dtype, str) or dtype not in STORAGE_DTYPES:
                    raise ValueError(f"storage_dtype[{pattern!r}] = {dtype!r} is not a storage dtype; {accepted}")
            object.__setattr__(self, "storage_dtype", dict(s))  # a private copy: the caller's later edits do nothing
            return
        raise ValueError(f"storage_dtype {s!r} is not accepted; {accepted}")

    def _check_packed(self) -> None:
        if not isinstance(self.packed_compute, bool):
            raise ValueError(f"packed_compute must be True or False; got {self.packed_compute!r}")  # noqa: TRY004
        if self.packed_dtype is not None and self.packed_dtype not in PACKED_DTYPES:
            raise ValueError(f"packed_dtype: expected None (each layer's own dtype) or one of {PACKED_DTYPES}; "
                             f"found {self.packed_dtype!r}")
        if not self.packed_compute:
            if self.packed_dtype is not None:
                raise ValueError(f"packed_dtype={self.packed_dtype!r} without packed_compute: expected "
                                 "packed_compute=True with it; fix: set packed_compute=True or drop packed_dtype")
            return
        s = self.storage_dtype
        asked = set(s.values()) if isinstance(s, dict) else {s}
        if not any(d == "int8" or (d or "").startswith("int4") for d in asked):
            raise ValueError(f"packed_compute=True computes with int4/int8-stored weights: expected storage_dtype "
                             f"'int8', 'int4' or 'int4-g<G>' (or a dict giving one to some blocks), found {s!r}; fix: "
                             "set storage_dtype='int4' (or 'int8'), or packed_compute=False")
        if self.device != "cpu":
            raise ValueError(f"packed_compute=True runs PyTorch's CPU weight-only kernels: expected device 'cpu', "
                             f"found {self.device!r}; fix: device='cpu' or packed_compute=False")

    def reserve_for(self, budget: int) -> int:
        """Bytes of ``budget`` that retention leaves free (``reserve_bytes``, or its default)."""
        if self.reserve_bytes is not None:
            return self.reserve_bytes
        return min(DEFAULT_RESERVE_CAP, int(budget * DEFAULT_RESERVE_FRACTION))

    def storage_for(self, block_name: str) -> str | None:
        """The storage dtype asked for block ``block_name`` (None = as it is)."""
        s = self.storage_dtype
        if s is None or isinstance(s, str):
            return s
        return next((dtype for pattern, dtype in s.items() if fnmatchcase(block_name, pattern)), None)

    def resolved_profile(self) -> "DeviceProfile | None":
        """The ``DeviceProfile`` named by ``device_profile`` (None if unset)."""
        from .device import DeviceProfile, get_profile

        if self.device_profile is None or isinstance(self.device_profile, DeviceProfile):
            return self.device_profile
        return get_profile(self.device_profile)
