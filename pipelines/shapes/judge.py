"""Judging a decoded shapes video without networks: what it shows, how steady it is, how close to a reference.

From uint8 frames ``[T, H, W, 3]``:

- ``judge``: every pixel is labelled with its nearest palette colour (RGB distance, ``MAX_COLOUR_DISTANCE``);
  the background is the most frequent label; the shape's colour is the most frequent *shape* colour
  (red/green/blue/yellow) other than the background, provided it covers ``MIN_SHAPE_PIXELS`` per frame on
  average; the direction comes from the least-squares slope of that colour's centroid over the frames (the
  larger axis, if it travels at least ``MIN_TRAVEL_PX`` over the clip; else ``"static"``); the shape from the
  mask's geometry: the median over frames of the fill ratio of its bounding box (circle pi/4, square 1,
  triangle 1/2), which reads the generator's own clean clips right every time (``tests/test_shapes_dataset.py``).
- ``fidelity``: the fraction of videos whose detected colour *and* direction are the caption's; with
  ``shape=True`` the shape must match too. The shape stays off the default fidelity (the benchmark reports it as
  its own column) until a model that draws its shapes is trained: the shipped model draws round blobs.
- ``flicker``: mean absolute change (0..255) between consecutive frames over the pixels that are background
  in both frames and at least ``FLICKER_MARGIN_PX`` away from the shape in both: the moving shape's own
  change is excluded, so a perfectly steady video scores 0 whatever its motion. (VBench's "temporal
  flickering" is the mean absolute frame difference over all pixels of static videos; these videos move.)
- ``psnr`` and ``ssim`` (Gaussian window 11, sigma 1.5, valid region, K1 0.01, K2 0.03, per channel and frame
  on [0, 1] values, then averaged): against a reference video of the same size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from blockrt.pipelines.shapes.dataset import BACKGROUNDS, PALETTE, SHAPE_COLOURS, parse_caption

MAX_COLOUR_DISTANCE = 90.0  # RGB distance beyond which a pixel has no palette colour
MIN_SHAPE_PIXELS = 12.0  # mean pixels per frame for a shape to be seen at all (the smallest is ~100)
MIN_TRAVEL_PX = 6.0  # fitted travel over the clip below which the shape is "static" (the smallest is 16)
FLICKER_MARGIN_PX = 3
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03
FILL_RATIOS = {"triangle": 0.5, "circle": float(np.pi / 4), "square": 1.0}

_NAMES = list(PALETTE)
_RGB = np.array([PALETTE[n] for n in _NAMES], dtype=np.float32)  # (K, 3)
_UNKNOWN = -1


@dataclass(frozen=True)
class Verdict:
    """What a video shows, as far as the judge can tell (None: not seen)."""

    colour: str | None
    direction: str | None  # left/right/up/down, "static", or None when no shape was seen
    shape: str | None
    background: str
    travel_px: tuple[float, float]  # fitted (dx, dy) over the whole clip
    shape_pixels: float  # mean per frame


def _check_frames(frames: np.ndarray) -> np.ndarray:
    if not isinstance(frames, np.ndarray) or frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        found = f"{frames.dtype} {frames.shape}" if isinstance(frames, np.ndarray) else type(frames).__name__
        raise ValueError(f"frames must be uint8 [T, H, W, 3] (see video.to_uint8_frames), found {found}")
    return frames


def labels(frames: np.ndarray) -> np.ndarray:
    """Nearest palette colour index per pixel ``(T, H, W)`` (index into ``PALETTE``; -1 = none near enough)."""
    x = _check_frames(frames).astype(np.float32)[..., None, :]  # (T, H, W, 1, 3)
    d = np.sqrt(((x - _RGB) ** 2).sum(-1))  # (T, H, W, K)
    lab = d.argmin(-1)
    lab[d.min(-1) > MAX_COLOUR_DISTANCE] = _UNKNOWN
    return lab


def _shape_of(mask: np.ndarray) -> str | None:
    """Circle / square / triangle from the median fill ratio of the per-frame bounding boxes."""
    ratios = []
    for m in mask:
        ys, xs = np.nonzero(m)
        if len(ys) >= MIN_SHAPE_PIXELS:
            ratios.append(len(ys) / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)))
    if not ratios:
        return None
    r = float(np.median(ratios))
    return min(FILL_RATIOS, key=lambda k: abs(FILL_RATIOS[k] - r))


def judge(frames: np.ndarray) -> Verdict:
    """Colour, direction, shape and background of the shape video ``frames`` (uint8 ``[T, H, W, 3]``)."""
    lab = labels(frames)
    T = lab.shape[0]
    counts = np.bincount(lab[lab >= 0].ravel(), minlength=len(_NAMES))
    bg_idx = int(counts.argmax())
    background = _NAMES[bg_idx]
    candidates = [i for i, n in enumerate(_NAMES) if n in SHAPE_COLOURS and i != bg_idx]
    best = max(candidates, key=lambda i: counts[i])
    if counts[best] / T < MIN_SHAPE_PIXELS:
        return Verdict(None, None, None, background, (0.0, 0.0), float(counts[best] / T))
    mask = lab == best  # (T, H, W)
    ts, cx, cy = [], [], []
    for t in range(T):
        ys, xs = np.nonzero(mask[t])
        if len(ys) >= MIN_SHAPE_PIXELS:
            ts.append(t)
            cx.append(xs.mean())
            cy.append(ys.mean())
    travel = (0.0, 0.0)
    direction = "static"
    if len(ts) >= 2:
        sx = float(np.polyfit(ts, cx, 1)[0]) * (T - 1)
        sy = float(np.polyfit(ts, cy, 1)[0]) * (T - 1)
        travel = (sx, sy)
        if max(abs(sx), abs(sy)) >= MIN_TRAVEL_PX:
            direction = ("right" if sx > 0 else "left") if abs(sx) >= abs(sy) else ("down" if sy > 0 else "up")
    return Verdict(_NAMES[best], direction, _shape_of(mask), background, travel, float(counts[best] / T))


def matches(verdict: Verdict, caption: str, shape: bool = False) -> bool:
    """True when the detected colour and direction are the caption's (and its shape, with ``shape=True``)."""
    want = parse_caption(caption)
    return verdict.colour == want["colour"] and verdict.direction == want["direction"] and \
        (not shape or verdict.shape == want["shape"])


