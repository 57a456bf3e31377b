"""blockrt against its peers: same model, same budget, same machine, one run (issue 7, item 3).

Each contender runs in its own fresh process (``peers_worker.py``), so peak RSS is per contender and every
process imports the same libraries before its baseline is read (the import cost is reported apart):

    resident                  the plain model (the reference output and the compute-only time)
    accelerate_disk_offload   accelerate ``disk_offload(model, folder)``
    accelerate_device_map     T5: transformers ``from_pretrained(device_map="auto", max_memory={"cpu": budget},
                              offload_folder)``; STDiT3: accelerate ``load_checkpoint_and_dispatch`` (same map)
    diffusers_group_offload   ``apply_group_offloading(block_level, 1 block per group, offload_to_disk_path)``
    diffusers_group_offload_stream   the same with ``use_stream=True``: only on a CUDA machine
    blockrt_sequential        blockrt, prefetch 0, retention off (the paper's sequential loading)
    blockrt                   blockrt, prefetch 1 + retention under the budget

Workloads (``peers_workloads.py``): ``t5`` (HF T5EncoderModel of t5-v1.1-large shape, 1.36 GB, 300 tokens)
and ``stdit3`` (STDiT3 XL/2, 4.8 GB, a denoising loop of the pipeline's sampler; one pass = one CFG call).
Regimes: ``warm`` (page cache warm, no throttle) and ``cold`` (blockrt's loads throttled to the iPhone 15 Pro's
1.45 GB/s and its files dropped from the page cache; the peers cannot be throttled, so every contender's
files are dropped from the page cache before every pass instead: the slow-read stand-in).

Per contender: wall per pass (median of the passes after one warm-up), blockrt's speedup over it,
``roofline_ratio`` (blockrt's own; for a peer wall / max(compute-only, load-only), compute-only = the resident
wall, load-only = the bytes its hooks read per pass at the speed of reading its files), peak RSS minus the
import baseline (during the passes, and including set-up), and parity with the resident output.

    .venv/bin/python benchmarks/peers.py --models t5 --regimes warm          # ~3 min on 2 cores
    .venv/bin/python benchmarks/peers.py                                     # both models, both regimes
    .venv/bin/python benchmarks/peers.py --quick                             # small models, a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from blockrt.budget import parse_budget
from blockrt.device import get_profile
import peers_workloads as wl
from bench_common import OtherCpu, hardware, write_results
from peers_report import CSV_FIELDS, markdown, rows, table, table_findings, targets
from peers_worker import CONTENDERS

ROOT = Path(__file__).resolve().parents[1]

WORKER = Path(__file__).resolve().parent / "peers_worker.py"
REGIMES = ("warm", "cold")
OWN = ("blockrt", "blockrt_sequential")  # their failure fails the run (the resident's stops it at once)
DEFAULT_BUDGETS = {"t5": "300MB", "stdit3": "3.3GB"}
QUICK_BUDGETS = {"t5": "12MB", "stdit3": "24MB"}
WORKER_TIMEOUT_S = 1800
# Same allocator settings in every process (the README's advice for RSS measurements): freed buffers go back.
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072", "TQDM_DISABLE": "1",
              "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error",
              "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="t5,stdit3", help="comma-separated among t5, stdit3")
    p.add_argument("--regimes", default="warm,cold", help="comma-separated among warm, cold")
    p.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated subset (resident is always run)")
    p.add_argument("--passes", type=int, default=None, help="timed passes after 1 warm-up (default 5; quick 2)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in every contender (default 2)")
    p.add_argument("--budget-t5", default=None, help="T5 budget (default 300MB; quick 12MB)")
    p.add_argument("--budget-stdit3", default=None, help="STDiT3 budget (default 3.3GB; quick 24MB)")
    p.add_argument("--stdit3-size", default="xl", choices=wl.STDIT3_SIZES, help="xl (4.8 GB) or mid (depth 14, hidden 768)")
    p.add_argument("--read-gbps", type=float, default=None, help="blockrt's throttle in the cold regime (default: iphone15pro)")
    p.add_argument("--cache", default="out/weights/random", help="where the random checkpoints are written once")
    p.add_argument("--out", default="out/bench/peers", help="results.json, results.csv, peers.md, logs/")
    p.add_argument("--quick", action="store_true", help="small models, 2 passes: a smoke run")
    p.add_argument("--in-process", action="store_true",
                   help="run contenders in this process (fast, for tests: outputs and timings only, RSS meaningless)")
    a = p.parse_args(argv)
    a.models = [m for m in a.models.split(",") if m]
    a.regimes = [r for r in a.regimes.split(",") if r]
    a.contenders = ["resident"] + [c for c in a.contenders.split(",") if c and c != "resident"]
    for name, values, known in (("models", a.models, wl.WORKLOADS), ("regimes", a.regimes, REGIMES),
                                ("contenders", a.contenders, CONTENDERS)):
        bad = [v for v in values if v not in known]
        if bad or not values:
            p.error(f"--{name}: unknown {bad or 'empty list'}; expected among {known}")
    a.passes = a.passes if a.passes is not None else (2 if a.quick else 5)
    if a.passes < 1 or a.threads < 1:
        p.error(f"--passes and --threads must be >= 1, got {a.passes} and {a.threads}")
    defaults = QUICK_BUDGETS if a.quick else DEFAULT_BUDGETS
    a.budgets = {"t5": parse_budget(a.budget_t5 or defaults["t5"]),
                 "stdit3": parse_budget(a.budget_stdit3 or defaults["stdit3"])}
    a.read_bps = a.read_gbps * 1e9 if a.read_gbps else get_profile("iphone15pro").read_bytes_per_s
    return a


IMPORT_PROBES = {"torch": "import torch", "transformers (T5)": "from transformers import T5EncoderModel",
                 "accelerate": "import accelerate", "diffusers (hooks)": "from diffusers.hooks import apply_group_offloading",
                 "blockrt": "import blockrt"}
_RSS = "int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) * 1024"


def import_costs_alone() -> dict[str, int]:
    """RSS each library adds when imported alone after torch (torch: after a bare interpreter), one fresh
    process each: what a user of only that peer pays in memory before loading any model."""
    out = {}
    env = {**os.environ, **WORKER_ENV}
    for name, stmt in IMPORT_PROBES.items():
        pre = "" if name == "torch" else "import torch; "
        code = f"{pre}r0 = {_RSS}; {stmt}; print({_RSS} - r0)"
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300, check=True)
        out[name] = int(proc.stdout.split()[-1])
    return out


def run_worker(job: dict[str, Any], work: Path, log_dir: Path, in_process: bool) -> dict[str, Any]:
    """One contender: in a fresh process (the benchmark) or here (tests). Returns the worker's result."""
    tag = f"{job['workload']['name']}_{job['regime']}_{job['contender']}"
    if in_process:
        import peers_worker
        return peers_worker.run_job(job)
    job_path, res_path = work / f"{tag}.job.json", work / f"{tag}.result.json"
    job_path.write_text(json.dumps(job))
    env = {**os.environ, **WORKER_ENV}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(WORKER), str(job_path), str(res_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    (log_dir / f"{tag}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not res_path.is_file():
        return {"contender": job["contender"], "error": f"worker exited with {proc.returncode} after "
                f"{time.perf_counter() - t0:.0f} s (log: {log_dir / (tag + '.log')}): {proc.stderr.strip()[-400:]}"}
    return json.loads(res_path.read_text())


def parity(path: Path, ref: torch.Tensor) -> dict[str, Any]:
    from safetensors.torch import load_file

    out = load_file(str(path))["out"]
    if out.shape != ref.shape:
        return {"equal": False, "max_abs_err": None, "note": f"shape {tuple(out.shape)} vs {tuple(ref.shape)}"}
    eq = torch.equal(out, ref)
    return {"equal": eq, "max_abs_err": 0.0 if eq else float((out.double() - ref.double()).abs().max())}


def derive(res: dict[str, dict[str, Any]], outputs: dict[str, Path]) -> None:
    """Medians, roofline, parity and speedups of one (model, regime), in place."""
    ref_path = outputs.get("resident")
    if res["resident"].get("error") or ref_path is None:
        raise RuntimeError(f"the resident model failed, nothing to compare with: {res['resident'].get('error')}")
    from safetensors.torch import load_file
    ref = load_file(str(ref_path))["out"]
    for r in res.values():
        if r.get("error") or "pass_walls" not in r:
            continue
        r["wall_per_pass"] = statistics.median(r["pass_walls"][1:])
        r["parity"] = parity(outputs[r["contender"]], ref)
    compute = res["resident"]["wall_per_pass"]
    for name, r in res.items():
        if "wall_per_pass" not in r:
            continue
        probe = r.get("load_probe") or {}
        bw = probe.get("bytes_per_s")
        r["load_only_s"] = r["streamed_bytes_per_pass"] / bw if bw else 0.0
        r["vs_resident"] = r["wall_per_pass"] / compute
        if "blockrt" in r:  # blockrt's own measures: its loads (throttled in the cold regime) and overlap
            r["load_only_s"] = r["blockrt"]["load_s"]
            r["roofline_ratio"] = r["blockrt"]["roofline_ratio"]
        elif name == "resident":
            r["roofline_ratio"] = 1.0
        else:
            r["roofline_ratio"] = r["wall_per_pass"] / max(compute, r["load_only_s"])
    if "wall_per_pass" in res.get("blockrt", {}):
        for r in res.values():
            if "wall_per_pass" in r:
                r["blockrt_speedup"] = r["wall_per_pass"] / res["blockrt"]["wall_per_pass"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out)
    log_dir = out_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    hw = hardware()
    hw["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    hw["loadavg_before"] = os.getloadavg()
    other = OtherCpu().start()
    print(f"hardware: {hw['cpu']}, {hw['cores']} cores, torch {hw['torch']}, {args.threads} torch threads per "
          f"contender, GPU: {hw['gpu'] or 'none'}; load average {hw['loadavg_before'][0]:.2f}", flush=True)
    results: dict[str, Any] = {"hardware": hw, "config": {k: v for k, v in vars(args).items()}, "models": {}}
    if not (args.in_process or args.quick):  # 5 extra processes: skipped in smoke runs
        results["import_costs_alone"] = alone = import_costs_alone()
        print("import cost, each alone in a fresh process (after torch): "
              + ", ".join(f"{k} +{v / 1e6:.0f} MB" for k, v in alone.items()), flush=True)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="peers-", dir=out_dir) as tmp:
        work = Path(tmp)
        for model in args.models:
            spec = wl.prepare(model, quick=args.quick, cache=Path(args.cache), stdit3_size=args.stdit3_size)
            budget = args.budgets[model]
            print(f"\n== {spec['title']}: {spec['bytes'] / 1e9:.2f} GB fp32 in {spec['dir']}; budget {budget / 1e6:.0f} MB",
                  flush=True)
            per_regime: dict[str, Any] = {}
            for regime in args.regimes:
                res: dict[str, dict[str, Any]] = {}
                outputs: dict[str, Path] = {}
                for name in args.contenders:
                    if name == "diffusers_group_offload_stream" and not torch.cuda.is_available():
                        res[name] = {"contender": name, "error": None, "na": "n/a (no GPU): use_stream needs CUDA/XPU"}
                        continue
                    outputs[name] = work / f"{model}_{regime}_{name}.safetensors"
                    job = {"workload": spec, "contender": name, "regime": regime, "passes": args.passes,
                           "threads": args.threads, "budget": budget, "output": str(outputs[name]),
                           "offload_dir": str(work / f"offload_{name}"),
                           "read_bytes_per_s": args.read_bps if regime == "cold" else None}
                    t0 = time.perf_counter()
                    res[name] = run_worker(job, work, log_dir, args.in_process)
                    status = res[name].get("error") or f"{statistics.median(res[name]['pass_walls'][1:]):.3f} s/pass"
                    print(f"  [{regime}] {name:<31} {status}  ({time.perf_counter() - t0:.0f} s)", flush=True)
                derive(res, outputs)
                per_regime[regime] = res
                print(table(model, regime, res), flush=True)
                print(table_findings(spec["bytes"], res), flush=True)
            results["models"][model] = {"workload": spec, "budget": budget, "regimes": per_regime}
    hw["other_cpu_cores_during"] = other.cores()
    hw["loadavg_after"] = os.getloadavg()
    hw["run_s"] = time.perf_counter() - t_start
    results["targets"] = targets(results)
    print(f"\nother processes used {hw['other_cpu_cores_during']:.2f} cores on average during the run "
          f"(load average now {hw['loadavg_after'][0]:.2f}); {hw['run_s']:.0f} s in all")
    for t in results["targets"]:
        print(f"target {t['name']:<58} {t['value_text']:>24}  {t['verdict']}")
    write_results(out_dir, results, rows(results), CSV_FIELDS)
    text = markdown(results).encode()
    from blockrt.files import write_atomic
    write_atomic(out_dir / "peers.md", lambda f: f.write(text))
    print(f"wrote {out_dir / 'results.json'}, {out_dir / 'results.csv'}, {out_dir / 'peers.md'}, logs in {log_dir}")
    ours = [f"{model}/{regime}/{name}: {r['error']}" for model, m in results["models"].items()
            for regime, res in m["regimes"].items() for name, r in res.items()
            if name in OWN and r.get("error")]
    if ours:  # a peer may fail (that is a finding); blockrt failing is a bug
        print("blockrt failed:\n  " + "\n  ".join(ours), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
