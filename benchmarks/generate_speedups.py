"""LPL / TDTM / CI-DL speedups of the STDiT stage, Table 5 style: one small config, one run, one machine.

Every row generates the same video (same prompt, seed, size) with ``OpenSoraPipeline`` and one acceleration
setting; the STDiT3 wall time of each is compared with the 30-step baseline without LPL or TDTM, and each
video with the baseline's video (PSNR, SSIM):

    baseline             30 steps, no LPL, no TDTM                       (the reference row)
    lpl16                FixedLeap(16): 16 model calls, then z + sigma_15 v_15 (the app's "leap at 16 of 30")
    lpl-dynamic          DynamicLeap() (the paper's cosine-similarity rule, the pipeline's defaults)
    tdtm15               TDTM on the first 15 of the 30 steps
    tdtm30               TDTM on all 30 steps
    lpl16+tdtm15+ci-dl   FixedLeap(16) and TDTM on the first 15 steps together (the app's default run)
    baseline-resident    the baseline with ``stream=False``: every model loaded whole, no blockrt

All rows but ``baseline-resident`` are streamed by blockrt under the same budget with CI-DL on: prefetch
(``prefetch_depth=1``, the next block loads while one computes) and retention (as many blocks as the budget
holds stay resident across steps), the loader throttled to a flash read bandwidth (the iPhone 15 Pro's,
1.45 GB/s, by default). The resident row therefore shows what CI-DL costs in time (and saves in memory).

Models: the three Open-Sora components written once, with random weights in the real layout, to
``out/weights/random/<name>`` (``write_random_checkpoints``): STDiT3 widened/deepened so it dominates the run
(default depth 8, hidden 256), tiny T5 and VAE. Random weights make PSNR/SSIM a measure of numerical
deviation from the baseline, not of video quality.

A warm-up generation (streamed and resident, 2 steps, TDTM on one) runs first; every row is timed; only after
all timing are the results checked: the streamed and resident baselines must give ``torch.equal`` videos,
each row the expected number of model calls, every stage's ledger peak within the budget.

Prints the hardware and the table; writes ``results.json`` and ``results.csv`` to ``--out``.

    .venv/bin/python benchmarks/generate_speedups.py            # ~4 min on the 2-core dev machine
    .venv/bin/python benchmarks/generate_speedups.py --quick    # tiny models, 6 steps (the smoke test)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from blockrt import RunConfig, get_profile
from blockrt.pipelines.opensora.pipeline import GenerateConfig, GenerateResult, OpenSoraPipeline
from blockrt.pipelines.opensora.resolution import latent_size, num_frames, resolve
from bench_common import BUSY_CORES, begin_run, release_freed_memory, write_results

ROOT = Path(__file__).resolve().parents[1]

PROMPT = "a red circle moving left on a blue background"
TOKENIZER_TEXTS = [PROMPT, "a green square moving up on a white background",
                   "a yellow triangle moving right on a black background", "a blue circle moving down"]
DEVICE_PROFILE = "iphone15pro"  # whose flash read the loader is throttled to by default
WEIGHTS_SEED = 0

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03

CSV_FIELDS = ("row", "stream", "lpl", "merge_steps", "steps", "model_calls", "merged_calls", "leapt_at",
              "stdit_wall_s", "stdit_wall_s_per_call", "speedup", "stdit_stage_s", "generate_s", "psnr_db",
              "ssim", "identical", "peak_ledger_bytes", "budget", "reused_fraction", "retained_blocks",
              "stdit_blocks", "stdit_load_s", "stdit_stall_s", "stdit_bytes_loaded", "stdit_bytes_reused",
              "peak_anon_delta")


# -- video similarity -------------------------------------------------------------------------------------


def to_unit(video: torch.Tensor) -> torch.Tensor:
    """A pipeline video ``[3, N, H, W]`` in [-1, 1] as frames ``[N, 3, H, W]`` in [0, 1], float64."""
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"expected a video [3, N, H, W], got {tuple(video.shape)}")
    return ((video.detach().double() + 1) / 2).clamp(0, 1).permute(1, 0, 2, 3)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of frames ``a`` vs ``b`` in [0, 1] (peak 1), over the whole video; inf when equal."""
    if a.shape != b.shape:
        raise ValueError(f"psnr: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    mse = float((a.double() - b.double()).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """The normalised 2-D gaussian ``[size, size]`` (float64) of Wang et al.'s SSIM."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x.pow(2) / (2 * sigma * sigma))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> float:
    """Mean SSIM of frames ``a`` vs ``b`` ``[N, C, H, W]`` in [0, data_range] (Wang et al. 2004).

    Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, computed per channel over the valid region (no padding),
    then averaged over pixels, channels and frames. 1.0 when equal.
    """
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"ssim: expected two [N, C, H, W] of one shape, got {tuple(a.shape)} vs {tuple(b.shape)}")
    n, c, h, w = a.shape
    if min(h, w) < SSIM_WINDOW:
        raise ValueError(f"ssim: frames of {h}x{w} are smaller than the {SSIM_WINDOW}x{SSIM_WINDOW} window")
    a, b = a.double(), b.double()
    win = gaussian_window().expand(c, 1, SSIM_WINDOW, SSIM_WINDOW)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, win, groups=c)

    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a.pow(2)
    var_b = blur(b * b) - mu_b.pow(2)
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a.pow(2) + mu_b.pow(2) + c1) * (var_a + var_b + c2))
    return float(s.mean(dim=(2, 3)).mean())  # per frame and channel, then averaged


