"""Budgets: ``blockrt.parse_budget`` (exact bytes, clear errors), ``format_bytes``, and ``run`` refusing a bad
budget before it touches the model."""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import blockrt
from blockrt import partitioners
from blockrt.budget import format_bytes
from models import build_toy

# The units the design accepts (case-insensitive), and their sizes in bytes.
UNITS = {
    "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
}

EXACT = [
    (1, 1),
    (3_300_000_000, 3_300_000_000),
    (2**70, 2**70),  # ints are bytes, however large
    ("3.3GB", 3_300_000_000),
    ("3GiB", 3 * 2**30),
    ("512MB", 512_000_000),
    ("700MiB", 700 * 2**20),
    ("1.5 gb", 1_500_000_000),
    ("2kib", 2048),
    ("3.3 GB", 3_300_000_000),
    ("3.3gB", 3_300_000_000),
    ("3 gib", 3 * 2**30),
    ("3GIB", 3 * 2**30),
    ("  4 TiB  ", 4 * 2**40),
    ("1TB", 10**12),
    ("1b", 1),
    (".5kB", 500),
    ("2.KB", 2000),
    ("1.5e3 MB", 1_500_000_000),
    ("9007199254740993B", 9007199254740993),  # 2**53 + 1: no float rounding
    ("12345678901234567GB", 12345678901234567 * 10**9),
]

INVALID = [
    0, -5, "0GB", "-1GB", "3.3 gigs", "nan", "NaNGB", "inf GB", "", "GB", "1e400GB", True, False, 3.5, 3.0, None,
    b"1GB", "0.4B", "1e-400GB", "3.3", "3", "1,5GB", "1.2.3GB", "GB3", "3 G B", "3GiBs", "-0.5 MB",
    "1e9999999999GB", "1" * 1000 + "B", [1], {"GB": 1}, 10**400,
]


@pytest.mark.parametrize("budget, nbytes", EXACT, ids=[repr(b) for b, _ in EXACT])
def test_exact_values(budget, nbytes):
    got = blockrt.parse_budget(budget)
    assert got == nbytes and type(got) is int


def _assert_lists_accepted_forms(message: str, budget: object) -> None:
    assert repr(budget)[:60] in message or type(budget).__name__ in message, message
    for unit in UNITS:
        assert unit in message, f"{unit!r} missing from {message!r}"
    assert "case-insensitive" in message and "'3.3GB'" in message


@pytest.mark.parametrize("budget", INVALID, ids=[repr(b)[:20] for b in INVALID])
def test_invalid_budgets_name_the_accepted_forms(budget):
    with pytest.raises(ValueError) as e:
        blockrt.parse_budget(budget)
    _assert_lists_accepted_forms(str(e.value), budget)


@st.composite
def random_case(draw, word: str) -> str:
    flips = draw(st.lists(st.booleans(), min_size=len(word), max_size=len(word)))
    return "".join(c.swapcase() if f else c for c, f in zip(word, flips))


@given(
    n=st.integers(min_value=1, max_value=10**30),
    unit=st.sampled_from(sorted(UNITS)).flatmap(lambda u: st.tuples(st.just(u), random_case(u))),
    sep=st.sampled_from(["", " ", "  ", "\t"]),
)
def test_int_and_unit_parse_exactly(n, unit, sep):
    name, spelled = unit
    assert blockrt.parse_budget(f"{n}{sep}{spelled}") == n * UNITS[name]


_NEAR_MISSES = st.from_regex(r"\s?[-+]?[0-9.]{0,8}([eE][-+]?[0-9]{1,5})?\s?[a-zA-Z]{0,4}\s?", fullmatch=True)


@given(st.one_of(st.text(), _NEAR_MISSES))
def test_any_text_parses_to_positive_int_or_raises_value_error(text):
    try:
        got = blockrt.parse_budget(text)
    except ValueError as e:
        _assert_lists_accepted_forms(str(e), text)
    else:
        assert type(got) is int and got > 0


@given(st.one_of(st.integers(), st.none(), st.booleans(), st.floats(), st.binary(), st.lists(st.integers())))
def test_non_strings(value):
    if type(value) is int and value > 0:
        assert blockrt.parse_budget(value) == value
    else:
        with pytest.raises(ValueError, match="positive int of bytes"):
            blockrt.parse_budget(value)


@given(cents=st.integers(min_value=100, max_value=99_999))
def test_format_bytes_round_trips_two_decimal_gigabytes(cents):
    text = f"{cents // 100}.{cents % 100:02d}"
    assert format_bytes(blockrt.parse_budget(text + "GB")) == text + " GB"


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (999, "999 B"), (1000, "1.00 kB"), (1_500_000, "1.50 MB"), (3.3e9, "3.30 GB"),
    (2**30, "1.07 GB"), (2**40, "1099.51 GB"), (-2e9, "-2.00 GB"),
])
def test_format_bytes(n, text):
    assert format_bytes(n) == text


def _invalid_text(text: str) -> bool:
    """Neither a budget nor a device profile name (``run`` accepts both, e.g. "hdd")."""
    from blockrt.device import resolve_budget

    try:
        resolve_budget(text)
    except ValueError:
        return True
    return False


@pytest.fixture(scope="module")
def toy():
    return build_toy()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(budget=st.one_of(st.sampled_from(INVALID), st.text(max_size=12).filter(_invalid_text)))
def test_run_refuses_an_invalid_budget_before_touching_the_model(toy, tmp_path, budget):
    model, _ = toy
    before = {k: (id(v), v.clone()) for k, v in model.state_dict(keep_vars=True).items()}
    threads = threading.active_count()

    def must_not_partition(*args, **kwargs):
        raise AssertionError("run() partitioned the model before validating the budget")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(partitioners, "partition", must_not_partition)
        with pytest.raises(ValueError) as e:
            blockrt.run(model, budget=budget, store=tmp_path / "store")
    _assert_lists_accepted_forms(str(e.value), budget)
    assert not (tmp_path / "store").exists()
    assert threading.active_count() == threads
    for m in model.modules():
        assert not m._forward_pre_hooks and not m._forward_hooks
    after = model.state_dict(keep_vars=True)
    for k, (ident, value) in before.items():
        assert id(after[k]) == ident and not after[k].is_meta and torch.equal(after[k], value), k
