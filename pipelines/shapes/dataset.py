"""The synthetic captioned video set: one coloured shape moving over a plain background, generated on the fly.

A clip is ``frames`` frames (``FRAMES``: 33, the shipped model's; or 17: ``GEOMETRIES``) of ``SIZE`` x ``SIZE``
(64 x 64) pixels,
uint8 ``[T, H, W, 3]``: a circle,
square or triangle of one of ``SHAPE_COLOURS`` moves in a straight line (left, right, up or down) at a
constant speed over a background of one of ``BACKGROUNDS`` (never the shape's own colour), and never leaves
the frame. Its caption names all four choices: ``"a red circle moving left on a blue background"``.

Clip ``i`` of a seed is a function of ``(seed, i)`` only (``numpy.random.default_rng([seed, i])``), so a
dataset needs no storage and any clip can be regenerated alone. The vocabulary is deliberately small (3
shapes, 4 colours, 4 directions, 4 backgrounds: 180 captions) so a small model can learn all of it.

Example:
    >>> clip = make_clip(0, 7)            # ClipSpec + frames
    >>> clip.frames.shape, clip.spec.caption
    ((33, 64, 64, 3), 'a green triangle moving up on a black background')
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

SIZE = 64  # pixels, square frames
FRAMES = 33  # the shipped model's clips: two temporal-VAE chunks (33 frames -> 9 latent frames)
FPS = 24

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "black": (20, 20, 20),
    "white": (235, 235, 235),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle")
SHAPE_COLOURS = ("red", "green", "blue", "yellow")
BACKGROUNDS = ("black", "white", "gray", "blue")
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy)

MARGIN = 1.0  # pixels between the shape and the frame edge, at its extreme positions


@dataclass(frozen=True)
class Geometry:
    """A clip length and the ranges its shape's size (``radius``: half its extent, pixels) and speed (pixels per
    frame) are drawn from."""

    frames: int
    radius_range: tuple[float, float]
    speed_range: tuple[float, float]


GEOMETRIES: dict[int, Geometry] = {
    # the first shipped model's (one temporal-VAE chunk, 5 latent frames): 16..32 px of travel; radius 7..10 px,
    # which the 8x-downsampling VAE rounds into blobs
    17: Geometry(17, (7.0, 10.0), (1.0, 2.0)),
    # 33 frames (two temporal-VAE chunks, 9 latent frames: room for TDTM); the same 16..32 px of travel, and
    # shapes large enough (radius 10..14 px) for the VAE to keep a square's corners and a triangle's apex
    33: Geometry(33, (10.0, 14.0), (0.5, 1.0)),
}


def geometry(frames: int) -> Geometry:
    """``GEOMETRIES[frames]``, or ValueError naming the lengths there are."""
    if frames not in GEOMETRIES:
        raise ValueError(f"the shapes set has clips of {sorted(GEOMETRIES)} frames, got {frames!r}")
    return GEOMETRIES[frames]


@dataclass(frozen=True)
class ClipSpec:
    """What one clip shows; ``x0, y0`` is the shape's centre in frame 0, moving ``speed`` px/frame."""

    shape: str
    colour: str
    direction: str
    background: str
    radius: float
    speed: float
    x0: float
    y0: float
    frames: int = FRAMES

    @property
    def caption(self) -> str:
        return caption(self.shape, self.colour, self.direction, self.background)

    def centre(self, t: int) -> tuple[float, float]:
        """The shape's centre ``(x, y)`` in frame ``t``."""
        dx, dy = DIRECTIONS[self.direction]
        return self.x0 + dx * self.speed * t, self.y0 + dy * self.speed * t


@dataclass(frozen=True)
class Clip:
    spec: ClipSpec
    frames: np.ndarray  # (T, H, W, 3) uint8


def caption(shape: str, colour: str, direction: str, background: str) -> str:
    """``"a {colour} {shape} moving {direction} on a {background} background"`` (validated)."""
    for name, value, allowed in (("shape", shape, SHAPES), ("colour", colour, SHAPE_COLOURS),
                                 ("direction", direction, tuple(DIRECTIONS)), ("background", background, BACKGROUNDS)):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    if colour == background:
        raise ValueError(f"the shape's colour and the background must differ, both are {colour!r}")
    return f"a {colour} {shape} moving {direction} on a {background} background"


def all_captions() -> list[str]:
    """Every caption of the set (180), in a fixed order."""
    return [caption(s, c, d, b) for s, c, d, b in itertools.product(SHAPES, SHAPE_COLOURS, DIRECTIONS, BACKGROUNDS)
            if c != b]


