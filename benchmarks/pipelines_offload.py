"""``blockrt.offload`` on whole diffusers pipelines (SD3, Flux, Wan, LTX-Video, CogVideoX; random weights built from
configs, ``tests/tiny_pipelines.py`` widened by ``--scale``): parity with the plain pipeline, peak ledger and RSS
growth against the budget, per pipeline.

    MALLOC_MMAP_THRESHOLD_=131072 MALLOC_TRIM_THRESHOLD_=131072 \\
        .venv/bin/python benchmarks/pipelines_offload.py [--scale 12] [--fraction 0.4] [--pipelines sd3,flux]

The budget is ``--fraction`` of the pipeline's model bytes (raised to the smallest budget every stage fits, if
larger). RSS growth is the peak during ``pipe(...)`` minus the RSS just before it (the models already spilled;
``peak_anon_delta``: heap and tensors); the plain pipeline's growth (its weights already resident) is shown for
scale. Results go to ``out/bench/pipelines_offload/results.{json,csv}``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the pipeline builders live with the tests

import blockrt  # noqa: E402
from blockrt import RunConfig  # noqa: E402
from blockrt.budget import format_bytes  # noqa: E402
from blockrt.errors import BudgetError  # noqa: E402
from blockrt.memory import RssSampler, read_rss  # noqa: E402
from bench_common import begin_run, release_freed_memory, write_results  # noqa: E402
from tiny_pipelines import BUILDERS, output  # noqa: E402

FIELDS = ("pipeline", "model_bytes", "largest_model_bytes", "budget", "equal", "equal_after_remove",
          "peak_ledger_bytes", "resident_bytes", "rss_growth_bytes", "anon_growth_bytes", "plain_anon_growth_bytes",
          "rss_drop_at_offload_bytes", "plain_s", "offload_setup_s", "offloaded_s", "activations")


def _bytes(m: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])


def one(name: str, scale: int, fraction: float) -> dict:
    pipe, kwargs = BUILDERS[name](seed=0, scale=scale)
    pipe.set_progress_bar_config(disable=True)
    modules = {n: m for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    total = sum(_bytes(m) for m in modules.values())
    pipe(**kwargs())  # warm: library code, kernels' first-call set-up
    release_freed_memory()
    with RssSampler() as plain_rss:
        t = time.perf_counter()
        want = output(pipe(**kwargs()))
        plain_s = time.perf_counter() - t
    budget = int(total * fraction)
    config = RunConfig(exact_rss=True)
    while True:  # a fraction below what a stage needs (its floor, or its measured activations): 1.25x more
        release_freed_memory()
        rss0 = read_rss()
        t = time.perf_counter()
        try:
            off = blockrt.offload(pipe, budget, config=config)
        except BudgetError as e:
            print(f"  {name}: {format_bytes(budget)} is too small ({str(e)[:90]}...); trying 1.25x", flush=True)
            budget = int(budget * 1.25)
            continue
        setup_s = time.perf_counter() - t
        release_freed_memory()
        drop = rss0.rss - read_rss().rss
        try:
            with RssSampler() as rss:
                t = time.perf_counter()
                got = output(pipe(**kwargs()))
                offloaded_s = time.perf_counter() - t
            report = off.report()
            peak, resident = off.peak_ledger_bytes, off.resident_bytes
        except BudgetError as e:
            print(f"  {name}: {format_bytes(budget)} is too small ({str(e)[:90]}...); trying 1.25x", flush=True)
            budget = int(budget * 1.25)
            continue
        finally:
            off.remove()
        break
    again = output(pipe(**kwargs()))
    return {"pipeline": name, "model_bytes": total, "largest_model_bytes": max(_bytes(m) for m in modules.values()),
            "budget": budget, "equal": bool(torch.equal(got, want)), "equal_after_remove": bool(torch.equal(again, want)),
            "peak_ledger_bytes": peak, "resident_bytes": resident, "rss_growth_bytes": rss.peak_rss_delta,
            "anon_growth_bytes": rss.peak_anon_delta, "plain_anon_growth_bytes": plain_rss.peak_anon_delta,
            "rss_drop_at_offload_bytes": drop, "plain_s": plain_s, "offload_setup_s": setup_s,
            "offloaded_s": offloaded_s, "activations": sum(r["activations"] for r in report.values()),
            "stages": report, "models": {n: _bytes(m) for n, m in modules.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipelines", default=",".join(BUILDERS), help=f"comma-separated among {','.join(BUILDERS)}")
    ap.add_argument("--scale", type=int, default=12, help="widen the tiny pipelines' models by this factor")
    ap.add_argument("--fraction", type=float, default=0.4, help="budget as a fraction of the models' bytes")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="out/bench/pipelines_offload")
    args = ap.parse_args()
    names = args.pipelines.split(",")
    unknown = [n for n in names if n not in BUILDERS]
    if unknown:
        ap.error(f"unknown pipeline(s) {unknown}; choose among {sorted(BUILDERS)}")
    out_dir, hw, other = begin_run(args.threads, args.out)
    rows = []
    print(f"{'pipeline':>10} {'models':>10} {'budget':>10} {'equal':>6} {'peak ledger':>12} {'RSS growth':>11} "
          f"{'over budget':>12} {'anon growth':>12} {'plain anon':>11} {'plain s':>8} {'offload s':>10} {'runtimes':>9}")
    for name in names:
        r = one(name, args.scale, args.fraction)
        rows.append(r)
        eq = "yes" if r["equal"] and r["equal_after_remove"] else "NO"
        print(f"{name:>10} {format_bytes(r['model_bytes']):>10} {format_bytes(r['budget']):>10} {eq:>6} "
              f"{format_bytes(r['peak_ledger_bytes']):>12} {format_bytes(r['rss_growth_bytes']):>11} "
              f"{format_bytes(max(0, r['rss_growth_bytes'] - r['budget'])):>12} {format_bytes(r['anon_growth_bytes']):>12} {format_bytes(r['plain_anon_growth_bytes']):>11} "
              f"{r['plain_s']:>8.2f} {r['offloaded_s']:>10.2f} {r['activations']:>9}", flush=True)
    hw["other_cpu_cores_during"] = other.cores()
    print(f"other processes used {hw['other_cpu_cores_during']:.2f} cores during the run (timings are indicative)")
    write_results(out_dir, {"hardware": hw, "scale": args.scale, "fraction": args.fraction, "pipelines": rows},
                  rows, FIELDS)
    bad = [r["pipeline"] for r in rows if not (r["equal"] and r["equal_after_remove"]
                                               and r["peak_ledger_bytes"] <= r["budget"])]
    over = {r["pipeline"]: r["rss_growth_bytes"] - r["budget"] for r in rows if r["rss_growth_bytes"] > r["budget"]}
    print("RSS growth within the budget for every pipeline" if not over else "RSS growth over the budget (what no "
          "ledger sees: allocator arenas, thread stacks, kernels' packing buffers; README 'Memory allowance'): "
          + ", ".join(f"{k} by {format_bytes(v)}" for k, v in over.items()))
    print(f"wrote {out_dir / 'results.json'}; " + (f"FAILED: {bad}" if bad else "every pipeline equal, ledger under budget"))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
