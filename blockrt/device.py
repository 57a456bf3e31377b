"""Device profiles: the memory, read bandwidth and compute rate of a machine that blockrt simulates (design §5).

:data:`PROFILES` holds the built-in ones (names are case-insensitive); each description says what its numbers
stand for and where they come from. Peak figures (FLOP/s, interface bandwidths) are the vendors'; a real run
reaches a fraction of them. They set the simulated load/compute balance, not a promise of speed.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

from .budget import ACCEPTED, parse_budget

__all__ = ["IPHONE15PRO", "PROFILES", "DeviceProfile", "get_profile", "register_profile", "resolve_budget"]


@dataclass(frozen=True)
class DeviceProfile:
    """A device to simulate: its memory budget, read bandwidth and compute rate.

    Args:
        name: the registry key, e.g. ``"iphone15pro"`` (matched case-insensitively).
        memory_bytes: the memory a run may use on that device, in bytes: the default budget.
        read_bytes_per_s: the bandwidth weights arrive at (flash or disk read, or host-to-device copy).
        flops_per_s: the compute rate (FLOP/s) of the device's compute unit at the dtype named in the
            description.
        description: what each number stands for and its source.

    Example:
        >>> pi5 = DeviceProfile("pi5", memory_bytes=8 * 2**30, read_bytes_per_s=0.09e9, flops_per_s=30e9)
        >>> round(pi5.load_s(900_000_000), 1)
        10.0
    """

    name: str
    memory_bytes: int
    read_bytes_per_s: float
    flops_per_s: float
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip() or self.name != self.name.strip():
            raise ValueError(f"DeviceProfile name must be a non-empty string without surrounding spaces; "
                             f"got {self.name!r}")
        try:
            nbytes = parse_budget(self.name)
        except ValueError:
            nbytes = None
        if nbytes is not None:
            raise ValueError(f"DeviceProfile name {self.name!r} reads as a budget ({nbytes} "
                             f"bytes); choose a name that is not a number of bytes")
        if isinstance(self.memory_bytes, bool) or not isinstance(self.memory_bytes, int) or self.memory_bytes <= 0:
            raise ValueError(f"DeviceProfile {self.name!r}: memory_bytes must be a positive int of bytes "
                             f"(blockrt.parse_budget('3.3GB') gives one); got {self.memory_bytes!r}")
        for field in ("read_bytes_per_s", "flops_per_s"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                raise ValueError(f"DeviceProfile {self.name!r}: {field} must be a positive finite number; "
                                 f"got {v!r}")
        if not isinstance(self.description, str):
            raise ValueError(f"DeviceProfile {self.name!r}: description must be a string; "
                             f"got {type(self.description).__name__}")

    def load_s(self, nbytes: int) -> float:
        """Seconds to read ``nbytes`` at this device's read bandwidth."""
        return nbytes / self.read_bytes_per_s

    def compute_s(self, flops: float) -> float:
        """Seconds to run ``flops`` floating-point operations at this device's (peak) rate."""
        return flops / self.flops_per_s


