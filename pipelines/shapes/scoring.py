"""Scoring a set of shapes videos against their captions and reference videos: the quality benchmark's columns.

Shared by ``benchmarks/quality.py`` (videos made in memory) and the sweep report (``pipelines/sweep``, videos
read back from a sweep's output folder), so both compute fidelity, flicker, PSNR and SSIM the same way.
``QUALITY_PROMPTS`` are the benchmark's 12 captions (one per colour x shape x direction mix).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from blockrt.pipelines.shapes.dataset import parse_caption
from blockrt.pipelines.shapes.judge import flicker, judge, matches, psnr, ssim

QUALITY_PROMPTS = [
    "a red circle moving right on a blue background",
    "a green square moving left on a white background",
    "a blue triangle moving up on a gray background",
    "a yellow circle moving down on a black background",
    "a red square moving up on a white background",
    "a green triangle moving down on a blue background",
    "a blue circle moving left on a black background",
    "a yellow square moving right on a gray background",
    "a red triangle moving left on a black background",
    "a green circle moving up on a gray background",
    "a blue square moving down on a white background",
    "a yellow triangle moving right on a blue background",
]


def mean_psnr(values: list[float]) -> float:
    """The mean of the finite PSNRs (dB); inf when every video equals its reference."""
    finite = [p for p in values if math.isfinite(p)]
    return float("inf") if not finite else float(np.mean(finite))


def score(videos: list[np.ndarray], refs: list[np.ndarray], captions: list[str], shape: bool = True) -> dict[str, Any]:
    """Judge uint8 videos ``[T, H, W, 3]`` against their captions and same-seed reference videos.

    Returns ``matches`` (per video), ``fidelity`` (shape, colour and direction all the caption's; colour and
    direction only when ``shape`` is False), ``colour_accuracy``,
    ``direction_accuracy``, ``shape_accuracy``, ``flicker`` (0..255), ``psnr_db`` (inf: all identical), ``ssim`` and ``detected``
    (what the judge saw, per video). Every caption must be one the shapes model was trained on."""
    if not (len(videos) == len(refs) == len(captions)) or not videos:
        raise ValueError(f"need one reference and one caption per video (and at least one video); got "
                         f"{len(videos)} videos, {len(refs)} references, {len(captions)} captions")
    verdicts = [judge(v) for v in videos]
    want = [parse_caption(c) for c in captions]
    m: dict[str, Any] = {}
    m["matches"] = [matches(v, c, shape) for v, c in zip(verdicts, captions)]  # per video, in the given order
    m["fidelity"] = float(np.mean(m["matches"]))
    m["colour_accuracy"] = float(np.mean([v.colour == w["colour"] for v, w in zip(verdicts, want)]))
    m["direction_accuracy"] = float(np.mean([v.direction == w["direction"] for v, w in zip(verdicts, want)]))
    m["shape_accuracy"] = float(np.mean([v.shape == w["shape"] for v, w in zip(verdicts, want)]))
    flickers = [f for f in (flicker(v) for v in videos) if not math.isnan(f)]  # nan: one frame, nothing steady
    m["flicker"] = float(np.mean(flickers)) if flickers else float("nan")
    m["psnr_db"] = mean_psnr([psnr(v, r) for v, r in zip(videos, refs)])
    m["ssim"] = float(np.mean([ssim(v, r) for v, r in zip(videos, refs)]))
    m["detected"] = [f"{v.colour} {v.shape} {v.direction} on {v.background}" for v in verdicts]
    return m
