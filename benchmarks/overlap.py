"""Overlap benchmark: does streaming with prefetch hide the loads? (design §4 measures, one run, one machine)

A real transformer (``blockrt.pipelines.toy.ToyTransformer``) runs the same input in four modes:

    resident     the plain model, all weights in memory, no blockrt
    sequential   blockrt, ``prefetch_depth=0``: each block loads on demand (the paper's sequential loading)
    prefetch     blockrt, ``prefetch_depth=1``: block i+1 loads while block i computes (double buffering)
    prefetch2    blockrt, ``prefetch_depth=2``

The streamed modes run a skeleton (weights on ``meta``) from a block store written once, with retention
off, so every block is read every pass, under the smallest budget that fits (pinned + (depth+1) slots +
the measured working set + 1 MiB). Warm page-cache reads here (~5 GB/s) are far faster than compute, so
the loader is throttled to stand for slow flash: the resident run measures the compute time per block and
the read bandwidth is set so that loading a block takes as long as computing it (``block_bytes /
block_compute_s``), the regime where overlap matters most (the iPhone 15 Pro reads about 1.45 GB/s).
Each mode warms up one pass, times ``--passes`` passes, and only then checks that every output is
``torch.equal`` to the resident output. CPU time used by other processes meanwhile is measured and
reported (it disturbs the timings on 2 cores).

Prints the table of §4 measures with the hardware and the issue's targets (PASS/MISS, not asserted), and
writes ``results.json``, ``results.csv``, and the prefetch run's ``trace_prefetch.json`` (Perfetto) and
``timeline_prefetch.png`` into ``--out``.

    .venv/bin/python benchmarks/overlap.py                # ~25 s on the 2-core dev machine
    .venv/bin/python benchmarks/overlap.py --quick        # tiny model, a few seconds (the smoke test)
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

import blockrt
from blockrt import RunConfig
from blockrt.device import IPHONE15PRO
from blockrt.loader import BlockLayout
from blockrt.working_set import LiveBytes
from blockrt.partitioners import partition
from blockrt.pipelines.toy import ToyConfig, ToyTransformer
from bench_common import BUSY_CORES, begin_run, write_results

# Targets from the issue: printed next to the measurements as PASS/MISS, never asserted.
TARGET_ROOFLINE_PREFETCH = 1.10  # roofline_ratio of the prefetch run must be <= this
TARGET_SPEEDUP_PREFETCH = 1.6  # sequential wall / prefetch wall must be >= this
BUDGET_SLACK_BYTES = 1 << 20  # "a budget just big enough": pinned + slots + working set, plus 1 MiB


STREAMED = {"sequential": 0, "prefetch": 1, "prefetch2": 2}  # mode -> prefetch_depth
CSV_FIELDS = ("mode", "prefetch_depth", "passes", "wall_s_per_pass", "load_s", "compute_s", "stall_s",
              "stall_fraction", "roofline_ratio", "bytes_loaded_per_pass", "peak_ledger_bytes", "budget",
              "peak_rss_delta", "peak_anon_delta")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/bench", help="directory for results.json/csv, trace and PNG")
    p.add_argument("--passes", type=int, default=None, help="timed passes per mode, after 1 warm-up (default 5)")
    p.add_argument("--layers", type=int, default=None, help="transformer layers = streamed blocks (default 12)")
    p.add_argument("--dim", type=int, default=None, help="model width (default 1024: ~50 MB fp32 per layer)")
    p.add_argument("--tokens", type=int, default=None, help="sequence length of the one input (default 128)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for compute (default 1)")
    p.add_argument("--bandwidth", type=float, default=None,
                   help="loader read bandwidth in GB/s (default: chosen so per-block load ~= per-block compute)")
    p.add_argument("--quick", action="store_true", help="tiny model, 2 passes: a fast smoke run")
    p.add_argument("--device", default="cpu", help="cpu or cuda: where compute runs (blockrt's RunConfig.device)")
    args = p.parse_args(argv)
    small = {"passes": 2, "layers": 4, "dim": 128, "tokens": 32}
    full = {"passes": 5, "layers": 12, "dim": 1024, "tokens": 128}
    for k, v in (small if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for k in ("passes", "layers", "dim", "tokens", "threads"):
        if getattr(args, k) < 1:
            p.error(f"--{k} must be >= 1, got {getattr(args, k)}")
    if args.bandwidth is not None and not (math.isfinite(args.bandwidth) and args.bandwidth > 0):
        p.error(f"--bandwidth must be a positive number of GB/s, got {args.bandwidth}")
    return args


def time_resident(model: torch.nn.Module, ids: torch.Tensor, plan, passes: int) -> tuple[torch.Tensor, dict]:
    """Warm up one pass, then time ``passes`` passes of the plain model; per-block compute from timing hooks
    on each block's first and last module (the same boundaries blockrt's compute events use)."""
    starts: dict[int, float] = {}
    block_s = [0.0] * len(plan.blocks)
    hooks = []
    for i, block in enumerate(plan.blocks):
        first, last = model.get_submodule(block.modules[0]), model.get_submodule(block.modules[-1])
        hooks.append(first.register_forward_pre_hook(lambda m, a, i=i: starts.__setitem__(i, time.perf_counter())))
        hooks.append(last.register_forward_hook(
            lambda m, a, o, i=i: block_s.__setitem__(i, block_s[i] + time.perf_counter() - starts[i])))
    try:
        with torch.no_grad():
            ref = model(ids)  # warm-up
            block_s[:] = [0.0] * len(block_s)
            wall = 0.0
            for _ in range(passes):
                t0 = time.perf_counter()
                out = model(ids)
                if out.is_cuda:
                    torch.cuda.synchronize()
                wall += time.perf_counter() - t0
                if not torch.equal(out, ref):
                    raise RuntimeError("the resident model is not deterministic across passes: "
                                       "torch.equal parity checks cannot work on this machine/thread setting")
    finally:
        for h in hooks:
            h.remove()
    compute = sum(block_s)
    return ref, {
        "prefetch_depth": None, "passes": passes, "wall_s": wall, "wall_s_per_pass": wall / passes,
        "load_s": 0.0, "compute_s": compute, "stall_s": 0.0, "stall_fraction": 0.0,
        "roofline_ratio": wall / compute if compute > 0 else math.nan,
        "bytes_loaded_per_pass": 0, "peak_ledger_bytes": None, "budget": None,
        "peak_rss_delta": None, "peak_anon_delta": None,
        "block_compute_s": compute / (passes * len(plan.blocks)),
    }


def working_set_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Peak live activation bytes of one pass: the working set blockrt measures in its first pass and
    holds in the ledger, so the budget must include it."""
    with torch.no_grad(), LiveBytes() as live:
        model(ids)
    return live.peak


