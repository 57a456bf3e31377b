"""Full-size Open-Sora v1.2 (T5-v1.1-XXL + STDiT3-XL/2 + VAE v1.2) end to end under ``budget="3.3GB"``.

Writes random weights in the real layout once into a cache (``write_random_checkpoints``: T5-v1.1-XXL 4.76 B
parameters as safetensors shards, 19 GB; STDiT3-XL/2 1.1 B, 4.8 GB; VAE v1.2 0.39 B, 1.6 GB; a small
SentencePiece tokenizer stands in for T5's), then runs ``OpenSoraPipeline`` from a prompt to an mp4 at a small
size with few steps (default 144p 3:4, 17 frames, 5 steps with LPL after 4 STDiT3 calls, then the leap;
four, so that STDiT3's retention works: passes 0 and 1 measure, pass 2 loads the retained blocks, pass 3 reuses them),
every model streamed by blockrt under one budget. Reports per stage (T5, STDiT3, VAE temporal decoder, VAE
spatial decoder) and for the whole run: peak ledger, peak RSS delta (anonymous and file-backed apart), bytes
loaded, ``roofline_ratio``, wall time. Exits 1 with a message naming the stage if the ledger ever passed the
budget, or if the whole run's growth of anonymous memory did (heap and tensors: what iOS charges an app; see
``blockrt.memory``). The growth of the whole RSS (anonymous + clean file-backed pages, such as library code
first touched during the run, which the OS drops at will) is reported against the budget too, with its
margin and what it holds beyond the ledger at its peak, and flagged when it passes the budget.

Work at the defaults (FLOPs, 2 per multiply-add): T5-XXL over 300 tokens about 2.8 TFLOP (4.63 B non-embedding
weights x 300); STDiT3 about 3.1 TFLOP per CFG call (1.1 B block weights x 2 x 700 latent tokens); the VAE
decoders about 1 TFLOP for 17 frames at 144 x 192. At ~0.14 TFLOP/s (2 cores) about 3-5 min of compute.

    .venv/bin/python benchmarks/fullscale.py                # ~25 GB of disk once (~1-2 min), then ~5-9 min
    .venv/bin/python benchmarks/fullscale.py --size tiny    # the same code path on tiny models (seconds)

Writes ``results.json``, ``results.csv``, ``video.mp4``, ``trace.json`` and ``timeline.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import bisect
import gc
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from blockrt import RunConfig
from blockrt.memory import read_rss
from blockrt.profile import Profile
from blockrt.pipelines.opensora import loading
from blockrt.pipelines.opensora.pipeline import DIRS, GenerateConfig, OpenSoraPipeline
from blockrt.pipelines.opensora.random_weights import write_random_checkpoints
from blockrt.pipelines.opensora.t5 import train_tiny_tokenizer
from bench_common import OtherCpu, hardware, release_freed_memory, write_results

CAPTIONS = ["a red circle moving left on a blue background", "a green square moving up on a white background",
            "a yellow triangle moving right on a black background", "a blue circle moving down on a gray background",
            "a drone shot of waves crashing against rugged cliffs at sunset",
            "a cat sleeping on a wooden table next to a window, soft morning light"]
PROMPT = CAPTIONS[4]
TOKENIZER_VOCAB = 200  # an upper bound: the small corpus gives fewer pieces
STAGES = ("t5", "stdit3", "vae_temporal", "vae_spatial")
STAGE_NAMES = {"t5": "T5-v1.1-XXL encoder", "stdit3": "STDiT3-XL/2", "vae_temporal": "VAE temporal decoder",
               "vae_spatial": "VAE spatial decoder"}
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
FIELDS = ("stage", "params", "stream_bytes", "blocks", "retained", "passes", "stage_s", "wall_s", "load_s",
          "compute_s", "stall_s", "roofline_ratio", "bytes_loaded", "bytes_reused", "peak_ledger_bytes", "budget",
          "peak_rss_delta", "peak_anon_delta", "peak_file_delta", "ledger_ok")


def prepare_weights(cache: Path, size: str) -> Path:
    """Random weights of all three models in the real layout under ``cache/size`` (written once, then reused).

    The tokenizer is trained once into ``cache/size/tokenizer``; where the T5 directory already holds one, that
    copy is used, so the cached 19 GB T5 checkpoint (whose marker records the tokenizer's hash) stays valid.
    """
    root = Path(cache) / size
    in_t5 = root / DIRS["t5"]
    tok = in_t5 if (in_t5 / "spiece.model").is_file() else root / "tokenizer"
    if not (tok / "spiece.model").is_file():
        train_tiny_tokenizer(CAPTIONS * 25, tok, vocab_size=TOKENIZER_VOCAB)
    write_random_checkpoints(root, size=size, t5_format="safetensors", tokenizer=tok)
    return root


def stage_sizes(root: Path) -> dict[str, dict[str, int]]:
    """Per stage, the streamed module's parameters and bytes, and each checkpoint's totals (models on meta)."""
    t5 = loading.load_t5(root / DIRS["t5"]).model
    stdit = loading.load_stdit3(root / DIRS["stdit3"]).model
    vae = loading.load_vae(root / DIRS["vae"]).model
    modules = {"t5": t5, "stdit3": stdit, "vae_temporal": vae.temporal_vae.decoder,
               "vae_spatial": vae.spatial_vae.module.decoder}

    def size(m: torch.nn.Module) -> dict[str, int]:
        tensors = {id(t): t for t in list(m.parameters()) + list(m.buffers())}.values()  # tied ones once
        return {"params": sum(p.numel() for p in m.parameters()),
                "stream_bytes": sum(t.numel() * t.element_size() for t in tensors)}

    out = {name: size(m) for name, m in modules.items()}
    out["checkpoints"] = {"params": sum(size(m)["params"] for m in (t5, stdit, vae)),
                          "stream_bytes": sum(size(m)["stream_bytes"] for m in (t5, stdit, vae))}
    return out


def _value_at(series: list[tuple[float, float]], t: float) -> float | None:
    """The last sample of a counter at or before ``t`` (series sorted here), None if none is."""
    s = sorted(series)
    i = bisect.bisect_right([x for x, _ in s], t)
    return s[i - 1][1] if i else None


def at_rss_peak(profile: Profile) -> dict[str, Any]:
    """What the process held at the whole run's sampled RSS peak: the ledger then, anon and file-backed RSS,
    all as growth over the run's first RSS sample (the baseline), and the part of RSS no ledger accounts for."""
    c = profile.counters
    rss = c.get("rss_bytes", [])
    if not rss:
        return {}
    base_t, base = min(rss)
    t, peak = max(rss, key=lambda s: s[1])
    anon, file = c.get("rss_anon_bytes", []), c.get("rss_file_bytes", [])
    a0, f0 = _value_at(anon, base_t), _value_at(file, base_t)
    a, f = _value_at(anon, t), _value_at(file, t)
    ledger = _value_at(c.get("ledger_bytes", []), t) or 0.0
    return {"t_s": t, "rss_delta": int(peak - base), "ledger_bytes": int(ledger),
            "anon_delta": None if a is None or a0 is None else int(a - a0),
            "file_delta": None if f is None or f0 is None else int(f - f0),
            "beyond_ledger": int(peak - base - ledger)}


def stage_row(name: str, stage: dict[str, Any], sizes: dict[str, int], budget: int) -> dict[str, Any]:
    s = stage["summary"]
    return {"stage": name, **sizes, "blocks": stage["blocks"], "retained": len(stage["retained"]),
            "passes": s.passes, "stage_s": stage["stage_s"], "wall_s": s.wall_s, "load_s": s.load_s,
            "compute_s": s.compute_s, "stall_s": s.stall_s, "roofline_ratio": s.roofline_ratio,
            "bytes_loaded": s.bytes_loaded, "bytes_reused": s.bytes_reused,
            "peak_ledger_bytes": max(stage["peak_ledger_bytes"], s.peak_ledger_bytes), "budget": budget,
            "peak_rss_delta": s.peak_rss_delta, "peak_anon_delta": s.peak_anon_delta,
            "peak_file_delta": s.peak_file_delta,
            "ledger_ok": max(stage["peak_ledger_bytes"], s.peak_ledger_bytes) <= budget}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Prepare the weights, generate once, and return every figure (nothing printed)."""
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    root = prepare_weights(Path(args.cache), args.size)
    weights_s = time.perf_counter() - t0
    sizes = stage_sizes(root)
    gen = GenerateConfig(args.prompt, resolution=args.resolution, aspect=args.aspect, frames=args.frames,
                         steps=args.steps, lpl=args.lpl, merge_steps=args.merge_steps, seed=args.seed)
    config = RunConfig(device_profile=args.profile, exact_rss=True)  # RSS is measured: the process follows the ledger
    pipe = OpenSoraPipeline(root, budget=args.budget, config=config)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    release_freed_memory()
    process_before = read_rss()
    other = OtherCpu().start()
    t1 = time.perf_counter()
    result = pipe.generate(gen, out=out / "video.mp4")
    total_s = time.perf_counter() - t1
    other_cores = other.cores()
    whole = result.profile
    s = whole.summary()
    rows = [stage_row(n, result.stages[n], sizes[n], pipe.budget) for n in STAGES if n in result.stages]
    ledger_peak = max([s.peak_ledger_bytes] + [r["peak_ledger_bytes"] for r in rows])
    rows.append({"stage": "whole", **sizes["checkpoints"], "blocks": sum(r["blocks"] for r in rows),
                 "retained": sum(r["retained"] for r in rows), "passes": s.passes, "stage_s": total_s,
                 "wall_s": s.wall_s, "load_s": s.load_s, "compute_s": s.compute_s, "stall_s": s.stall_s,
                 "roofline_ratio": s.roofline_ratio, "bytes_loaded": s.bytes_loaded, "bytes_reused": s.bytes_reused,
                 "peak_ledger_bytes": ledger_peak, "budget": pipe.budget, "peak_rss_delta": s.peak_rss_delta,
                 "peak_anon_delta": s.peak_anon_delta, "peak_file_delta": s.peak_file_delta,
                 "ledger_ok": ledger_peak <= pipe.budget})
    whole.save_trace(out / "trace.json")
    whole.plot(out / "timeline.png", title=f"Open-Sora v1.2 ({args.size}) end to end, budget {args.budget}, "
                                           f"{args.resolution} {args.frames} frames, {result.steps_run} STDiT3 calls")
    rss_delta = s.peak_rss_delta
    process = {"rss_before_bytes": process_before.rss, "anon_before_bytes": process_before.anon,
               "peak_rss_bytes": None if rss_delta is None else process_before.rss + rss_delta,
               "rss_margin_bytes": None if rss_delta is None else pipe.budget - rss_delta,
               "rss_within_budget": rss_delta is None or rss_delta <= pipe.budget, "at_rss_peak": at_rss_peak(whole)}
    anon = s.peak_anon_delta if s.peak_anon_delta is not None else rss_delta  # no split known: all of RSS counts
    process.update({"anon_margin_bytes": None if anon is None else pipe.budget - anon,
                    "anon_ok": anon is None or anon <= pipe.budget})
    hw = {**hardware(), "other_cpu_cores_during": other_cores}
    return {"benchmark": "fullscale", "hardware": hw, "size": args.size, "budget": args.budget,
            "budget_bytes": pipe.budget, "weights": str(root), "weights_ready_s": weights_s,
            "generate": {"prompt": gen.prompt, "resolution": gen.resolution, "aspect": gen.aspect,
                         "frames": gen.frames, "steps": gen.steps, "lpl": gen.lpl, "merge_steps": gen.merge_steps,
                         "seed": gen.seed, "steps_run": result.steps_run, "leapt_at": result.leapt_at,
                         "video_shape": list(result.video.shape)},
            "run_config": {"prefetch_depth": config.prefetch_depth, "retention": config.retention,
                           "device_profile": args.profile, "threads": torch.get_num_threads()},
            "malloc_env": {k: os.environ.get(k) for k in MALLOC_ENV}, "other_cpu_cores": other_cores,
            "rows": rows, "process": process, "stray_prefetch_bytes": rows[-1]["bytes_loaded"] - sum(
                r["bytes_loaded"] for r in rows[:-1]), "video": str(out / "video.mp4"),
            "command": " ".join(["benchmarks/fullscale.py"] + sys.argv[1:])}


def failures(results: dict[str, Any]) -> list[str]:
    """What broke the budget: every stage whose ledger passed it, and the whole run's anonymous memory growth."""
    budget = results["budget_bytes"]
    msgs = [f"{r['stage']}: peak ledger {r['peak_ledger_bytes'] / 1e6:.1f} MB passed the budget {budget / 1e6:.1f} MB"
            for r in results["rows"] if not r["ledger_ok"]]
    p = results["process"]
    if not p["anon_ok"]:
        whole = results["rows"][-1]
        msgs.append(f"whole run: peak anonymous memory growth {_mb(whole['peak_anon_delta'])} passed the budget "
                    f"{budget / 1e6:.1f} MB (RSS {_mb(whole['peak_rss_delta'])}, file-backed {_mb(whole['peak_file_delta'])})")
    return msgs


def _mb(v: float | None) -> str:
    return "-" if v is None else f"{v / 1e6:.0f} MB"


def _margin(v: float | None) -> str:
    """Bytes under the budget, or "OVER by ..." (to the kB: a margin of a few pages is not rounded away)."""
    if v is None:
        return "-"
    return f"{v / 1e6:.1f} MB under the budget" if v >= 0 else f"OVER the budget by {-v / 1e3:.0f} kB"


def report(results: dict[str, Any]) -> str:
    hw, g = results["hardware"], results["generate"]
    lines = [f"hardware: {hw['cpu']}, {hw['cores']} cores, torch {hw['torch']} ({results['run_config']['threads']} "
             f"threads); other processes used {results['other_cpu_cores']:.2f} cores during the run",
             f"weights: {results['weights']} ({results['size']}, ready in {results['weights_ready_s']:.0f} s); "
             f"budget {results['budget']} = {results['budget_bytes'] / 1e6:.0f} MB; loads "
             f"{'throttled to ' + results['run_config']['device_profile'] if results['run_config']['device_profile'] else 'unthrottled'}",
             f"generate: {g['resolution']} {g['aspect']}, {g['frames']} frames, {g['steps']} steps, lpl {g['lpl']}: "
             f"{g['steps_run']} STDiT3 calls, video {g['video_shape']} -> {results['video']}",
             f"{'stage':<13} {'params':>7} {'blocks':>6} {'held':>4} {'passes':>6} {'stage s':>8} {'pass s':>7} {'load s':>7} "
             f"{'comp s':>7} {'roofl':>5} {'loaded':>8} {'ledger':>8} {'rss d':>8} {'anon d':>8} {'file d':>7}",
             f"{'':<13} {'B':>7} {'':>6} {'':>4} {'':>6} {'':>8} {'':>7} {'':>7} {'':>7} {'':>5} {'GB':>8} {'MB':>8} "
             f"{'MB':>8} {'MB':>8} {'MB':>7}"]
    for r in results["rows"]:
        lines.append(f"{r['stage']:<13} {r['params'] / 1e9:7.3f} {r['blocks']:>6} {r['retained']:>4} {r['passes']:>6} {r['stage_s']:8.1f} "
                     f"{r['wall_s']:7.1f} {r['load_s']:7.1f} {r['compute_s']:7.1f} {r['roofline_ratio']:5.2f} "
                     f"{r['bytes_loaded'] / 1e9:8.2f} {r['peak_ledger_bytes'] / 1e6:8.0f} "
                     f"{_mb(r['peak_rss_delta'])[:-3]:>8} {_mb(r['peak_anon_delta'])[:-3]:>8} "
                     f"{_mb(r['peak_file_delta'])[:-3]:>7}")
    p, pk = results["process"], results["process"]["at_rss_peak"]
    whole = results["rows"][-1]
    lines.append(f"whole run: {whole['stage_s']:.1f} s; peak ledger {whole['peak_ledger_bytes'] / 1e6:.0f} MB of "
                 f"{results['budget_bytes'] / 1e6:.0f} MB; peak anon growth {_mb(whole['peak_anon_delta'])} (margin "
                 f"{_margin(p['anon_margin_bytes'])}); peak RSS growth {_mb(whole['peak_rss_delta'])} (margin "
                 f"{_margin(p['rss_margin_bytes'])}); process RSS {_mb(p['rss_before_bytes'])} "
                 f"before (interpreter, torch, transformers, diffusers), {_mb(p['peak_rss_bytes'])} at peak")
    if results["stray_prefetch_bytes"]:
        lines.append(f"whole run's bytes loaded include {_mb(results['stray_prefetch_bytes'])} of block-0 prefetches "
                     "for passes that never came (each stage's last prefetch; the per-stage rows leave them out)")
    if pk:
        lines.append(f"at the RSS peak ({pk['t_s']:.1f} s): growth {_mb(pk['rss_delta'])} = ledger {_mb(pk['ledger_bytes'])} "
                     f"+ {_mb(pk['beyond_ledger'])} no ledger counts (allocator slack, kernel scratch, tensors held "
                     f"between stages, pages of code touched for the first time); anon {_mb(pk['anon_delta'])}, "
                     f"file-backed {_mb(pk['file_delta'])}")
    if any(results["malloc_env"].get(k) != v for k, v in MALLOC_ENV.items()):
        lines.append("note: set " + " ".join(f"{k}={v}" for k, v in MALLOC_ENV.items()) +
                     " at process start (as make does) for RSS figures free of glibc's heap drift")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("full", "tiny"), default="full")
    ap.add_argument("--cache", default="out/weights/random", help="random checkpoints are written once under CACHE/SIZE")
    ap.add_argument("--out", default="out/bench/fullscale")
    ap.add_argument("--budget", default="3.3GB")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--resolution", default="144p")
    ap.add_argument("--aspect", default="3:4")
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--lpl", type=int, default=4, help="STDiT3 calls before the LPL leap (FixedLeap(lpl))")
    ap.add_argument("--merge-steps", type=int, default=0, help="TDTM for the first N steps")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", default=None, help="throttle loads to a device profile's read speed (iphone15pro)")
    args = ap.parse_args(argv)
    results = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_results(out, results, results["rows"], FIELDS)
    print(report(results))
    print(f"wrote {out}/results.json, results.csv, trace.json, timeline.png, video.mp4")
    gc.collect()
    bad = failures(results)
    for m in bad:
        print(f"FAIL: {m}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
