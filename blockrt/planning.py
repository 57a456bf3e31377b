"""``blockrt plan``: predict a run before executing it, from a plan, per-block compute and a device profile.

Compute comes from a measured run (``Runtime.timings``) or from FLOPs counted by ``torch.utils.flop_counter``
on a ``meta``-device pass (nothing computed or loaded: a 19 GB model is planned in seconds); loads from block
bytes over the profile's read bandwidth. The configurations are in ``predict.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import FlopCounterMode

from .device import DeviceProfile
from .loader import BlockLayout
from .partitioners.plan import Plan
from .predict import BlockTiming, Prediction, minimum_budget, sweep


def block_flops(model: nn.Module, plan: Plan, args: tuple = (), kwargs: dict | None = None) -> tuple[list[float], float]:
    """FLOPs of one pass per block, and of the pinned modules; a meta skeleton runs on meta copies of the
    inputs (nothing computed or loaded), a model with real weights runs once for real."""
    if all(p.is_meta for p in model.parameters()):
        args, kwargs = tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, (args, kwargs or {}))
    counter = FlopCounterMode(display=False, depth=None)
    with torch.no_grad(), counter:
        model(*args, **(kwargs or {}))
    counts = counter.get_flop_counts()
    root = type(model).__name__
    total = float(sum(counts.get("Global", {}).values()))
    per_block = [float(sum(sum(counts.get(f"{root}.{path}", {}).values()) for path in block.modules))
                 for block in plan.blocks]
    return per_block, max(total - sum(per_block), 0.0)


def flop_timings(plan: Plan, flops: Sequence[float], pinned_flops: float, profile: DeviceProfile,
                 read_bytes_per_s: float | None = None) -> tuple[list[BlockTiming], float]:
    """Per-block timings on ``profile``: compute = FLOPs / its FLOP/s, load = bytes / its read bandwidth; the
    pinned modules' compute goes to ``head_s``."""
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
