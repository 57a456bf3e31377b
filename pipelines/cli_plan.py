"""``blockrt plan --weights DIR|MODEL_ID``: plan a real transformers or diffusers checkpoint before running it.

The model is built on ``meta`` from its ``config.json`` as ``blockrt.from_pretrained`` builds it (a directory, or a
repo id in the local Hugging Face cache, read offline), partitioned, and checked against the checkpoint's
safetensors headers (no tensor is read). Compute per block comes from FLOPs on a ``meta`` pass (nothing computed)
with inputs shaped from the model's config (``plan_inputs.py``): token ids for transformers models (``--tokens``),
latents for the diffusers denoisers at ``--height``/``--width``/``--frames`` with ``--tokens`` of text, an image
for ``AutoencoderKL``. A class ``plan_inputs`` does not know, or one whose ``meta`` pass fails, is planned from
its loads alone, and the header says so and why.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from blockrt.partitioners import partition
from blockrt.pipelines.plan_inputs import Size, describe, example_inputs

from blockrt.budget import format_bytes, parse_budget
from blockrt.device import get_profile
from blockrt.hub import checkpoint_file, resolve_model_dir
from blockrt.planning import block_flops, flop_timings, plan_sweep
from blockrt.pretrained import build_skeleton
from blockrt.sources import CheckpointSource


def plan_model(args: argparse.Namespace) -> int:
    """Print the plan of ``args.weights`` and the predicted pass times over budgets; 0 on success."""
    profile = get_profile(args.profile)
    budgets = [parse_budget(b) for b in args.budgets.split(",")] if args.budgets else None
    ws = parse_budget(args.working_set) if args.working_set else 0
    directory = resolve_model_dir(args.weights, subfolder=args.subfolder or "")
    model = build_skeleton(directory)
    plan = partition(model)
    source = CheckpointSource(checkpoint_file(directory))
    source.resolve(plan)  # the checkpoint holds this model: every key, shape and dtype (headers only)
    flops, pinned_flops, compute = _flops(model, plan, args)
    timings, head = flop_timings(plan, flops, pinned_flops, profile)
    big = plan.largest_block()
    print(f"plan for {type(model).__name__} from {directory} on {profile.name}: {len(plan.blocks)} blocks "
          f"(largest {big.name!r}, {format_bytes(big.nbytes)}), {format_bytes(plan.pinned_bytes)} pinned, "
          f"{format_bytes(sum(b.nbytes for b in plan.blocks) + plan.pinned_bytes)} in all; {compute}; loads at "
          f"{profile.read_bytes_per_s / 1e9:.2f} GB/s; working set assumed {format_bytes(ws)}")
    print_sweep(plan_sweep(timings, pinned_bytes=plan.pinned_bytes, working_set_bytes=ws,
                           prefetch_depth=args.prefetch, head_s=head, budgets=budgets, points=args.points))
    return 0


def print_sweep(predictions: list[Any]) -> None:
    """The table of ``blockrt plan``: one line per budget."""
    print(f"{'budget':>12} {'sequential':>12} {'concurrent':>12} {'+ retention':>12} {'speedup':>8}  retained")
    for p in predictions:
        speedup = f"{p.sequential_s / p.retention_s:>7.2f}x" if p.retention_s > 0 else f"{'-':>8}"
        print(f"{format_bytes(p.budget):>12} {_time(p.sequential_s):>12} {_time(p.concurrent_s):>12} "
              f"{_time(p.retention_s):>12} {speedup}  {len(p.retention.retained)} blocks")


def _time(seconds: float) -> str:
    return f"{seconds:.3f}s" if seconds >= 1 else f"{seconds * 1e3:.3f}ms" if seconds >= 1e-3 else f"{seconds * 1e6:.1f}us"


def _flops(model: torch.nn.Module, plan: Any, args: argparse.Namespace) -> tuple[list[float], float, str]:
    """FLOPs per block and of the pinned part on one example pass, and how they were found (for the header)."""
    size = Size(height=args.height, width=args.width, frames=args.frames, tokens=args.tokens)
    inputs = example_inputs(model, size)
    why = f"no example input for {type(model).__name__}"
    if inputs is not None:
        try:
            flops, pinned = block_flops(model, plan, (), inputs)
            if "input_ids" in inputs:
                return flops, pinned, f"compute from FLOPs on {args.tokens} tokens"
            return flops, pinned, f"compute from FLOPs on {describe(inputs)}"
        except Exception as e:  # noqa: BLE001 - a model whose forward cannot run on meta: plan its loads
            why = f"its meta pass failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return [0.0] * len(plan.blocks), 0.0, f"compute not estimated ({why}): loads only"
