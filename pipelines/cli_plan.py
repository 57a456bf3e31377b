"""``blockrt plan --weights DIR|MODEL_ID``: plan a real transformers or diffusers checkpoint before running it.

The model is built on ``meta`` from its ``config.json`` as ``blockrt.from_pretrained`` builds it (a directory, or a
repo id in the local Hugging Face cache, read offline), partitioned, and checked against the checkpoint's
safetensors headers (no tensor is read). Compute per block comes from FLOPs on a ``meta`` pass where the model
takes token ids (``--tokens`` of them); for other models (diffusers transformers, VAEs) no example input is
known, and the times printed are the loads alone.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from blockrt.budget import format_bytes, parse_budget
from blockrt.device import get_profile
from blockrt.partitioners import partition
from blockrt.planning import block_flops, flop_timings, plan_sweep
from blockrt.hub import checkpoint_file, resolve_model_dir
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
    inputs = _example(model, args.tokens)
    if inputs is not None:
        flops, pinned_flops = block_flops(model, plan, (), inputs)
        compute = f"compute from FLOPs on {args.tokens} tokens"
    else:
        flops, pinned_flops = [0.0] * len(plan.blocks), 0.0
        compute = f"compute not estimated (no example input for {type(model).__name__}): loads only"
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


def _example(model: torch.nn.Module, tokens: int) -> dict[str, torch.Tensor] | None:
    """Keyword inputs of one pass for a model that takes token ids, else None."""
    if getattr(model, "main_input_name", None) != "input_ids":
        return None
    inputs = {"input_ids": torch.zeros(1, tokens, dtype=torch.long)}
    if getattr(model.config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = torch.zeros(1, 1, dtype=torch.long)
    return inputs