def parse_caption(text: str) -> dict[str, str]:
    """The shape, colour, direction and background named by a caption of this set (case-insensitive, and
    tolerant of Open-Sora's appended ``" aesthetic score: 6.5."``); raises ValueError for any other text."""
    words = text.lower().replace(".", " ").split()
    try:
        i = words.index("moving")
        colour, shape, direction = words[i - 2], words[i - 1], words[i + 1]
        background = words[words.index("background") - 1]
        caption(shape, colour, direction, background)
    except (ValueError, IndexError):
        raise ValueError(f"{text!r} is not a caption of the shapes set; expected e.g. "
                         f"{caption('circle', 'red', 'left', 'blue')!r}") from None
    return {"shape": shape, "colour": colour, "direction": direction, "background": background}


def sample_spec(rng: np.random.Generator, *, shape: str | None = None, colour: str | None = None,
                direction: str | None = None, background: str | None = None, frames: int = FRAMES) -> ClipSpec:
    """Draw a ``frames``-frame clip's content from ``rng``; any of the four caption words may be fixed instead."""
    geo = geometry(frames)
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    colour = colour or SHAPE_COLOURS[rng.integers(len(SHAPE_COLOURS))]
    direction = direction or tuple(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
    if background is None:
        options = [b for b in BACKGROUNDS if b != colour]
        background = options[rng.integers(len(options))]
    caption(shape, colour, direction, background)  # validates
    radius = float(rng.uniform(*geo.radius_range))
    speed = float(rng.uniform(*geo.speed_range))
    travel = speed * (frames - 1)
    lo, hi = radius + MARGIN, SIZE - 1 - radius - MARGIN  # the centre's allowed range
    dx, dy = DIRECTIONS[direction]

    def start(d: int) -> float:  # along a moving axis the whole path must fit; across it, anywhere
        if d > 0:
            return float(rng.uniform(lo, hi - travel))
        if d < 0:
            return float(rng.uniform(lo + travel, hi))
        return float(rng.uniform(lo, hi))

    x0, y0 = start(dx), start(dy)
    return ClipSpec(shape, colour, direction, background, radius, speed, x0, y0, frames)


def _mask(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    """Boolean ``(SIZE, SIZE)`` coverage of a shape centred at ``(cx, cy)``, tested at pixel centres."""
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    if shape == "square":
        return (np.abs(x - cx) <= r) & (np.abs(y - cy) <= r)
    # an upward isosceles triangle with its apex r above the centre and its base r below
    top, base = cy - r, cy + r
    half = (y - top) / (2 * r) * r  # half-width grows linearly from 0 at the apex to r at the base
    return (y >= top) & (y <= base) & (np.abs(x - cx) <= half)


def render(spec: ClipSpec) -> np.ndarray:
    """The clip's frames: ``(spec.frames, SIZE, SIZE, 3)`` uint8."""
    frames = np.empty((spec.frames, SIZE, SIZE, 3), dtype=np.uint8)
    frames[:] = PALETTE[spec.background]
    colour = np.array(PALETTE[spec.colour], dtype=np.uint8)
    for t in range(spec.frames):
        cx, cy = spec.centre(t)
        frames[t][_mask(spec.shape, cx, cy, spec.radius)] = colour
    return frames


def make_clip(seed: int, index: int, frames: int = FRAMES) -> Clip:
    """Clip ``index`` of the ``frames``-frame set with ``seed``: the same ``(seed, index, frames)`` always gives the
    same clip (and the same caption whatever ``frames``: the words are drawn first)."""
    if index < 0 or seed < 0:
        raise ValueError(f"seed and index must be >= 0, got seed {seed}, index {index}")
    spec = sample_spec(np.random.default_rng([seed, index]), frames=frames)
    return Clip(spec, render(spec))


def make_batch(seed: int, start: int, n: int, frames: int = FRAMES) -> tuple[np.ndarray, list[ClipSpec]]:
    """Clips ``start .. start + n - 1``: frames ``(n, T, H, W, 3)`` uint8 and their specs."""
    clips = [make_clip(seed, i, frames) for i in range(start, start + n)]
    return np.stack([c.frames for c in clips]), [c.spec for c in clips]


def to_video_tensor(frames: np.ndarray):
    """uint8 ``(n, T, H, W, 3)`` -> float32 torch ``(n, 3, T, H, W)`` in [-1, 1] (the VAE's input range)."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(frames)).float().div_(127.5).sub_(1.0)  # (n, T, H, W, 3)
    return x.permute(0, 4, 1, 2, 3).contiguous()  # (n, 3, T, H, W)
