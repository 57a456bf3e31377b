"""Tests of blockrt.predict: the simulator against the closed forms, the retention greedy, predict and sweep.
Fast: pure Python arithmetic, no model, no disk."""

from __future__ import annotations

import itertools
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockrt.errors import BudgetError
from blockrt.predict import (BlockTiming, choose_retained, concurrent_closed_form, minimum_budget, predict,
                             sequential_closed_form, simulate, sweep)

REL = 1e-9  # float sums in different orders
LOAD_BOUND_CUT = 0.6  # retaining half of 3x-load-bound blocks must bring a pass under this fraction
MAX_GREEDY_S = 1.0  # choose_retained on 64 blocks, prefetch 2, everything fitting
SETTINGS = settings(max_examples=60, deadline=None)

times = st.floats(0.0, 5.0, allow_nan=False, allow_infinity=False)


@st.composite
def timing_lists(draw, min_n: int = 1, max_n: int = 8, gaps: bool = True) -> list[BlockTiming]:
    n = draw(st.integers(min_n, max_n))
    return [BlockTiming(f"b{i}", draw(st.integers(1, 100)), draw(times), draw(times), draw(times) if gaps else 0.0)
            for i in range(n)]


def homogeneous(n: int, load: float, compute: float, nbytes: int = 10) -> list[BlockTiming]:
    return [BlockTiming(f"b{i}", nbytes, load, compute) for i in range(n)]


def close(a: float, b: float) -> bool:
    return a == pytest.approx(b, rel=REL, abs=1e-12)


# -- the simulator --------------------------------------------------------------------------------------------


@SETTINGS
@given(timing_lists(), times, st.integers(1, 4))
def test_on_demand_loading_is_the_sequential_closed_form(timings, head, passes):
    r = simulate(timings, prefetch_depth=0, passes=passes, head_s=head)
    assert all(close(w, sequential_closed_form(timings, head_s=head)) for w in r.wall_s)


@SETTINGS
@given(timing_lists(), times, st.data())
def test_double_buffering_is_the_concurrent_closed_form(timings, head, data):
    retained = data.draw(st.sets(st.integers(0, len(timings) - 1)))
    r = simulate(timings, prefetch_depth=1, retained=retained, passes=4, head_s=head)
    want = concurrent_closed_form(timings, retained=retained, head_s=head)
    assert all(close(w, want) for w in r.wall_s[1:]), (r.wall_s, want)


@SETTINGS
@given(timing_lists(), times, st.integers(0, 5), st.data())
def test_passes_are_steady_from_the_second_and_within_the_bounds(timings, head, depth, data):
    retained = data.draw(st.sets(st.integers(0, len(timings) - 1)))
    r = simulate(timings, prefetch_depth=depth, retained=retained, passes=6, head_s=head)
    assert all(close(w, r.wall_s[1]) for w in r.wall_s[1:])
    compute_bound = head + sum(b.compute_s + b.gap_s for b in timings)
    assert r.steady_s >= max(compute_bound, r.load_s) * (1 - REL)
    assert close(r.steady_s, compute_bound + r.stall_s[-1])


def test_sequential_is_the_sum_of_everything():
    timings = [BlockTiming("a", 1, 0.1, 0.2, 0.01), BlockTiming("b", 1, 0.3, 0.05, 0.02)]
    r = simulate(timings, prefetch_depth=0, passes=2, head_s=0.5)
    assert r.wall_s == pytest.approx((1.18, 1.18))
    assert r.stall_s == pytest.approx((0.4, 0.4))


def test_balanced_double_buffering_reaches_the_roofline():
    r = simulate(homogeneous(8, load=0.1, compute=0.1), prefetch_depth=1, passes=3)
    assert r.wall_s[0] == pytest.approx(0.9)  # block 0's first load is not hidden
    assert r.roofline_ratio == pytest.approx(1.0)
    assert r.stall_s[-1] == pytest.approx(0.0, abs=1e-12)


