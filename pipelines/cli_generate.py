"""``blockrt generate``: text to video with Open-Sora v1.2 under one budget, one prompt or a file of them.

Everything the run needs is checked before any work (``prepare``): the budget, the device profile, every
prompt's settings, the weights directory, the optional packages; then ``generate`` runs prompt after prompt.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from blockrt.budget import format_bytes
from blockrt.config import RunConfig
from blockrt.device import get_profile, resolve_budget
from blockrt.pipelines.opensora.pipeline import GenerateConfig
from blockrt.pipelines.sweep.spec import read_prompts

SHAPES_PROMPT = "a red circle moving right on a blue background"  # the built-in trained model's default
SHAPES_RESOLUTION = "64x64"
DEMO_CAPTIONS = ["a red circle moving left on a blue background", "a green square moving up on a white background",
                 "a yellow triangle moving right on a black background", "a blue circle moving down on a gray background"]


def prepare(args: argparse.Namespace, say: Any) -> tuple[list[GenerateConfig], bool]:
    """Fill the defaults, validate everything, warn about prompts the built-in model never saw; no work done.

    Returns the per-prompt configs and whether the built-in shapes model runs."""
    if args.random_weights and args.weights is not None:
        raise ValueError("--random-weights and --weights exclude each other; pass one")
    if args.prompt is not None and args.prompts is not None:
        raise ValueError("--prompt and --prompts exclude each other; pass one")
    shapes = args.weights is None and not args.random_weights  # the built-in trained model: its own defaults
    args.resolution = args.resolution or (SHAPES_RESOLUTION if shapes else "144p")
    args.aspect = args.aspect or ("1:1" if shapes else "3:4")
    if args.frames is None:
        from blockrt.pipelines.shapes.dataset import FRAMES

        args.frames = FRAMES if shapes else 17
    if args.cfg is None:
        from blockrt.pipelines.shapes.layout import CFG_SCALE

        args.cfg = CFG_SCALE if shapes else 7.0
    prompts = read_prompts(args.prompts) if args.prompts else [args.prompt or (SHAPES_PROMPT if shapes else DEMO_CAPTIONS[0])]
    resolve_budget(args.budget)  # "3.3 gigs" fails here, before anything is loaded or written
    if args.device_profile is not None:
        get_profile(args.device_profile)
    if args.weights is not None:
        from blockrt.pipelines.opensora.pipeline import DIRS

        missing = [d for d in DIRS.values() if not (Path(args.weights) / d).is_dir()]
        if missing:
            raise ValueError(f"--weights {args.weights} should hold {sorted(DIRS.values())}; missing {missing}; fix: "
                             "point --weights at the directory of the three downloads")
    configs = [GenerateConfig(prompt=p, resolution=args.resolution, aspect=args.aspect, frames=args.frames,
                              steps=args.steps, cfg_scale=args.cfg, seed=args.seed, lpl=args.lpl,
                              merge_steps=args.tdtm, merge_positions=args.tdtm_positions,
                              merge_blocks=args.tdtm_blocks, merge_when=args.tdtm_when) for p in prompts]
    if shapes:
        from blockrt.pipelines.shapes.dataset import parse_caption

        for p in prompts:
            try:
                parse_caption(p)
            except ValueError:
                say(f"warning: {p!r} is not a caption the built-in shapes model was trained on; it draws shapes "
                    f"from captions like {SHAPES_PROMPT!r} (circle/square/triangle, red/green/blue/yellow, "
                    "left/right/up/down, on black/white/gray/blue); expect an arbitrary video", err=True)
    return configs, shapes


def _weights(args: argparse.Namespace, shapes: bool, say: Any) -> Path:
    if args.random_weights:
        from blockrt.pipelines.opensora.random_weights import write_random_checkpoints
        from blockrt.pipelines.opensora.t5 import train_tiny_tokenizer

        cache = Path(args.cache)
        tok = cache / "tokenizer"
        if not (tok / "spiece.model").exists():
            train_tiny_tokenizer(DEMO_CAPTIONS * 25, tok, vocab_size=60)
        write_random_checkpoints(cache, size="tiny", t5_format="safetensors", tokenizer=tok)
        say(f"--random-weights: tiny RANDOM weights of the three models in the real layout ({cache}); "
            "the video is noise by construction.")
        return cache
    if shapes:
        from blockrt.pipelines.shapes.layout import WEIGHTS_DIR

        say(f"no --weights given: the small Open-Sora-architecture model trained here on synthetic shapes "
            f"({WEIGHTS_DIR}; prompts like {SHAPES_PROMPT!r}: circle/square/triangle, red/green/blue/yellow, "
            "left/right/up/down, on black/white/gray/blue). For Open-Sora v1.2 itself download "
            "OpenSora-STDiT-v3, OpenSora-VAE-v1.2 and t5-v1_1-xxl into one directory and pass --weights DIR "
            "--budget 3.3GB --resolution 240p.")
        return WEIGHTS_DIR
    return Path(args.weights)


def _clean(x: Any) -> Any:
    """JSON has no nan: None instead."""
    return None if isinstance(x, float) and math.isnan(x) else x


def generate(args: argparse.Namespace, say: Any, progress: Any) -> int:
    """Run every prompt; print a summary per video (or one JSON document with ``--json``)."""
    from blockrt.pipelines.opensora.pipeline import OpenSoraPipeline

    configs, shapes = prepare(args, say)
    weights = _weights(args, shapes, say)
    pipe = OpenSoraPipeline(weights, budget=args.budget,
                            config=RunConfig(device_profile=args.device_profile, exact_rss=True))  # owns its process
    out_dir = Path(args.out)
    records = []
    for i, cfg in enumerate(configs):
        folder = out_dir if len(configs) == 1 else out_dir / f"prompt-{i:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        result = pipe.generate(cfg, out=folder / "video.mp4", progress=progress)
        wall = time.perf_counter() - t0
        progress.close()
        calls = result.steps_run
        leap = f" (LPL: leapt after call {result.leapt_at + 1})" if result.leapt_at is not None else ""
        say(f"{cfg.prompt!r}: {cfg.frames} frames at {cfg.resolution} {cfg.aspect}, {calls} STDiT3 calls{leap}, "
            f"TDTM for {cfg.merge_steps} steps{_variant(cfg)}, budget {format_bytes(pipe.budget)}: {wall:.1f} s")
        for name, stage in result.stages.items():
            s = stage["summary"]
            say(f"  {name:<13} {s.passes:>3} passes  wall {s.wall_s:7.2f} s  roofline_ratio {s.roofline_ratio:5.2f}  "
                f"loaded {format_bytes(s.bytes_loaded):>10}  peak ledger {format_bytes(stage['peak_ledger_bytes'])}")
        whole = result.profile.summary()
        say(f"whole run: peak_ledger_bytes {format_bytes(whole.peak_ledger_bytes)} of {format_bytes(pipe.budget)}; "
            f"peak_rss_delta {format_bytes(whole.peak_rss_delta or 0)} (anon {format_bytes(whole.peak_anon_delta or 0)}"
            f", file-backed {format_bytes(whole.peak_file_delta or 0)})")
        record: dict[str, Any] = {"prompt": cfg.prompt, "video": str(result.path), "model_calls": calls,
                                  "leapt_at": result.leapt_at, "merge_steps": cfg.merge_steps,
                                  "merge_positions": cfg.merge_positions, "merge_blocks": cfg.merge_blocks,
                                  "merge_when": cfg.merge_when, "wall_s": wall,
                                  "budget": pipe.budget, "summary": {k: _clean(v) for k, v in whole.to_dict().items()},
                                  "stages": {n: {**{k: _clean(v) for k, v in st["summary"].to_dict().items()},
                                                 "peak_ledger_bytes": st["peak_ledger_bytes"]}
                                             for n, st in result.stages.items()}}
        if shapes:
            record["judge"] = _judge(result.video, cfg.prompt, say)
        written = [result.path]
        if args.trace:
            result.profile.save_trace(folder / "trace.json")
            result.profile.plot(folder / "timeline.png", title="Open-Sora: T5 -> STDiT3 -> VAE under one budget")
            written += [folder / "trace.json", folder / "timeline.png"]
        say("wrote " + ", ".join(str(p) for p in written))
        records.append(record)
    if args.json:
        json.dump(records[0] if len(records) == 1 else records, sys.stdout, indent=1)
        print()
    return 0


def _judge(video: Any, prompt: str, say: Any) -> dict[str, Any]:
    """What the shapes judge sees in the video, and whether the prompt says so."""
    from blockrt.pipelines.opensora.video import to_uint8_frames
    from blockrt.pipelines.shapes.judge import judge, matches

    v = judge(to_uint8_frames(video))
    try:
        ok: bool | None = matches(v, prompt)
        verdict = "matches the prompt" if ok else "does NOT match the prompt"
    except ValueError:
        ok, verdict = None, "the prompt is outside the training captions"
    say(f"judge: a {v.colour} {v.shape} moving {v.direction} on a {v.background} background: {verdict}")
    return {"colour": v.colour, "shape": v.shape, "direction": v.direction, "background": v.background, "matches": ok}


def _variant(cfg: GenerateConfig) -> str:
    """The TDTM variant where it is not the paper's (positions, blocks, steps), e.g. " (centre, spatial, last)"."""
    parts = [v for v, paper in ((cfg.merge_positions, "index"), (cfg.merge_blocks, "all"), (cfg.merge_when, "first"))
             if v != paper]
    return f" ({', '.join(parts)})" if parts and cfg.merge_steps else ""
