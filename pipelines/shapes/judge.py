"""Judging a decoded shapes video without networks: what it shows, how steady it is, how close to a reference.

From uint8 frames ``[T, H, W, 3]``:

- ``judge``: every pixel is labelled with its nearest palette colour (RGB distance, ``MAX_COLOUR_DISTANCE``);
  the background is the most frequent label; the shape's colour is the most frequent *shape* colour
  (red/green/blue/yellow) other than the background, provided it covers ``MIN_SHAPE_PIXELS`` per frame on
  average; the direction comes from the least-squares slope of that colour's centroid over the frames (the
  larger axis, if it travels at least ``MIN_TRAVEL_PX`` over the clip; else ``"static"``); the shape from its
  outline: in each frame where the whole shape is seen, the pixels nearer the shape's colour than the
  background's (a blurred edge splits at half contrast), resampled over their bounding box to a ``TEMPLATE_PX``
  square, are matched to a disc, a square and an upward triangle filling that box (intersection over union); the
  best median score over the frames names the shape. It reads the generator's own clean clips right every time,
  and blurred ones too (``tests/test_shapes_dataset.py``); the bounding box's fill ratio, used before, read
  blurred triangles as circles.
- ``fidelity``: the fraction of videos whose detected shape, colour *and* direction are all the caption's
  (``shape=False``: colour and direction only, as the first shipped model, which drew round blobs, was judged).
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
TEMPLATE_PX = 16  # the shape's bounding box is resampled to this square to match the templates
OUTLINE_MARGIN_PX = 3  # how far past the colour mask a blurred edge is looked for

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


def _templates(n: int) -> dict[str, np.ndarray]:
    """The three shapes filling an ``n x n`` box (boolean, sampled at pixel centres), drawn as ``dataset`` draws
    them: a disc, a full square, an upward isosceles triangle with its base the box's bottom edge."""
    y, x = (np.mgrid[0:n, 0:n] + 0.5) / n
    return {"circle": (x - 0.5) ** 2 + (y - 0.5) ** 2 <= 0.25, "square": np.ones((n, n), dtype=bool),
            "triangle": np.abs(x - 0.5) <= y / 2}


_TEMPLATES = _templates(TEMPLATE_PX)


def _outline(frame: np.ndarray, mask: np.ndarray, colour: int, background: int) -> np.ndarray | None:
    """The shape in one frame ``(H, W, 3)`` at half contrast: the pixels nearer the shape's colour than the
    background's, inside the colour mask's bounding box grown by ``OUTLINE_MARGIN_PX`` (a blurred edge splits at
    its middle, as the eye reads it; stray pixels elsewhere do not count). None when the shape is not seen or
    touches the frame's edge (a shape cut by the edge has another outline)."""
    ys, xs = np.nonzero(mask)
    if len(ys) < MIN_SHAPE_PIXELS:
        return None
    H, W = mask.shape
    y0, y1 = max(ys.min() - OUTLINE_MARGIN_PX, 0), min(ys.max() + 1 + OUTLINE_MARGIN_PX, H)
    x0, x1 = max(xs.min() - OUTLINE_MARGIN_PX, 0), min(xs.max() + 1 + OUTLINE_MARGIN_PX, W)
    px = frame[y0:y1, x0:x1].astype(np.float32)
    near = np.linalg.norm(px - _RGB[colour], axis=-1) < np.linalg.norm(px - _RGB[background], axis=-1)
    ys, xs = np.nonzero(near)
    if len(ys) < MIN_SHAPE_PIXELS:
        return None
    if y0 + ys.min() == 0 or x0 + xs.min() == 0 or y0 + ys.max() == H - 1 or x0 + xs.max() == W - 1:
        return None
    return near[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def _shape_of(frames: np.ndarray, mask: np.ndarray, colour: int, background: int) -> str | None:
    """Circle / square / triangle: each frame's outline (``_outline``) resampled to ``TEMPLATE_PX`` square over
    its bounding box, the template with the best intersection over union, its median score over the frames."""
    scores: dict[str, list[float]] = {k: [] for k in _TEMPLATES}
    for frame, m in zip(frames, mask):
        box = _outline(frame, m, colour, background)
        if box is None:
            continue
        t = torch.from_numpy(box.astype(np.float32))[None, None]
        fit = F.interpolate(t, size=(TEMPLATE_PX, TEMPLATE_PX), mode="area")[0, 0].numpy() >= 0.5
        for name, tpl in _TEMPLATES.items():
            scores[name].append(float((fit & tpl).sum() / max((fit | tpl).sum(), 1)))
    if not scores["circle"]:
        return None
    return max(scores, key=lambda k: float(np.median(scores[k])))


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
    shape = _shape_of(frames, mask, best, bg_idx)
    return Verdict(_NAMES[best], direction, shape, background, travel, float(counts[best] / T))


def matches(verdict: Verdict, caption: str, shape: bool = True) -> bool:
    """True when the detected shape, colour and direction are the caption's (``shape=False``: colour and direction)."""
    want = parse_caption(caption)
    return verdict.colour == want["colour"] and verdict.direction == want["direction"] and \
        (not shape or verdict.shape == want["shape"])


def fidelity(verdicts: list[Verdict], captions: list[str], shape: bool = True) -> float:
    """The fraction of videos whose shape, colour and direction (``shape=False``: colour and direction) match their
    caption."""
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
