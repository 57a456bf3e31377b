"""Zoo benchmark: every architecture of the test zoo streamed at half its bytes (one run, one machine).

For each model of ``tests/zoo_models.py`` (transformers and diffusers architectures built from small configs,
random weights): the plain forward's time, then ``blockrt.run(model, budget=50% of its bytes)`` with the default
(whole-model) partitioner, ``--calls`` calls timed after the measuring passes, every output ``torch.equal`` to
the plain one, and after ``close()`` the model's own output checked equal again (it survives the run). Prints
per architecture: blocks, pinned share, peak ledger / budget, ``peak_rss_delta``, wall per call vs plain, parity;
writes ``results.json``/``results.csv`` into ``--out``.

    .venv/bin/python benchmarks/zoo.py             # 36 architectures: ~3 minutes on 2 idle cores, ~10 loaded
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import torch

import blockrt
from blockrt import RunConfig
from blockrt.partitioners import partition
from bench_common import BUSY_CORES, begin_run, release_freed_memory, write_results

CSV_FIELDS = ("model", "model_bytes", "blocks", "pinned_share", "budget", "peak_ledger_bytes", "peak_rss_delta",
              "plain_ms", "streamed_ms", "ratio", "equal", "equal_after_close")


def _zoo():
    """``tests/zoo_models.py``, the test zoo's builders (loaded by path: benchmarks never edit ``sys.path``)."""
    path = Path(__file__).resolve().parents[1] / "tests" / "zoo_models.py"
    spec = importlib.util.spec_from_file_location("zoo_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _timed(fn, calls: int, output) -> tuple[float, torch.Tensor]:
    out = None
    t0 = time.perf_counter()
    for _ in range(calls):
        out = output(fn())
    return (time.perf_counter() - t0) / calls, out


def bench_one(name: str, zoo, calls: int) -> dict:
    model, kwargs = zoo.build(name)
    output = zoo.output
    plan = partition(model)
    with torch.no_grad():
        output(model(**kwargs))  # warm-up
        plain_s, ref = _timed(lambda: model(**kwargs), calls, output)
        ref = ref.clone()
    budget = int(plan.total_bytes * 0.5)
    release_freed_memory()
    with blockrt.run(model, budget=budget, config=RunConfig(exact_rss=True)) as rt:
        first = [torch.equal(output(rt(**kwargs)), ref) for _ in range(2)]  # the measuring passes
        streamed_s, out = _timed(lambda: rt(**kwargs), calls, output)
        equal = all(first) and torch.equal(out, ref)
        s = rt.profile.summary()
    with torch.no_grad():
        after = torch.equal(output(model(**kwargs)), ref)
    return {"model": name, "model_bytes": plan.total_bytes, "blocks": len(plan.blocks),
            "pinned_share": plan.pinned_bytes / plan.total_bytes, "budget": budget,
            "peak_ledger_bytes": s.peak_ledger_bytes, "peak_rss_delta": s.peak_rss_delta,
            "plain_ms": plain_s * 1e3, "streamed_ms": streamed_s * 1e3, "ratio": streamed_s / plain_s,
            "equal": equal, "equal_after_close": after}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/bench/zoo", help="directory for results.json/csv")
    p.add_argument("--calls", type=int, default=5, help="timed calls per model after the measuring passes")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--models", default=None, help="comma-separated subset of the zoo")
    args = p.parse_args(argv)
    out_dir, hw, other = begin_run(args.threads, args.out)
    zoo = _zoo()
    names = args.models.split(",") if args.models else list(zoo.ZOO)
    rows = []
    print(f"{'model':<14} {'MB':>6} {'blocks':>6} {'pinned':>7} {'peak ledger/budget':>19} {'rss delta':>10} "
          f"{'plain ms':>9} {'blockrt ms':>10} {'ratio':>6}  equal / after close")
    for name in names:
        r = bench_one(name, zoo, args.calls)
        rows.append(r)
        rss = "-" if r["peak_rss_delta"] is None else f"{r['peak_rss_delta'] / 1e6:.2f} MB"
        print(f"{name:<14} {r['model_bytes'] / 1e6:>6.2f} {r['blocks']:>6} {100 * r['pinned_share']:>6.1f}% "
              f"{r['peak_ledger_bytes'] / 1e6:>8.2f} / {r['budget'] / 1e6:>6.2f} MB {rss:>10} {r['plain_ms']:>9.2f} "
              f"{r['streamed_ms']:>10.2f} {r['ratio']:>6.2f}  {'yes' if r['equal'] else 'NO'} / "
              f"{'yes' if r['equal_after_close'] else 'NO'}", flush=True)
    hw["other_cpu_cores_during"] = other.cores()
    if max(hw["other_cpu_cores_before"], hw["other_cpu_cores_during"]) > BUSY_CORES:
        print(f"warning: other processes used {hw['other_cpu_cores_during']:.2f} cores during the run: timings disturbed")
    over = [r["model"] for r in rows if r["peak_ledger_bytes"] > r["budget"]]
    wrong = [r["model"] for r in rows if not (r["equal"] and r["equal_after_close"])]
    print(f"{len(rows)} architectures at 50% of their bytes: {len(rows) - len(wrong)} bit-exact (also after close), "
          f"{len(rows) - len(over)} with peak ledger <= budget" + (f"; short: {sorted(set(over + wrong))}" if over or wrong else ""))
    write_results(out_dir, {"hardware": hw, "rows": rows}, rows, CSV_FIELDS)
    return 1 if over or wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())