def spill(model: torch.nn.Module, budget: int, store: Path) -> None:
    """Write ``model``'s blocks to a blockrt store once (a runtime that runs no pass). ``restore=False``: the model's
    streamed weights stay meta placeholders, so the process no longer holds the whole model."""
    blockrt.run(model, budget=budget, store=store,
                config=RunConfig(prefetch_depth=0, retention=False, restore=False)).close()


def time_streamed(mcfg: ToyConfig, ids: torch.Tensor, depth: int, budget: int, bandwidth: float,
                  store: Path, passes: int, out_dir: Path | None, device: str = "cpu") -> tuple[list[torch.Tensor], dict]:
    """Stream a skeleton (weights on meta, never materialised) from the store: one warm-up pass (blockrt's
    working-set measuring pass), ``passes`` timed passes, summary over the timed ones. Retention is off:
    every block streams every pass, which is what this benchmark measures."""
    cfg = RunConfig(prefetch_depth=depth, read_bytes_per_s=bandwidth, retention=False, exact_rss=True, device=device)
    with blockrt.meta_weights():
        skeleton = ToyTransformer(mcfg).eval()
    outs = []
    with blockrt.run(skeleton, budget=budget, weights=store, config=cfg) as rt:
        for _ in range(passes + 1):
            outs.append(rt(ids))
        ledger_peak, block_bytes = rt.ledger.peak, rt.plan.block_bytes
    # after close: the RSS sampler has stopped, so writing the trace and the plot is not charged to the run
    s = rt.profile.summary(passes=range(1, passes + 1))
    if s.bytes_loaded != s.passes * block_bytes:
        raise RuntimeError(f"prefetch_depth={depth}: loaded {s.bytes_loaded} bytes in {s.passes} passes, expected "
                           f"every block every pass ({s.passes} x {block_bytes}); the comparison is void")
    if out_dir is not None:
        rt.profile.save_trace(out_dir / "trace_prefetch.json")
        rt.profile.plot(out_dir / "timeline_prefetch.png",
                        title=f"prefetch_depth={depth}, read {bandwidth / 1e9:.2f} GB/s (pass 0 = warm-up): "
                              f"roofline_ratio {s.roofline_ratio:.2f}, stall_fraction {s.stall_fraction:.3f}")
    return outs, {
        "prefetch_depth": depth, "passes": s.passes, "wall_s": s.wall_s, "wall_s_per_pass": s.wall_s / s.passes,
        "load_s": s.load_s, "compute_s": s.compute_s, "stall_s": s.stall_s, "stall_fraction": s.stall_fraction,
        "roofline_ratio": s.roofline_ratio, "bytes_loaded_per_pass": s.bytes_loaded // s.passes,
        "peak_ledger_bytes": max(s.peak_ledger_bytes, ledger_peak), "budget": budget,
        "load_bytes_per_s": s.load_bytes_per_s,
        "peak_rss_delta": s.peak_rss_delta, "peak_anon_delta": s.peak_anon_delta,
    }


