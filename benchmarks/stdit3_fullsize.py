"""Full-size STDiT3-XL/2 (random weights in the real checkpoint layout) streamed under a 3.3 GB budget.

Writes ``OpenSora-STDiT-v3/{config.json, model.safetensors}`` (4.8 GB, 973 tensors) once into a cache
directory, builds the model on ``meta`` and streams it from that file for a few denoising forwards (one
pass each: the CFG batch of 2) at a small latent (144p 3:4, 17 frames -> latent 5 x 20 x 27), with and
without retention, loads throttled to the iPhone 15 Pro's flash. Prints per pass: wall, load, compute,
stall, ``roofline_ratio``, bytes loaded, ``peak_ledger_bytes`` vs the budget, ``peak_rss_delta`` (anonymous
and file-backed apart); writes ``results.json`` / ``results.csv`` and the retention run's trace and timeline.

    .venv/bin/python benchmarks/stdit3_fullsize.py                 # about 6-10 min on 2 cores, 4.8 GB of disk
    .venv/bin/python benchmarks/stdit3_fullsize.py --quick         # tiny config, same layout: a smoke run
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from pathlib import Path

import torch

import blockrt
from blockrt import RunConfig
from blockrt.device import IPHONE15PRO
from blockrt.files import write_atomic
from blockrt.pipelines.opensora.random_weights import write_random_checkpoints
from blockrt.pipelines.opensora.stdit3 import STDiT3, STDiT3Config


def inputs(cfg: STDiT3Config, frames_latent: int, h: int, w: int, tokens: int, seed: int = 0) -> dict:
    """One CFG forward's inputs: batch 2 (cond, null) of latent noise, a prompt of ``tokens`` valid tokens."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cfg.in_channels, frames_latent, h, w, generator=g)  # (2, 4, T, H, W)
    y = torch.randn(1, 1, cfg.model_max_length, cfg.caption_channels, generator=g)  # (1, 1, L, Cc) "T5 output"
    mask = torch.zeros(1, cfg.model_max_length, dtype=torch.long)
    mask[:, :tokens] = 1
    return {"x": x, "timestep": torch.tensor([900.0, 900.0]), "y": y, "mask": mask, "fps": torch.tensor([24.0]),
            "height": torch.tensor([float(h * 8)]), "width": torch.tensor([float(w * 8)])}