def test_everything_retained_runs_at_compute_speed():
    timings = [BlockTiming(f"b{i}", 10 + i, 0.5, 0.1 * i, 0.01) for i in range(6)]
    compute = 0.2 + sum(b.compute_s + b.gap_s for b in timings)
    for depth in (0, 1, 3):
        r = simulate(timings, prefetch_depth=depth, retained=range(6), head_s=0.2)
        assert r.wall_s == pytest.approx((compute,) * 3) and r.bytes_loaded == 0 and r.load_s == 0
        d = choose_retained(timings, prefetch_depth=depth, free_bytes=sum(b.nbytes for b in timings), head_s=0.2)
        assert d.retained == tuple(range(6)) and d.steady_s == pytest.approx(compute)


def test_arguments_are_validated():
    with pytest.raises(ValueError, match="load_s"):
        BlockTiming("x", 1, -1.0, 1.0)
    with pytest.raises(ValueError, match="prefetch_depth"):
        simulate(homogeneous(2, 1, 1), prefetch_depth=-1)
    with pytest.raises(ValueError, match=r"\[5\]"):
        simulate(homogeneous(2, 1, 1), prefetch_depth=1, retained=[5])
    with pytest.raises(ValueError, match="empty"):
        simulate([], prefetch_depth=1)


# -- retention ------------------------------------------------------------------------------------------------


def test_retaining_half_of_a_load_bound_model_cuts_the_pass():
    timings = homogeneous(8, load=0.3, compute=0.1)
    none = simulate(timings, prefetch_depth=1).steady_s
    d = choose_retained(timings, prefetch_depth=1, free_bytes=40)
    assert len(d.retained) == 4 and d.nbytes == 40
    assert d.steady_s <= LOAD_BOUND_CUT * none
    assert close(d.steady_s, simulate(timings, prefetch_depth=1, retained=d.retained).steady_s)
    assert "ms/pass" in str(d) and all(i in d.reasons for i in d.retained)