_GB = 10**9
IPHONE15PRO = DeviceProfile(
    "iphone15pro", memory_bytes=3_300_000_000, read_bytes_per_s=1.45e9, flops_per_s=2.15e12,
    description=(
        "iPhone 15 Pro (A17 Pro, 8 GB RAM). memory: the 3.3 GB one app may use, as measured in the "
        "On-device Sora paper (no increased-memory-limit entitlement). read: 1.45 GB/s, the published "
        "sequential flash read figure for that phone class. compute: 2.15 TFLOP/s fp32, the A17 Pro "
        "GPU's peak (the paper runs its CoreML blocks in fp32 on CPU+GPU)."),
)
"""The phone the On-device Sora paper targets: import its numbers from here (``IPHONE15PRO.read_bytes_per_s``)."""
_BUILTIN = (
    IPHONE15PRO,
    DeviceProfile(
        "laptop-nvme", memory_bytes=16 * _GB, read_bytes_per_s=3.0e9, flops_per_s=1.0e12,
        description=(
            "A laptop with a PCIe 3.0 x4 NVMe SSD. memory: 16 GB RAM. read: 3 GB/s, a typical sustained "
            "sequential read of such drives (rated 3.0-3.5 GB/s). compute: 1 TFLOP/s fp32, the order of an "
            "8-core AVX2 laptop CPU's peak."),
    ),
    DeviceProfile(
        "desktop-sata-ssd", memory_bytes=32 * _GB, read_bytes_per_s=0.55e9, flops_per_s=1.5e12,
        description=(
            "A desktop with a SATA SSD. memory: 32 GB RAM. read: 0.55 GB/s, the SATA III (6 Gbit/s) ceiling that "
            "such drives are rated at (530-560 MB/s). compute: 1.5 TFLOP/s fp32, the order of a 12-16 core "
            "AVX2 desktop CPU's peak."),
    ),
    DeviceProfile(
        "hdd", memory_bytes=16 * _GB, read_bytes_per_s=0.15e9, flops_per_s=1.0e12,
        description=(
            "A machine reading weights from a 7200 rpm hard disk. memory: 16 GB RAM. read: 0.15 GB/s, a typical "
            "sequential read (150-250 MB/s on outer tracks, less inside; far less when seeking). compute: "
            "1 TFLOP/s fp32, the order of a desktop CPU's peak."),
    ),
    DeviceProfile(
        "rtx4090", memory_bytes=24 * 2**30, read_bytes_per_s=25e9, flops_per_s=82.6e12,
        description=(
            "NVIDIA GeForce RTX 4090. memory: 24 GiB GDDR6X VRAM. read: 25 GB/s, a pinned host-to-device "
            "copy over PCIe 4.0 x16 (31.5 GB/s theoretical), i.e. weights already in host RAM or page cache; "
            "from disk the drive's bandwidth is the limit. compute: 82.6 TFLOP/s, NVIDIA's fp32 (non-tensor) "
            "peak."),
    ),
    DeviceProfile(
        "h100", memory_bytes=80 * _GB, read_bytes_per_s=50e9, flops_per_s=67e12,
        description=(
            "NVIDIA H100 SXM5. memory: 80 GB HBM3 (nvidia-smi shows 81,559 MiB; 80e9 bytes leaves the driver's "
            "share). read: 50 GB/s, a pinned host-to-device copy over PCIe "
            "5.0 x16 (63 GB/s theoretical), i.e. weights already in host RAM; from disk the drive's bandwidth "
            "is the limit. compute: 67 TFLOP/s, NVIDIA's fp32 (non-tensor) peak for the SXM5 part (the PCIe "
            "card: 51)."),
    ),
)

PROFILES: dict[str, DeviceProfile] = {p.name.lower(): p for p in _BUILTIN}
"""The known profiles by lower-case name. Add to it with :func:`register_profile`."""

_LOCK = threading.Lock()


def _known() -> str:
    return ", ".join(sorted(PROFILES))


def register_profile(profile: DeviceProfile, *, overwrite: bool = False) -> DeviceProfile:
    """Add ``profile`` to :data:`PROFILES` under its lower-cased name and return it.

    Raises:
        ValueError: if the name is taken (unless ``overwrite=True``) or ``profile`` is not a DeviceProfile.
    """
    if not isinstance(profile, DeviceProfile):
        raise ValueError(f"register_profile expects a DeviceProfile; got {type(profile).__name__}")
    key = profile.name.lower()
    with _LOCK:
        if key in PROFILES and not overwrite and PROFILES[key] != profile:
            raise ValueError(f"a device profile named {profile.name!r} exists already ({PROFILES[key]!r}); "
                             f"pass overwrite=True to replace it")
        PROFILES[key] = profile
    return profile


def get_profile(name: str) -> DeviceProfile:
    """The registered profile called ``name`` (case-insensitive, surrounding spaces ignored).

    Raises:
        ValueError: for an unknown name, listing the known ones.

    Example:
        >>> get_profile("iPhone15Pro").memory_bytes
        3300000000
    """
    if not isinstance(name, str):
        raise ValueError(f"device profile name must be a string; got {type(name).__name__}; "
                         f"known profiles: {_known()}")
    try:
        return PROFILES[name.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown device profile {name!r}; known profiles: {_known()}") from None


def resolve_budget(budget: int | str | DeviceProfile) -> tuple[int, DeviceProfile | None]:
    """Turn a ``budget=`` argument into ``(bytes, profile or None)``: a :class:`DeviceProfile` or a registered
    name gives its ``memory_bytes`` and itself; anything else goes through :func:`blockrt.budget.parse_budget`.

    Raises:
        ValueError: naming both the accepted budget forms and the known profile names.

    Example:
        >>> resolve_budget("iphone15pro")[0], resolve_budget("3.3GB")
        (3300000000, (3300000000, None))
    """
    if isinstance(budget, DeviceProfile):
        return budget.memory_bytes, budget
    if isinstance(budget, str) and budget.strip().lower() in PROFILES:
        profile = get_profile(budget)
        return profile.memory_bytes, profile
    try:
        return parse_budget(budget), None
    except ValueError:
        shown = f"{budget!r}" if isinstance(budget, (int, str)) and not isinstance(budget, bool) \
            else f"{budget!r} of type {type(budget).__name__}"
        raise ValueError(f"budget must be {ACCEPTED}; or a device profile name ({_known()}) or a "
                         f"blockrt.DeviceProfile; got {shown}") from None