def run(weights: Path, cfg: STDiT3Config, feed: dict, *, budget: str, retention: bool, passes: int,
        out: Path | None) -> tuple[list[dict], torch.Tensor]:
    with blockrt.meta_weights():
        skeleton = STDiT3(cfg).eval()
    conf = RunConfig(retention=retention, device_profile="iphone15pro", exact_rss=True)
    rows = []
    with blockrt.run(skeleton, budget=budget, weights=weights, config=conf) as rt:
        null = skeleton.null_caption(1)
        feed = dict(feed, y=torch.cat([feed["y"], null]))
        for p in range(passes):
            t0 = time.perf_counter()
            last = rt(**feed)
            wall = time.perf_counter() - t0
            s = rt.profile.summary(passes=[p])
            rows.append({"retention": retention, "pass": p, "wall_s": wall, "load_s": s.load_s,
                         "compute_s": s.compute_s, "stall_s": s.stall_s, "roofline_ratio": s.roofline_ratio,
                         "bytes_loaded": s.bytes_loaded, "bytes_reused": s.bytes_reused,
                         "retained_blocks": len(rt.retention.retained) if rt.retention else 0})
        total = rt.profile.summary()
        for r in rows:
            r.update({"peak_ledger_bytes": total.peak_ledger_bytes, "budget": rt.budget,
                      "peak_rss_delta": total.peak_rss_delta, "peak_anon_delta": total.peak_anon_delta,
                      "peak_file_delta": total.peak_file_delta, "working_set_bytes": rt.retention.working_set_bytes,
                      "block_bytes": rt.plan.largest_block().nbytes, "blocks": len(rt.plan.blocks),
                      "pinned_bytes": rt.plan.pinned_bytes})
    if total.peak_ledger_bytes > rt.budget:
        raise blockrt.BudgetError(f"peak ledger {total.peak_ledger_bytes} passed the budget {rt.budget}")
    if out is not None:
        rt.profile.save_trace(out / f"trace_{'retention' if retention else 'none'}.json")
        rt.profile.plot(out / f"timeline_{'retention' if retention else 'none'}.png",
                        title=f"STDiT3-XL/2 streamed, budget {budget}, retention {'on' if retention else 'off'}")
    return rows, last


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default="out/weights/random", help="where the random checkpoint is written once")
    ap.add_argument("--out", default="out/bench/stdit3")
    ap.add_argument("--budget", default="3.3GB")
    ap.add_argument("--passes", type=int, default=4, help="denoising forwards; retention starts after 2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny config in the same layout (smoke run)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    size = "tiny" if args.quick else "full"
    t0 = time.perf_counter()
    weights = write_random_checkpoints(Path(args.cache) / size, which=("stdit3",), size=size)["stdit3"]
    write_s = time.perf_counter() - t0
    cfg = STDiT3Config.from_dict(json.loads((weights / "config.json").read_text()))
    feed = inputs(cfg, 5, 20, 27, 20) if not args.quick else inputs(cfg, 2, 6, 7, 5)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_none, out_none = run(weights, cfg, feed, budget=args.budget, retention=False, passes=args.passes, out=out)
    rows_ret, out_ret = run(weights, cfg, feed, budget=args.budget, retention=True, passes=args.passes, out=out)
    if not torch.equal(out_none, out_ret):
        raise AssertionError("streamed outputs differ between the two runs")
    rows = rows_none + rows_ret
    print(f"STDiT3-{'XL/2' if not args.quick else 'tiny'}: {rows[0]['blocks']} blocks of "
          f"{rows[0]['block_bytes'] / 1e6:.0f} MB, pinned {rows[0]['pinned_bytes'] / 1e6:.0f} MB, checkpoint "
          f"{weights} (ready in {write_s:.0f} s); budget {args.budget}; loads throttled to "
          f"{IPHONE15PRO.read_bytes_per_s / 1e9:.2f} GB/s (iphone15pro); "
          f"{torch.get_num_threads()} torch threads; working set {rows[0]['working_set_bytes'] / 1e6:.0f} MB")
    print(f"{'retention':>9} {'pass':>4} {'wall_s':>7} {'load_s':>7} {'compute_s':>9} {'stall_s':>7} {'roofline':>8} "
          f"{'loaded MB':>9} {'reused MB':>9} {'held':>4}")
    for r in rows:
        print(f"{str(r['retention']):>9} {r['pass']:>4} {r['wall_s']:7.2f} {r['load_s']:7.2f} {r['compute_s']:9.2f} "
              f"{r['stall_s']:7.2f} {r['roofline_ratio']:8.2f} {r['bytes_loaded'] / 1e6:9.0f} "
              f"{r['bytes_reused'] / 1e6:9.0f} {r['retained_blocks']:>4}")
    for rs in (rows_none, rows_ret):
        r = rs[0]
        mb = lambda v: "-" if v is None else f"{v / 1e6:.0f} MB"  # noqa: E731
        print(f"retention {r['retention']}: peak_ledger_bytes {r['peak_ledger_bytes'] / 1e6:.0f} MB of "
              f"{r['budget'] / 1e6:.0f} MB; peak_rss_delta {mb(r['peak_rss_delta'])} (anon {mb(r['peak_anon_delta'])}, "
              f"file-backed {mb(r['peak_file_delta'])})")
    write_atomic(out / "results.json", lambda f: f.write(json.dumps(rows, indent=1).encode()))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    write_atomic(out / "results.csv", lambda f: f.write(buf.getvalue().encode()))
    print(f"wrote {out}/results.json, results.csv, trace_*.json, timeline_*.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
