"""``RunConfig``: the rare knobs of a run, validated in one place (never environment variables)."""

from __future__ import annotations

import math
from dataclasses import dataclass

VERIFY_MODES = ("first", "always", "never")


@dataclass(frozen=True)
class RunConfig:
    """Options of ``blockrt.run``; every field is checked in ``__post_init__``.

    Args:
        prefetch_depth: blocks loaded ahead of the one computing. 1 = double buffering (two slots);
            0 = load on demand, the paper's sequential baseline.
        device: where compute runs: ``"cpu"`` or ``"cuda"``/``"cuda:N"``.
        target_block_bytes: pack consecutive layers into blocks up to this many bytes (None = one layer each).
        read_bytes_per_s: throttle the loader to this read bandwidth (simulates slow flash); None = as fast as the disk.
        verify: check each block's crc32 on its ``"first"`` load (default), on ``"always"``, or ``"never"``.
        strict_keys: with ``weights=``, a checkpoint key the model does not have is an error.
        load_timeout_s: the longest compute waits for one block before declaring the loader stuck.

    Example:
        >>> RunConfig(prefetch_depth=2, read_bytes_per_s=1.45e9)
    """

    prefetch_depth: int = 1
    device: str = "cpu"
    target_block_bytes: int | None = None
    read_bytes_per_s: float | None = None
    verify: str = "first"
    strict_keys: bool = True
    load_timeout_s: float = 600.0

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
        if not (self.load_timeout_s > 0):
            raise ValueError(f"load_timeout_s must be positive; got {self.load_timeout_s!r}")
