"""Tests of blockrt.device: the profile registry, validation, and budget resolution. Fast: no I/O."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import pytest

from blockrt import device
from blockrt.device import DeviceProfile, get_profile, register_profile, resolve_budget

IPHONE_APP_BUDGET = 3_300_000_000  # bytes, On-device Sora's measured limit
IPHONE_READ = 1.45e9  # B/s
IPHONE_FLOPS = 2.15e12  # FLOP/s fp32
DESKTOPS = ("laptop-nvme", "desktop-sata-ssd", "hdd", "rtx4090", "h100")


@pytest.fixture
def registry() -> Iterator[dict[str, DeviceProfile]]:
    """The registry, restored after the test."""
    saved = dict(device.PROFILES)
    yield device.PROFILES
    device.PROFILES.clear()
    device.PROFILES.update(saved)


def custom(name: str = "pi5", **kw: object) -> DeviceProfile:
    args: dict = dict(memory_bytes=8 * 2**30, read_bytes_per_s=0.09e9, flops_per_s=30e9, description="test")
    args.update(kw)
    return DeviceProfile(name, **args)


def test_iphone15pro_has_the_papers_numbers() -> None:
    p = get_profile("iphone15pro")
    assert (p.memory_bytes, p.read_bytes_per_s, p.flops_per_s) == (IPHONE_APP_BUDGET, IPHONE_READ, IPHONE_FLOPS)
    assert "On-device Sora" in p.description and "sequential" in p.description
    assert p.load_s(1_450_000_000) == 1.0 and p.compute_s(2.15e12) == 1.0


@pytest.mark.parametrize("name", ("iphone15pro", *DESKTOPS))
def test_builtin_profiles_are_registered_and_described(name: str) -> None:
    p = device.PROFILES[name]
    assert p.name == name and get_profile(name) is p
    for what in ("memory", "read", "compute"):  # the description says what each number stands for
        assert what in p.description.lower(), (name, what)
    assert p.read_bytes_per_s < 100e9 and p.flops_per_s < 1e15 and p.memory_bytes >= 3e9


def test_relative_bandwidths_are_plausible() -> None:
    bw = {n: get_profile(n).read_bytes_per_s for n in ("hdd", "desktop-sata-ssd", "iphone15pro", "laptop-nvme",
                                                      "rtx4090", "h100")}
    assert list(bw.values()) == sorted(bw.values()), bw
    assert get_profile("rtx4090").memory_bytes == 24 * 2**30 and get_profile("rtx4090").flops_per_s == 82.6e12


@pytest.mark.parametrize("spelling", ("iphone15pro", "iPhone15Pro", "IPHONE15PRO", "  iphone15pro "))
def test_names_are_case_insensitive(spelling: str) -> None:
    assert get_profile(spelling) is device.PROFILES["iphone15pro"]
    assert resolve_budget(spelling) == (IPHONE_APP_BUDGET, device.PROFILES["iphone15pro"])


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown device profile 'iphone99'") as info:
        get_profile("iphone99")
    for name in ("iphone15pro", *DESKTOPS):
        assert name in str(info.value)
    with pytest.raises(ValueError, match="known profiles"):
        get_profile(None)  # type: ignore[arg-type]


def test_resolve_budget_forms() -> None:
    iphone = get_profile("iphone15pro")
    assert resolve_budget("iphone15pro") == (IPHONE_APP_BUDGET, iphone)
    assert resolve_budget("3.3GB") == (IPHONE_APP_BUDGET, None)
    assert resolve_budget("3 GiB") == (3 * 2**30, None)
    assert resolve_budget(12345) == (12345, None)
    mine = custom(memory_bytes=7_000_000)
    assert resolve_budget(mine) == (7_000_000, mine)  # a profile need not be registered


@pytest.mark.parametrize("bad", ("iphone99", "3.3 gigs", "", "-1GB", 0, -5, 3.3e9, True, None, ["1GB"]))
def test_resolve_budget_errors_name_both_forms(bad: object) -> None:
    with pytest.raises(ValueError) as info:
        resolve_budget(bad)  # type: ignore[arg-type]
    msg = str(info.value)
    assert "GB" in msg and "GiB" in msg, msg  # the accepted budget strings
    assert "iphone15pro" in msg and "laptop-nvme" in msg, msg  # and the profile names
    assert repr(bad) in msg


def test_register_profile(registry: dict[str, DeviceProfile]) -> None:
    p = register_profile(custom("Pi5"))
    assert get_profile("pi5") is p and registry["pi5"] is p
    assert resolve_budget("PI5") == (8 * 2**30, p)
    assert register_profile(custom("Pi5")) == p  # the same profile again is fine
    with pytest.raises(ValueError, match="exists already.*overwrite=True"):
        register_profile(custom("pi5", memory_bytes=1))
    q = register_profile(custom("pi5", memory_bytes=1), overwrite=True)
    assert get_profile("Pi5") is q
    with pytest.raises(ValueError, match="DeviceProfile"):
        register_profile("pi5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pi5"):
        get_profile("pi6")


def test_register_profile_fixture_restores(registry: dict[str, DeviceProfile]) -> None:
    assert "pi5" not in registry


@pytest.mark.parametrize("field, value, match", [
    ("memory_bytes", 0, "memory_bytes must be a positive int"),
    ("memory_bytes", -1, "memory_bytes"),
    ("memory_bytes", 3.3e9, "parse_budget"),
    ("memory_bytes", "3.3GB", "parse_budget"),
    ("memory_bytes", True, "memory_bytes"),
    ("read_bytes_per_s", 0, "read_bytes_per_s must be a positive finite number"),
    ("read_bytes_per_s", math.nan, "read_bytes_per_s"),
    ("read_bytes_per_s", math.inf, "read_bytes_per_s"),
    ("read_bytes_per_s", "fast", "read_bytes_per_s"),
    ("flops_per_s", -1.0, "flops_per_s"),
    ("description", None, "description must be a string"),
])
def test_validation(field: str, value: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        custom(**{field: value})


@pytest.mark.parametrize("name, match", [("", "non-empty"), (" pi", "surrounding"), (None, "non-empty"),
                                         ("512MB", "reads as a budget")])
def test_name_validation(name: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        custom(name)  # type: ignore[arg-type]


def test_profiles_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_profile("iphone15pro").memory_bytes = 1  # type: ignore[misc]