@pytest.mark.parametrize("n", [8, 12])
def test_retained_blocks_are_spread_out(n):
    # load = 2 x compute: half retained hides every load, but only if no two retained blocks are neighbours
    timings = homogeneous(n, load=0.2, compute=0.1)
    d = choose_retained(timings, prefetch_depth=1, free_bytes=10 * n // 2)
    assert len(d.retained) == n // 2
    assert not any((i + 1) % n in d.retained for i in d.retained), d.retained
    assert d.steady_s == pytest.approx(0.1 * n)
    prefix = simulate(timings, prefetch_depth=1, retained=range(n // 2)).steady_s  # the paper's choice
    assert d.steady_s < prefix


def test_hard_to_hide_blocks_are_retained_first():
    timings = homogeneous(6, load=0.1, compute=0.1)
    timings[3] = BlockTiming("slow", 10, 0.5, 0.1)
    d = choose_retained(timings, prefetch_depth=1, free_bytes=10)
    assert d.retained == (3,)


@SETTINGS
@given(timing_lists(max_n=7), times, st.integers(0, 3), st.integers(0, 800))
def test_retention_never_makes_a_pass_slower(timings, head, depth, free):
    d = choose_retained(timings, prefetch_depth=depth, free_bytes=free, head_s=head)
    assert d.steady_s <= d.baseline_s * (1 + REL) + 1e-12
    assert close(d.baseline_s, simulate(timings, prefetch_depth=depth, head_s=head).steady_s)
    assert close(d.steady_s, simulate(timings, prefetch_depth=depth, retained=d.retained, head_s=head).steady_s)


@SETTINGS
@given(timing_lists(max_n=9), st.integers(0, 3), st.integers(0, 600))
def test_retention_fills_free_bytes_within_one_block(timings, depth, free):
    d = choose_retained(timings, prefetch_depth=depth, free_bytes=free)
    sizes = [b.nbytes for b in timings]
    assert d.nbytes == sum(sizes[i] for i in d.retained) <= free
    assert all(sizes[i] > free - d.nbytes for i in range(len(timings)) if i not in d.retained)  # nothing else fits
    best = max(s for k in range(len(sizes) + 1) for c in itertools.combinations(sizes, k) if (s := sum(c)) <= free)
    assert best - d.nbytes < max(sizes)


def test_greedy_is_fast_on_64_blocks():
    timings = [BlockTiming(f"b{i}", 100, 0.3 * (1 + i % 5), 0.1 * (1 + i % 3), 0.01) for i in range(64)]
    t0 = time.perf_counter()
    d = choose_retained(timings, prefetch_depth=2, free_bytes=64 * 100, head_s=0.1)
    assert time.perf_counter() - t0 < MAX_GREEDY_S and len(d.retained) == 64


# -- predict and sweep ----------------------------------------------------------------------------------------


def test_predict_orders_the_three_configurations():
    timings = homogeneous(10, load=0.2, compute=0.1)
    p = predict(timings, budget=1000 + 2 * 10 + 50 + 40, pinned_bytes=1000, working_set_bytes=50)
    assert p.min_budget == 1070 and p.retention.free_bytes == 40 and len(p.retention.retained) == 4
    assert p.sequential_s == pytest.approx(3.0)
    assert p.concurrent_s == pytest.approx(2.0)  # every load takes 0.2 s, one after another
    assert p.retention_s == pytest.approx(1.2)
    assert "concurrent + retention" in str(p)


def test_predict_names_the_smallest_feasible_budget():
    timings = [BlockTiming("a", 300, 0.1, 0.1), BlockTiming("b", 500, 0.1, 0.1)]
    need = minimum_budget(timings, pinned_bytes=100, working_set_bytes=50, prefetch_depth=1)
    assert need == 100 + 2 * 500 + 50
    with pytest.raises(BudgetError, match=f"smallest feasible .*\\({need} bytes\\)"):
        predict(timings, budget=need - 1, pinned_bytes=100, working_set_bytes=50)
    assert predict(timings, budget=need, pinned_bytes=100, working_set_bytes=50).retention.retained == ()
    assert [p.budget for p in sweep(timings, budgets=[need + 300, 10, need], pinned_bytes=100,
                                    working_set_bytes=50)] == [need, need + 300]


def test_sweep_repairs_the_greedy_when_a_big_block_crowds_out_two_small():
    # on demand loading: retaining a block saves exactly its load; X alone saves 5, a + b together 7.5
    timings = [BlockTiming("X", 10, 5.0, 1.0), BlockTiming("a", 6, 4.5, 1.0), BlockTiming("b", 3, 3.0, 1.0)]
    kw = dict(prefetch_depth=0, pinned_bytes=0, working_set_bytes=0)
    assert choose_retained(timings, prefetch_depth=0, free_bytes=9).retained == (1, 2)
    assert choose_retained(timings, prefetch_depth=0, free_bytes=10).retained == (0,)  # greedy's limit
    at9, at10 = sweep(timings, budgets=[10 + 9, 10 + 10], **kw)
    assert at10.retention.retained == (1, 2) and at10.retention_s == at9.retention_s


@SETTINGS
@given(timing_lists(max_n=7), st.integers(0, 3), st.lists(st.integers(0, 900), min_size=1, max_size=8))
def test_sweep_never_gets_slower_with_more_budget(timings, depth, budgets):
    preds = sweep(timings, budgets=budgets, pinned_bytes=5, working_set_bytes=7, prefetch_depth=depth)
    assert all(p.budget >= p.min_budget for p in preds)
    for a, b in zip(preds, preds[1:]):
        assert b.retention_s <= a.retention_s * (1 + REL) + 1e-12
    for p in preds:
        assert p.retention_s <= p.concurrent_s * (1 + REL) + 1e-12