# -- set-up -----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/bench/generate", help="directory for results.json/csv")
    p.add_argument("--weights", default=None,
                   help="random-weight cache root (default out/weights/random/<name of the model sizes>)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps of the baseline (default 30)")
    p.add_argument("--lpl-calls", type=int, default=None,
                   help="model calls of the fixed-LPL rows: FixedLeap(lpl_calls) (default 16)")
    p.add_argument("--merge", type=int, default=None, help="TDTM steps of the partial-merge rows (default 15)")
    p.add_argument("--depth", type=int, default=None, help="STDiT3 depth (default 8; --quick: the tiny 2)")
    p.add_argument("--hidden", type=int, default=None, help="STDiT3 hidden size (default 256; --quick: 64)")
    p.add_argument("--heads", type=int, default=None, help="STDiT3 heads (default hidden // 64; tiny: 4)")
    p.add_argument("--resolution", default="144p", help="resolution preset (default 144p)")
    p.add_argument("--aspect", default="1:1", help="aspect ratio (default 1:1: 192x192)")
    p.add_argument("--frames", type=int, default=17, help="video frames (default 17: 5 latent frames)")
    p.add_argument("--seed", type=int, default=42, help="sampling seed, the same for every row (default 42)")
    p.add_argument("--budget", default=None, help="the one budget of every streamed row (default 80MB; --quick 64MB)")
    p.add_argument("--bandwidth", type=float, default=None,
                   help=f"loader read bandwidth in GB/s (default {DEVICE_PROFILE}'s flash read)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for compute (default 1)")
    p.add_argument("--quick", action="store_true", help="tiny models, 6 steps, leap at 3 calls, merge 3: a smoke run")
    args = p.parse_args(argv)
    full = {"steps": 30, "lpl_calls": 16, "merge": 15, "depth": 8, "hidden": 256, "budget": "80MB"}
    small = {"steps": 6, "lpl_calls": 3, "merge": 3, "budget": "64MB"}
    for k, v in (small if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.heads is None and args.hidden is not None:
        args.heads = max(1, args.hidden // 64)
    for k in ("steps", "lpl_calls", "threads"):
        if getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}")
    if args.lpl_calls > args.steps:
        p.error(f"--lpl-calls must be <= --steps ({args.steps}), got {args.lpl_calls}")
    if not 0 <= args.merge <= args.steps:
        p.error(f"--merge must be in [0, --steps = {args.steps}], got {args.merge}")
    if args.bandwidth is not None and not (math.isfinite(args.bandwidth) and args.bandwidth > 0):
        p.error(f"--bandwidth must be a positive number of GB/s, got {args.bandwidth}")
    return args


def stdit_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """STDiT3 config fields replacing the tiny size's (empty: the tiny model as it is)."""
    o = {}
    if args.depth is not None:
        o["depth"] = args.depth
    if args.hidden is not None:
        o["hidden_size"] = args.hidden
    if args.heads is not None:
        o["num_heads"] = args.heads
    return o


def weights_name(overrides: dict[str, Any]) -> str:
    if not overrides:
        return "bench-generate-tiny"
    return "bench-generate-" + "-".join(f"{k}{v}" for k, v in sorted(overrides.items()))


def write_weights(root: Path, overrides: dict[str, Any]) -> dict[str, Path]:
    """The three components under ``root`` (tiny T5 and VAE, STDiT3 with ``overrides``), reused when complete."""
    from blockrt.pipelines.opensora.random_weights import write_random_checkpoints
    from blockrt.pipelines.opensora.t5 import train_tiny_tokenizer

    tok = root / "tokenizer"
    if not (tok / "spiece.model").is_file():  # trained once: the T5 checkpoint's marker records its hash
        train_tiny_tokenizer(TOKENIZER_TEXTS * 20, tok, vocab_size=60)
    return write_random_checkpoints(root, seed=WEIGHTS_SEED, size="tiny", t5_format="safetensors", tokenizer=tok,
                                    overrides={"stdit3": overrides} if overrides else None)


# -- timing -----------------------------------------------------------------------------------------------


class _TimedCalls:
    """Wraps the resident (``stream=False``) STDiT3: times every model call, as blockrt times every pass."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.call_s: list[float] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = self.inner(*args, **kwargs)
        self.call_s.append(time.perf_counter() - t0)
        return out

    def expect_last_pass(self) -> None:
        self.inner.expect_last_pass()

    def __enter__(self) -> "_TimedCalls":
        self.inner.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.inner.__exit__(*exc)


class TimedPipeline(OpenSoraPipeline):
    """``OpenSoraPipeline`` that also times its STDiT3 stage as a whole (``stage_s``: model set-up, runtime
    start and close, every step) and, without streaming, every STDiT3 call (``resident_call_s``)."""

    stage_s: float = math.nan
    resident_call_s: list[float]

    def _denoise(self, *args: Any, **kwargs: Any) -> Any:
        self.resident_call_s = []
        t0 = time.perf_counter()
        try:
            return super()._denoise(*args, **kwargs)
        finally:
            self.stage_s = time.perf_counter() - t0

    def _run(self, model: torch.nn.Module, weights: Path, **extra: Any) -> Any:
        from blockrt.pipelines.opensora.stdit3 import STDiT3

        rt = super()._run(model, weights, **extra)
        if not self.stream and isinstance(model, STDiT3):
            timed = _TimedCalls(rt)
            self.resident_call_s = timed.call_s
            return timed
        return rt


@dataclass(frozen=True)
class Row:
    name: str
    lpl: int | str | None
    merge_steps: int
    stream: bool = True


def rows_for(args: argparse.Namespace) -> list[Row]:
    leap = args.lpl_calls  # FixedLeap(k): k model calls
    m, n, c = args.merge, args.steps, args.lpl_calls
    return [
        Row("baseline", None, 0),
        Row(f"lpl{c}", leap, 0),
        Row("lpl-dynamic", "dynamic", 0),
        Row(f"tdtm{m}", None, m),
        Row(f"tdtm{n}", None, n),
        Row(f"lpl{c}+tdtm{m}+ci-dl", leap, m),
        Row("baseline-resident", None, 0, stream=False),
    ]


def run_row(row: Row, args: argparse.Namespace, weights: Path, run_cfg: RunConfig) -> tuple[GenerateResult, dict]:
    release_freed_memory()
    pipe = TimedPipeline(weights, budget=args.budget, config=run_cfg, stream=row.stream)
    cfg = GenerateConfig(PROMPT, resolution=args.resolution, aspect=args.aspect, frames=args.frames,
                         steps=args.steps, seed=args.seed, lpl=row.lpl, merge_steps=row.merge_steps)
    t0 = time.perf_counter()
    res = pipe.generate(cfg)
    gen_s = time.perf_counter() - t0
    whole = res.profile.summary()
    m: dict[str, Any] = {
        "stream": row.stream, "lpl": row.lpl, "merge_steps": row.merge_steps, "steps": args.steps,
        "model_calls": res.steps_run, "merged_calls": min(row.merge_steps, res.steps_run),
        "leapt_at": res.leapt_at, "stdit_stage_s": pipe.stage_s, "generate_s": gen_s,
        "peak_anon_delta": whole.peak_anon_delta, "peak_rss_delta": whole.peak_rss_delta,
    }
    if row.stream:
        st = res.stages["stdit3"]
        s = st["summary"]
        if s.passes != res.steps_run:
            raise RuntimeError(f"{row.name}: blockrt counted {s.passes} STDiT3 passes for {res.steps_run} model calls")
        m.update(stdit_wall_s=s.wall_s, peak_ledger_bytes=st["peak_ledger_bytes"], budget=pipe.budget,
                 reused_fraction=s.bytes_reused / max(1, s.bytes_reused + s.bytes_loaded),
                 retained_blocks=len(st["retained"]), stdit_blocks=st["blocks"], stdit_load_s=s.load_s,
                 stdit_compute_s=s.compute_s, stdit_stall_s=s.stall_s, stdit_bytes_loaded=s.bytes_loaded,
                 stdit_bytes_reused=s.bytes_reused, stdit_roofline_ratio=s.roofline_ratio,
                 stage_peak_ledger_bytes={k: v["peak_ledger_bytes"] for k, v in res.stages.items()})
    else:
        if len(pipe.resident_call_s) != res.steps_run:
            raise RuntimeError(f"{row.name}: timed {len(pipe.resident_call_s)} STDiT3 calls for {res.steps_run}")
        m.update(stdit_wall_s=sum(pipe.resident_call_s), peak_ledger_bytes=None, budget=None, reused_fraction=None,
                 retained_blocks=None, stdit_blocks=None, stdit_load_s=None, stdit_compute_s=None,
                 stdit_stall_s=None, stdit_bytes_loaded=None, stdit_bytes_reused=None, stdit_roofline_ratio=None,
                 stage_peak_ledger_bytes=None)
    m["stdit_wall_s_per_call"] = m["stdit_wall_s"] / res.steps_run
    return res, m


def check(rows: list[Row], results: dict[str, dict], videos: dict[str, torch.Tensor], args: argparse.Namespace,
          budget: int) -> None:
    """After all timing: the resident baseline equals the streamed one bit for bit, every row made the model
    calls its setting implies, every streamed stage stayed within the budget, every video is finite."""
    if not torch.equal(videos["baseline"], videos["baseline-resident"]):
        raise RuntimeError("the streamed baseline's video differs from the resident (stream=False) one: "
                           "blockrt changed the numbers; the timings compare different computations")
    for row in rows:
        m = results[row.name]
        if not torch.isfinite(videos[row.name]).all():
            raise RuntimeError(f"{row.name}: the video has non-finite values")
        if row.lpl is None:
            want = args.steps
        elif row.lpl == "dynamic":
            want = m["model_calls"] if m["leapt_at"] is None else m["leapt_at"] + 1
            if m["leapt_at"] is None and m["model_calls"] != args.steps:
                raise RuntimeError(f"{row.name}: no leap but {m['model_calls']} of {args.steps} model calls")
        else:
            want = row.lpl
            if m["leapt_at"] != row.lpl - 1:
                raise RuntimeError(f"{row.name}: FixedLeap({row.lpl}) leapt at {m['leapt_at']}")
        if m["model_calls"] != want:
            raise RuntimeError(f"{row.name}: {m['model_calls']} model calls, expected {want}")
        for stage, peak in (m["stage_peak_ledger_bytes"] or {}).items():
            if peak > budget:
                raise RuntimeError(f"{row.name}: stage {stage} peaked at {peak} ledger bytes over the budget {budget}")


# -- output -----------------------------------------------------------------------------------------------


def _mb(x: int | None) -> str:
    return "-" if x is None else f"{x / 1e6:.1f}"


def table(rows: list[Row], results: dict[str, dict]) -> str:
    head = (f"{'row':<22} {'stream':>6} {'calls':>5} {'merged':>6} {'leap@':>5} {'STDiT wall':>10} {'per call':>8} "
            f"{'speedup':>7} {'stage':>7} {'PSNR':>7} {'SSIM':>7} {'ledger':>7} {'reused':>6} {'kept@end':>8} "
            f"{'anon':>6}")
    units = (f"{'':<22} {'':>6} {'':>5} {'':>6} {'':>5} {'s':>10} {'ms':>8} {'x':>7} {'s':>7} {'dB':>7} {'':>7} "
             f"{'MB':>7} {'%':>6} {'blk':>8} {'MB':>6}")
    lines = [head, units]
    for row in rows:
        m = results[row.name]
        leap = "-" if m["leapt_at"] is None else str(m["leapt_at"])
        p = "inf" if math.isinf(m["psnr_db"]) else f"{m['psnr_db']:.2f}"
        kept = "-" if m["retained_blocks"] is None else f"{m['retained_blocks']}/{m['stdit_blocks']}"
        reused = "-" if m["reused_fraction"] is None else f"{100 * m['reused_fraction']:.0f}"
        lines.append(
            f"{row.name:<22} {'yes' if row.stream else 'no':>6} {m['model_calls']:>5} {m['merged_calls']:>6} "
            f"{leap:>5} {m['stdit_wall_s']:10.2f} {m['stdit_wall_s_per_call'] * 1e3:8.0f} {m['speedup']:7.2f} "
            f"{m['stdit_stage_s']:7.2f} {p:>7} {m['ssim']:7.4f} {_mb(m['peak_ledger_bytes']):>7} {reused:>6} {kept:>8} "
            f"{_mb(m['peak_anon_delta']):>6}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir, hw, other = begin_run(args.threads, args.out)

    overrides = stdit_overrides(args)
    root = Path(args.weights) if args.weights else ROOT / "out" / "weights" / "random" / weights_name(overrides)
    t0 = time.perf_counter()
    dirs = write_weights(root, overrides)
    stdit_cfg = json.loads((dirs["stdit3"] / "config.json").read_text())
    stdit_bytes = (dirs["stdit3"] / "model.safetensors").stat().st_size
    h, w = resolve(args.resolution, args.aspect)
    lt, lh, lw = latent_size(num_frames(args.frames), h, w)
    bandwidth = args.bandwidth * 1e9 if args.bandwidth is not None else get_profile(DEVICE_PROFILE).read_bytes_per_s
    run_cfg = RunConfig(prefetch_depth=1, retention=True, read_bytes_per_s=bandwidth)
    print(f"weights: {root} (random, seed {WEIGHTS_SEED}; ready in {time.perf_counter() - t0:.1f} s): STDiT3 depth "
          f"{stdit_cfg['depth']}, hidden {stdit_cfg['hidden_size']}, {stdit_cfg['num_heads']} heads, "
          f"{stdit_bytes / 1e6:.1f} MB; tiny T5 and VAE")
    print(f"video: {args.resolution} {args.aspect} = {h}x{w}, {args.frames} frames (latent {lt}x{lh}x{lw}), "
          f"seed {args.seed}, cfg 7.0, CFG batch 2; prompt {PROMPT!r}")
    print(f"streamed rows: budget {args.budget}, prefetch_depth 1, retention on, loader read {bandwidth / 1e9:.2f} "
          f"GB/s (throttled); torch threads {args.threads}", flush=True)

    # warm-up: page cache, kernels, allocator; both the plain and the merged forward, streamed and resident
    t0 = time.perf_counter()
    for stream in (True, False):
        TimedPipeline(root, budget=args.budget, config=run_cfg, stream=stream).generate(GenerateConfig(
            PROMPT, resolution=args.resolution, aspect=args.aspect, frames=args.frames, steps=2, seed=args.seed,
            merge_steps=1))
    print(f"warm-up (2 steps, streamed and resident): {time.perf_counter() - t0:.1f} s", flush=True)

    rows = rows_for(args)
    results: dict[str, dict] = {}
    videos: dict[str, torch.Tensor] = {}
    other.start()
    t_rows = time.perf_counter()
    for row in rows:
        res, m = run_row(row, args, root, run_cfg)
        results[row.name], videos[row.name] = m, res.video
        print(f"  {row.name:<22} {m['model_calls']:>3} calls, STDiT {m['stdit_wall_s']:7.2f} s, "
              f"generate {m['generate_s']:7.2f} s", flush=True)
    rows_s = time.perf_counter() - t_rows
    busy = other.cores()
    hw["other_cpu_cores_during"] = busy

    # after timing: similarity to the baseline, then the correctness checks
    base = results["baseline"]
    ref = to_unit(videos["baseline"])
    for row in rows:
        m = results[row.name]
        v = to_unit(videos[row.name])
        m["psnr_db"], m["ssim"] = psnr(v, ref), ssim(v, ref)
        m["identical"] = bool(torch.equal(videos[row.name], videos["baseline"]))
        m["speedup"] = base["stdit_wall_s"] / m["stdit_wall_s"]
    budget = OpenSoraPipeline(root, budget=args.budget).budget
    check(rows, results, videos, args, budget)

    print(f"rows: {rows_s:.1f} s; other processes used {busy:.2f} cores meanwhile")
    if busy > BUSY_CORES:
        print(f"warning: other processes used {busy:.2f} of {hw['cores']} cores during the run: the timings are "
              "disturbed; rerun on a quiet machine")
    print(table(rows, results))
    resident = results["baseline-resident"]
    legend = [
        "STDiT wall: the sum of the STDiT3 model calls' walls (blockrt's pass walls; resident: each call timed).",
        "speedup: baseline STDiT wall / the row's. stage: the whole STDiT3 stage (model set-up, runtime start and",
        "  close, sampler). PSNR/SSIM: the row's video vs the baseline's (same seed), frames in [0, 1]; SSIM with a",
        "  gaussian window 11 / sigma 1.5, averaged over frames and channels.",
        f"ledger: the STDiT3 stage's peak (weights held + measured working set; budget {args.budget}). reused: share",
        "  of the STDiT3 block bytes served by retained blocks instead of loads (steps 0-1 are blockrt's measuring",
        "  passes, step 2 loads the retained blocks once). kept@end: STDiT3 blocks retained at the end.",
        "  anon: the whole generate's peak anonymous RSS delta (T5 and VAE stages included).",
        f"lpl{args.lpl_calls}: FixedLeap({args.lpl_calls}), the leap at 0-based step index {args.lpl_calls - 1}: "
        f"{args.lpl_calls} model calls of {args.steps}, then z + sigma v (one jump to t=0).",
        "lpl-dynamic: DynamicLeap() defaults (compares from model call 15, tol 1e-3, patience 3). leap@: 0-based.",
        f"CI-DL: streamed baseline STDiT wall / resident = {base['stdit_wall_s'] / resident['stdit_wall_s']:.2f}x;"
        f" STDiT3 weights {stdit_bytes / 1e6:.1f} MB; whole-generate anon delta",
        f"  {_mb(base['peak_anon_delta'])} MB streamed vs {_mb(resident['peak_anon_delta'])} MB resident.",
    ]
    print("\n".join(legend))
    print("checks after timing: the streamed and resident baselines' videos are torch.equal; every row made the\n"
          "  expected model calls; every streamed stage stayed within the budget.")
    print(f"NOTE: random weights. PSNR/SSIM measure the numerical deviation of each setting from the "
          f"{args.steps}-step\noutput, not video quality (the trained small model of a later issue will give "
          "meaningful quality).")

    results_doc = {
        "hardware": hw,
        "config": {"quick": args.quick, "steps": args.steps, "lpl_calls": args.lpl_calls,
                   "fixed_leap_at": args.lpl_calls - 1, "merge": args.merge, "resolution": args.resolution,
                   "aspect": args.aspect, "height": h, "width": w, "frames": args.frames,
                   "latent": [lt, lh, lw], "seed": args.seed, "prompt": PROMPT, "cfg_scale": 7.0,
                   "budget": args.budget, "budget_bytes": budget, "read_bytes_per_s": bandwidth,
                   "prefetch_depth": 1, "retention": True, "threads": args.threads, "weights": str(root),
                   "weights_seed": WEIGHTS_SEED, "stdit3": stdit_cfg, "stdit3_bytes": stdit_bytes,
                   "dynamic_leap": "DynamicLeap() defaults: start 15, tol 1e-3, patience 3, similarity 'latent'"},
        "definitions": {
            "stdit_wall_s": "sum of the STDiT3 model calls' wall times (blockrt pass walls; resident: timed calls)",
            "speedup": "baseline stdit_wall_s / the row's",
            "stdit_stage_s": "the whole STDiT3 stage: model set-up, runtime start/close, sampler, every call",
            "psnr_db": "vs the baseline video, frames in [0,1]; null (inf) when identical",
            "ssim": "vs the baseline video; gaussian window 11, sigma 1.5, mean over frames and channels",
            "note": "random weights: PSNR/SSIM measure numerical deviation, not quality",
        },
        "rows_s": rows_s,
        "rows": results,
    }
    write_results(out_dir, results_doc, ({"row": name, **m} for name, m in results_doc["rows"].items()), CSV_FIELDS)
    print(f"wrote {out_dir / 'results.json'}, {out_dir / 'results.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
