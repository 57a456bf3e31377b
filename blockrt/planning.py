"""``blockrt plan``: predict a run before executing it, from a plan, per-block compute and a device profile.

Compute comes either from a measured run (``Runtime.timings``) or from FLOPs counted by
``torch.utils.flop_counter`` on a ``meta``-device pass (nothing is computed or loaded, so a 19 GB model
is planned in seconds). Loads come from block bytes over the profile's read bandwidth. The schedule model
and the paper's three configurations (sequential, concurrent, concurrent + retention) are in ``predict.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import FlopCounterMode

from .device import DeviceProfile
from .loader import BlockLayout
from .partitioners.plan import Plan
from .profile import Profile
from .predict import BlockTiming, Prediction, minimum_budget, predict, sweep


def block_flops(model: nn.Module, plan: Plan, args: tuple = (), kwargs: dict | None = None) -> tuple[list[float], float]:
    """FLOPs of one pass per block, and of everything else (the pinned modules).

    For a meta skeleton (``blockrt.meta_weights``) the pass runs on meta copies of the inputs: nothing is
    computed or loaded. A model with real weights runs once for real.
    """
    if all(p.is_meta for p in model.parameters()):
        args, kwargs = tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, (args, kwargs or {}))
    counter = FlopCounterMode(display=False, depth=None)
    with torch.no_grad(), counter:
        model(*args, **(kwargs or {}))
    counts = counter.get_flop_counts()
    root = type(model).__name__
    total = float(sum(counts.get("Global", {}).values()))
    per_block = []
    for block in plan.blocks:
        per_block.append(float(sum(sum(counts.get(f"{root}.{path}", {}).values()) for path in block.modules)))
    return per_block, max(total - sum(per_block), 0.0)


def flop_timings(plan: Plan, flops: Sequence[float], pinned_flops: float, profile: DeviceProfile,
                 read_bytes_per_s: float | None = None) -> tuple[list[BlockTiming], float]:
    """Per-block timings on ``profile``: compute = FLOPs / its FLOP/s, load = bytes / its read bandwidth.

    The pinned modules' compute is charged to ``head_s`` (one number per pass).
    """
    bps = read_bytes_per_s or profile.read_bytes_per_s
    timings = [BlockTiming(b.name, BlockLayout.of(b).nbytes, BlockLayout.of(b).nbytes / bps, f / profile.flops_per_s)
               for b, f in zip(plan.blocks, flops)]
    return timings, pinned_flops / profile.flops_per_s


def plan_sweep(timings: Sequence[BlockTiming], *, pinned_bytes: int, working_set_bytes: int, prefetch_depth: int,
               head_s: float, budgets: Sequence[int] | None = None, points: int = 8) -> list[Prediction]:
    """Predictions over ``budgets`` (default: ``points`` budgets from the smallest feasible to everything fits)."""
    low = minimum_budget(timings, pinned_bytes=pinned_bytes, working_set_bytes=working_set_bytes,
                         prefetch_depth=prefetch_depth)
    if budgets is None:
        high = low + sum(b.nbytes for b in timings)
        budgets = [int(low + (high - low) * k / (points - 1)) for k in range(points)]
    return sweep(timings, budgets=budgets, pinned_bytes=pinned_bytes, working_set_bytes=working_set_bytes,
                 prefetch_depth=prefetch_depth, head_s=head_s)


def runtime_prediction(rt: Any, budget: int | None = None, profile: DeviceProfile | None = None,
                       pass_idx: int | None = None) -> Prediction:
    """Predict ``rt``'s steady pass from timings measured in ``pass_idx`` (loads rescaled to ``profile``)."""
    timings, head = rt.timings(pass_idx)
    if profile is not None:
        timings = [replace(t, load_s=t.nbytes / profile.read_bytes_per_s) for t in timings]
    return predict(timings, budget=budget or rt.budget, pinned_bytes=rt.plan.pinned_bytes,
                   working_set_bytes=rt.working_set_bytes, prefetch_depth=rt.config.prefetch_depth, head_s=head,
                   reserve_bytes=rt.config.reserve_for(budget or rt.budget))


def measured_timings(profile: Profile, plan: Plan, layouts: Sequence[BlockLayout], p: int,
                     read_bytes_per_s: float | None) -> tuple[list[BlockTiming], float]:
    """Per-block load/compute/gap seconds measured in pass ``p`` of ``profile``, and ``head_s``.

    A block that pass did not load (retained) gets its latest earlier load time.

    ``gap_s`` is the pinned compute after a block: until the next block starts, less that block's wait;
    the last block's gap runs to the end of the pass. ``head_s`` is the pinned compute before block 0.
    """
    events = [e for e in profile.events if e.pass_idx == p]
    span = next(((s, e) for q, s, e in profile.passes if q == p), None)
    if span is None:
        raise ValueError(f"pass {p} has not completed; completed passes: {[q for q, _, _ in profile.passes]}")
    # a block retained in pass p was not loaded then: take its latest load from an earlier pass
    loads = {e.block: e.end - e.start for e in sorted(profile.events, key=lambda e: e.pass_idx)
             if e.kind == "load" and e.pass_idx <= p}
    waits = {e.block: (e.start, e.end) for e in events if e.kind == "wait"}
    computes = {e.block: e for e in events if e.kind == "compute"}
    blocks = plan.blocks

    def began(name: str) -> float:  # when the block was entered: its wait's start, else its compute's
        return waits[name][0] if name in waits else computes[name].start

    head = began(blocks[0].name) - span[0] if blocks[0].name in computes else 0.0
    out = []
    for k, b in enumerate(blocks):
        c = computes.get(b.name)
        if c is None:
            compute, gap = 0.0, 0.0
        else:
            compute = c.end - c.start
            nxt = blocks[k + 1].name if k + 1 < len(blocks) else None
            gap = (began(nxt) if nxt in computes else span[1]) - c.end if nxt else span[1] - c.end
        default = b.nbytes / read_bytes_per_s if read_bytes_per_s else 0.0
        out.append(BlockTiming(b.name, layouts[k].nbytes, loads.get(b.name, default), compute, max(gap, 0.0)))
    return out, max(head, 0.0)
