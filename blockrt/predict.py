"""Predicting a run before it happens: the paper's three configurations (sequential, concurrent, concurrent +
retention) at a budget, from block timings, on the schedule simulator of ``schedule.py``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from .budget import Floor, format_bytes
from .schedule import (BlockTiming, RetentionDecision, SimResult, check_timings, choose_retained,
                       concurrent_closed_form, same_time, sequential_closed_form, simulate, steady_pass_s)

__all__ = ["BlockTiming", "Prediction", "RetentionDecision", "SimResult", "budget_floor", "choose_retained",
           "concurrent_closed_form", "minimum_budget", "predict", "sequential_closed_form", "simulate", "sweep"]


@dataclass(frozen=True)
class Prediction:
    """Steady per-pass wall time of the paper's three configurations at one budget."""

    budget: int
    min_budget: int  # pinned + slots x the largest block + staging + working set (budget.Floor)
    prefetch_depth: int
    sequential_s: float  # prefetch 0, nothing retained (Eq. 10)
    concurrent_s: float  # prefetch_depth, nothing retained (Eq. 11)
    retention_s: float  # prefetch_depth, retention.retained kept resident
    retention: RetentionDecision
    load_s: float  # per pass with nothing retained
    compute_s: float  # per pass, block compute

    def __str__(self) -> str:
        kept = f"  ({len(self.retention.retained)} blocks, {format_bytes(self.retention.nbytes)} retained)"
        rows = [("sequential", self.sequential_s, ""), ("concurrent", self.concurrent_s, ""),
                ("concurrent + retention", self.retention_s, kept)]
        return "\n".join([f"budget {format_bytes(self.budget)} (smallest feasible {format_bytes(self.min_budget)}), "
                          f"prefetch {self.prefetch_depth}: load {self.load_s:.3f} s, compute {self.compute_s:.3f} s"] +
                         [f"  {name:<24} {s:9.3f} s/pass {self.sequential_s / s if s > 0 else math.nan:6.2f}x{extra}"
                          for name, s, extra in rows])


def budget_floor(timings: Sequence[BlockTiming], *, pinned_bytes: int, working_set_bytes: int,
                 prefetch_depth: int = 1, staging_bytes: int = 0) -> Floor:
    """The runtime's smallest budget (``blockrt.budget.Floor``) for these blocks: pinned + ``min(d + 1, n)``
    slots of the largest block + the loader's staging + the working set."""
    check_timings(timings, prefetch_depth)
    big = max(timings, key=lambda b: b.nbytes)
    return Floor(pinned_bytes, big.nbytes, min(prefetch_depth + 1, len(timings)), staging_bytes, working_set_bytes,
                 big.name, prefetch_depth)


def minimum_budget(timings: Sequence[BlockTiming], *, pinned_bytes: int, working_set_bytes: int,
                   prefetch_depth: int = 1, staging_bytes: int = 0) -> int:
    """The smallest feasible budget in bytes: ``budget_floor(...).nbytes``, the formula the runtime uses."""
    return budget_floor(timings, pinned_bytes=pinned_bytes, working_set_bytes=working_set_bytes,
                        prefetch_depth=prefetch_depth, staging_bytes=staging_bytes).nbytes


def predict(timings: Sequence[BlockTiming], *, budget: int, pinned_bytes: int, working_set_bytes: int,
            prefetch_depth: int = 1, head_s: float = 0.0, reserve_bytes: int = 0, staging_bytes: int = 0) -> Prediction:
    """Predict sequential, concurrent and concurrent + retention pass times under ``budget`` bytes, of which
    ``reserve_bytes`` stay out of retention (``RunConfig.reserve_bytes``).

    Raises:
        BudgetError: when the budget cannot hold pinned + the slots + the staging + the working set (names the
            smallest, as ``blockrt.run`` does).

    Example:
        >>> print(predict(timings, budget=3_300_000_000, pinned_bytes=200_000_000, working_set_bytes=300_000_000))
    """
    floor = budget_floor(timings, pinned_bytes=pinned_bytes, working_set_bytes=working_set_bytes,
                         prefetch_depth=prefetch_depth, staging_bytes=staging_bytes)
    floor.check(budget)
    need = floor.nbytes
    free = max(0, budget - need - reserve_bytes)
    decision = choose_retained(timings, prefetch_depth=prefetch_depth, free_bytes=free, head_s=head_s)
    return Prediction(budget, need, prefetch_depth, sequential_closed_form(timings, head_s=head_s),
                      steady_pass_s(timings, prefetch_depth, (), head_s), decision.steady_s, decision,
                      sum(b.load_s for b in timings), sum(b.compute_s for b in timings))


def sweep(timings: Sequence[BlockTiming], *, budgets: Sequence[int], pinned_bytes: int, working_set_bytes: int,
          prefetch_depth: int = 1, head_s: float = 0.0, staging_bytes: int = 0) -> list[Prediction]:
    """``predict`` at each feasible budget, in increasing order (infeasible budgets are left out).

    The greedy is not monotone in the budget (a large block that fits only later can crowd out a better pair
    of small ones), so each budget also extends the previous budget's set and keeps the faster of the two.
    """
    out: list[Prediction] = []
    need = minimum_budget(timings, pinned_bytes=pinned_bytes, working_set_bytes=working_set_bytes,
                          prefetch_depth=prefetch_depth, staging_bytes=staging_bytes)
    for budget in sorted(b for b in budgets if b >= need):
        p = predict(timings, budget=budget, pinned_bytes=pinned_bytes, working_set_bytes=working_set_bytes,
                    prefetch_depth=prefetch_depth, head_s=head_s, staging_bytes=staging_bytes)
        if out and out[-1].retention_s < p.retention_s and not same_time(out[-1].retention_s, p.retention_s):
            prev = out[-1].retention
            grown = choose_retained(timings, prefetch_depth=prefetch_depth, free_bytes=budget - need,
                                    head_s=head_s, start=prev.retained)
            grown = replace(grown, baseline_s=prev.baseline_s, reasons={**grown.reasons, **prev.reasons})
            p = replace(p, retention_s=grown.steady_s, retention=grown)
        out.append(p)
    return out