def fidelity(verdicts: list[Verdict], captions: list[str], shape: bool = False) -> float:
    """The fraction of videos whose colour and direction (and shape, with ``shape=True``) match their caption."""
    if len(verdicts) != len(captions) or not verdicts:
        raise ValueError(f"need one caption per verdict (and at least one), got {len(verdicts)} and {len(captions)}")
    return sum(matches(v, c, shape) for v, c in zip(verdicts, captions)) / len(verdicts)


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Square dilation of boolean ``(T, H, W)`` masks by ``r`` pixels."""
    out = mask.copy()
    H, W = mask.shape[1:]
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            shifted = np.zeros_like(mask)
            shifted[:, max(dy, 0):H + min(dy, 0), max(dx, 0):W + min(dx, 0)] = \
                mask[:, max(-dy, 0):H + min(-dy, 0), max(-dx, 0):W + min(-dx, 0)]
            out |= shifted
    return out


def flicker(frames: np.ndarray) -> float:
    """Mean absolute change (0..255) between consecutive frames on the steady background (see module doc)."""
    lab = labels(frames)
    counts = np.bincount(lab[lab >= 0].ravel(), minlength=len(_NAMES))
    bg = lab == int(counts.argmax())  # (T, H, W)
    steady = bg & ~_dilate(~bg, FLICKER_MARGIN_PX)
    both = steady[1:] & steady[:-1]  # (T-1, H, W)
    if not both.any():
        return float("nan")
    diff = np.abs(frames[1:].astype(np.float32) - frames[:-1].astype(np.float32)).mean(-1)  # (T-1, H, W)
    return float(diff[both].mean())


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of uint8 videos of one shape (inf when identical)."""
    _same_shape(a, b)
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _same_shape(a: np.ndarray, b: np.ndarray) -> None:
    _check_frames(a), _check_frames(b)
    if a.shape != b.shape:
        raise ValueError(f"videos must have the same shape to compare, got {a.shape} and {b.shape}")


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of uint8 videos ``[T, H, W, 3]`` (Gaussian window, valid region; 1.0 when identical)."""
    _same_shape(a, b)
    x = torch.from_numpy(a).double().div(255).permute(0, 3, 1, 2).reshape(-1, 1, *a.shape[1:3])  # (T*3, 1, H, W)
    y = torch.from_numpy(b).double().div(255).permute(0, 3, 1, 2).reshape(-1, 1, *b.shape[1:3])
    g = torch.arange(SSIM_WINDOW, dtype=torch.float64) - (SSIM_WINDOW - 1) / 2
    g = torch.exp(-g**2 / (2 * SSIM_SIGMA**2))
    g = g / g.sum()
    win = (g[:, None] * g[None, :])[None, None]  # (1, 1, 11, 11)

    def blur(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(z, win)  # valid region

    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return float(s.mean())


__all__ = ["Verdict", "judge", "matches", "fidelity", "flicker", "psnr", "ssim", "labels", "BACKGROUNDS"]