def _ms(s: float) -> str:
    return f"{s * 1e3:9.1f}"


def table(modes: dict[str, dict], passes: int) -> str:
    head = (f"{'mode':<11} {'depth':>5} {'wall/pass':>9} {'load_s':>9} {'compute_s':>9} {'stall_s':>9} "
            f"{'stall_fr':>8} {'roofline':>8} {'loaded/pass':>11} {'peak ledger / budget':>22}")
    units = f"{'':<11} {'':>5} {'ms':>9} {'ms':>9} {'ms':>9} {'ms':>9} {'':>8} {'':>8} {'MB':>11} {'MB':>22}"
    lines = [f"per mode: {passes} timed passes after 1 warm-up; load_s/compute_s/stall_s summed over them", head, units]
    for name, m in modes.items():
        depth = "-" if m["prefetch_depth"] is None else str(m["prefetch_depth"])
        mem = "-" if m["budget"] is None else f"{m['peak_ledger_bytes'] / 1e6:.1f} / {m['budget'] / 1e6:.1f}"
        lines.append(f"{name:<11} {depth:>5} {_ms(m['wall_s_per_pass'])} {_ms(m['load_s'])} {_ms(m['compute_s'])} "
                     f"{_ms(m['stall_s'])} {m['stall_fraction']:8.3f} {m['roofline_ratio']:8.2f} "
                     f"{m['bytes_loaded_per_pass'] / 1e6:11.1f} {mem:>22}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir, hw, other = begin_run(args.threads, args.out)

    torch.manual_seed(0)
    heads = max(1, args.dim // 64)
    mcfg = ToyConfig(vocab=256, dim=args.dim, n_layers=args.layers, n_heads=heads, max_len=args.tokens)
    model = ToyTransformer(mcfg).eval()
    ids = torch.randint(0, mcfg.vocab, (1, args.tokens), generator=torch.Generator().manual_seed(1))  # (B, T)
    plan = partition(model)
    block_slot_bytes = max(BlockLayout.of(b).nbytes for b in plan.blocks)  # slot size, with alignment padding
    print(f"model: ToyTransformer dim {args.dim}, {args.layers} layers, {heads} heads, input (1, {args.tokens}) "
          f"tokens; {len(plan.blocks)} blocks of {plan.largest_block().nbytes / 1e6:.1f} MB fp32 "
          f"({plan.block_bytes / 1e6:.1f} MB streamed per pass), pinned {plan.pinned_bytes / 1e6:.2f} MB", flush=True)

    ws = working_set_bytes(model, ids)  # on the CPU (the live-bytes tracker counts host memory)
    model.to(args.device)
    ids = ids.to(args.device)
    ref, resident = time_resident(model, ids, plan, args.passes)
    model.to("cpu")  # spilled from host memory
    block_compute_s = resident["block_compute_s"]
    if args.bandwidth is not None:
        bandwidth = args.bandwidth * 1e9
        why = "from --bandwidth"
    else:
        bandwidth = (plan.block_bytes / len(plan.blocks)) / block_compute_s
        why = f"= block bytes / resident per-block compute {block_compute_s * 1e3:.1f} ms, so load ~= compute"
    print(f"resident: {resident['wall_s_per_pass'] * 1e3:.1f} ms per pass", flush=True)
    print(f"loader throttled to {bandwidth / 1e9:.3f} GB/s ({why}); it stands for slow flash "
          f"(iPhone 15 Pro reads ~{IPHONE15PRO.read_bytes_per_s / 1e9:.2f} GB/s)", flush=True)

    modes: dict[str, dict] = {"resident": resident}
    outputs: dict[str, list[torch.Tensor]] = {}
    with tempfile.TemporaryDirectory(prefix="blockrt-bench-") as tmp:
        store = Path(tmp) / "store"
        spill(model, plan.pinned_bytes + block_slot_bytes + ws + BUDGET_SLACK_BYTES, store)
        del model  # its streamed weights are meta now; every mode streams a fresh skeleton from the store
        for name, depth in STREAMED.items():
            budget = plan.pinned_bytes + (depth + 1) * block_slot_bytes + ws + BUDGET_SLACK_BYTES
            print(f"{name}: prefetch_depth={depth}, budget {budget / 1e6:.1f} MB (pinned {plan.pinned_bytes / 1e6:.1f} "
                  f"+ {depth + 1} x {block_slot_bytes / 1e6:.1f} MB slots + working set {ws / 1e6:.1f} MB + 1 MiB)",
                  flush=True)
            outputs[name], modes[name] = time_streamed(mcfg, ids, depth, budget, bandwidth, store, args.passes,
                                                       out_dir if name == "prefetch" else None, args.device)

    hw["other_cpu_cores_during"] = busy = other.cores()  # before the parity check: it uses the CPU too

    # correctness after timing: every streamed pass must equal the resident output bit for bit
    for name, outs in outputs.items():
        for p, out in enumerate(outs):
            if not torch.equal(out, ref):
                diff = (out - ref).abs().max().item()
                raise AssertionError(f"{name} pass {p}: output differs from the resident model (max |diff| {diff:.3g})")
    print("parity: every streamed pass is torch.equal to the resident output", flush=True)

    wall = {k: m["wall_s_per_pass"] for k, m in modes.items()}
    speedups = {
        "prefetch_over_sequential": wall["sequential"] / wall["prefetch"],  # > 1: prefetch is faster
        "prefetch2_over_sequential": wall["sequential"] / wall["prefetch2"],
        "resident_over_prefetch": wall["prefetch"] / wall["resident"],  # 1.0: streaming costs nothing
        "resident_over_sequential": wall["sequential"] / wall["resident"],
    }
    roof = modes["prefetch"]["roofline_ratio"]
    targets = [
        {"name": "roofline_ratio (prefetch)", "value": roof, "target": f"<= {TARGET_ROOFLINE_PREFETCH:.2f}",
         "pass": bool(roof <= TARGET_ROOFLINE_PREFETCH)},
        {"name": "speedup prefetch over sequential", "value": speedups["prefetch_over_sequential"],
         "target": f">= {TARGET_SPEEDUP_PREFETCH:.2f}",
         "pass": bool(speedups["prefetch_over_sequential"] >= TARGET_SPEEDUP_PREFETCH)},
    ]

    print()
    print(f"hardware: {hw['cpu']}, {hw['cores']} cores, torch {hw['torch']}, {hw['torch_threads']} torch thread(s); "
          f"loader read {bandwidth / 1e9:.3f} GB/s (throttled); other processes used {busy:.2f} cores meanwhile")
    if busy > BUSY_CORES:
        print(f"warning: other processes used {busy:.2f} of {hw['cores']} cores during the run: compute and overlap "
              "timings are disturbed; rerun on a quiet machine")
    print(table(modes, args.passes))
    rss = [f"{k} {m['peak_rss_delta'] / 1e6:.1f} MB" for k, m in modes.items() if m.get("peak_rss_delta") is not None]
    if rss:
        print("peak_rss_delta (process RSS over its value when the runtime started): " + ", ".join(rss))
    print("speedups (wall per pass ratios):")
    print(f"  prefetch over sequential   {speedups['prefetch_over_sequential']:.2f}x   "
          f"(prefetch2 over sequential {speedups['prefetch2_over_sequential']:.2f}x)")
    print(f"  resident vs prefetch       {speedups['resident_over_prefetch']:.2f}x   "
          f"(prefetch wall / resident wall; 1.00 = streaming costs nothing)")
    print("targets (from the issue; measured, not asserted):")
    for t in targets:
        print(f"  {t['name']:<34} {t['value']:6.2f}  target {t['target']:<7}  {'PASS' if t['pass'] else 'MISS'}")

    results = {
        "hardware": hw,
        "config": {"dim": args.dim, "layers": args.layers, "heads": heads, "tokens": args.tokens,
                   "passes": args.passes, "threads": args.threads, "quick": args.quick,
                   "blocks": len(plan.blocks), "block_bytes": plan.largest_block().nbytes,
                   "block_slot_bytes": block_slot_bytes, "pinned_bytes": plan.pinned_bytes,
                   "working_set_bytes": ws, "budget_slack_bytes": BUDGET_SLACK_BYTES, "retention": False,
                   "read_bytes_per_s": bandwidth, "bandwidth_source": "--bandwidth" if args.bandwidth else "auto",
                   "resident_block_compute_s": block_compute_s},
        "modes": modes,
        "speedups": speedups,
        "targets": targets,
    }
    write_results(out_dir, results, ({"mode": name, **m} for name, m in results["modes"].items()), CSV_FIELDS)
    print(f"wrote {out_dir / 'results.json'}, {out_dir / 'results.csv'}, {out_dir / 'trace_prefetch.json'}, "
          f"{out_dir / 'timeline_prefetch.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
