"""The synthetic shapes set and its judge: deterministic clips, captions, and a judge that reads them right."""

from __future__ import annotations

import numpy as np
import pytest

from blockrt.pipelines.shapes.dataset import (
    BACKGROUNDS, DIRECTIONS, FRAMES, PALETTE, SHAPE_COLOURS, SHAPES, SIZE, all_captions, caption, make_batch,
    make_clip, parse_caption, render, sample_spec,
)
from blockrt.pipelines.shapes.judge import fidelity, flicker, judge, matches, psnr, ssim

JUDGE_CLIPS = 100
MIN_JUDGE_ACCURACY = 0.95  # the bar on the generator's own clean clips


def test_clips_are_a_function_of_seed_and_index():
    a, b = make_clip(3, 17), make_clip(3, 17)
    assert a.spec == b.spec and np.array_equal(a.frames, b.frames)
    assert a.frames.shape == (FRAMES, SIZE, SIZE, 3) and a.frames.dtype == np.uint8
    assert not np.array_equal(make_clip(3, 18).frames, a.frames)
    assert not np.array_equal(make_clip(4, 17).frames, a.frames)
    frames, specs = make_batch(3, 16, 3)
    assert np.array_equal(frames[1], a.frames) and specs[1] == a.spec


def test_every_clip_shows_its_caption():
    for i in range(40):
        clip = make_clip(1, i)
        s = clip.spec
        assert s.colour != s.background
        colour = np.array(PALETTE[s.colour], dtype=np.uint8)
        for t in (0, FRAMES - 1):  # the shape stays whole inside the frame
            cx, cy = s.centre(t)
            assert s.radius <= cx <= SIZE - 1 - s.radius and s.radius <= cy <= SIZE - 1 - s.radius
            assert (clip.frames[t] == colour).all(-1).sum() > 50
        assert parse_caption(s.caption) == {"shape": s.shape, "colour": s.colour, "direction": s.direction,
                                            "background": s.background}


def test_vocabulary_and_bad_captions():
    caps = all_captions()
    assert len(caps) == len(set(caps)) == len(SHAPES) * len(SHAPE_COLOURS) * len(DIRECTIONS) * len(BACKGROUNDS) - \
        len(SHAPES) * len(DIRECTIONS)  # blue shapes never on blue
    assert parse_caption("a red circle moving left on a blue background aesthetic score: 6.5.")["direction"] == "left"
    with pytest.raises(ValueError, match="not a caption"):
        parse_caption("a purple cat")
    with pytest.raises(ValueError, match="must differ"):
        caption("circle", "blue", "up", "blue")
    with pytest.raises(ValueError, match="shape must be one of"):
        caption("hexagon", "red", "up", "blue")


def test_judge_reads_the_generators_clean_clips():
    clips = [make_clip(11, i) for i in range(JUDGE_CLIPS)]
    verdicts = [judge(c.frames) for c in clips]
    assert fidelity(verdicts, [c.spec.caption for c in clips]) >= MIN_JUDGE_ACCURACY
    assert np.mean([v.shape == c.spec.shape for v, c in zip(verdicts, clips)]) >= MIN_JUDGE_ACCURACY
    assert np.mean([v.background == c.spec.background for v, c in zip(verdicts, clips)]) >= MIN_JUDGE_ACCURACY


def test_judge_reads_every_shape_of_the_generators_clips():
    """The shape check (template match of the outline) on clean clips of two other seeds: 100%."""
    clips = [make_clip(seed, i) for seed in (12, 13) for i in range(JUDGE_CLIPS // 2)]
    verdicts = [judge(c.frames) for c in clips]
    assert [v.shape for v in verdicts] == [c.spec.shape for c in clips]
    assert {c.spec.shape for c in clips} == set(SHAPES)
    assert fidelity(verdicts, [c.spec.caption for c in clips], shape=True) == 1.0


def _blur(frames: np.ndarray, sigma: float) -> np.ndarray:
    """Each frame through a Gaussian blur (the softness of a VAE round trip), back to uint8."""
    import torch
    import torch.nn.functional as F

    r = int(3 * sigma)
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * sigma**2))
    k = (k / k.sum()).reshape(1, 1, -1)
    x = torch.from_numpy(frames).float().permute(0, 3, 1, 2).reshape(-1, 1, *frames.shape[1:3])  # (T*3, 1, H, W)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k[..., None, :])
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k[..., :, None])
    return x.reshape(frames.shape[0], 3, *frames.shape[1:3]).permute(0, 2, 3, 1).round().clamp(0, 255).byte().numpy()


def test_judge_reads_blurred_shapes():
    """A blurred edge is read at half contrast: at blur sigma 1 every shape is read right, at 1.5 (a radius-7
    triangle is then a smudge) at least 95% (the bounding box's fill ratio, used before: 89.6% of these clips)."""
    clips = [make_clip(14, i) for i in range(48)]
    assert [judge(_blur(c.frames, 1.0)).shape for c in clips] == [c.spec.shape for c in clips]
    assert np.mean([judge(_blur(c.frames, 1.5)).shape == c.spec.shape for c in clips]) >= 0.95


def test_shape_counts_unless_left_out():
    spec = sample_spec(np.random.default_rng(0), shape="square", colour="red", direction="left", background="white")
    v = judge(render(spec))
    assert v.shape == "square"
    wrong_shape = caption("circle", "red", "left", "white")
    assert not matches(v, wrong_shape) and matches(v, spec.caption)  # the default: shape, colour and direction
    assert matches(v, wrong_shape, shape=False)  # colour and direction only
    assert fidelity([v, v], [spec.caption, wrong_shape]) == 0.5 and fidelity([v], [wrong_shape], shape=False) == 1.0


def test_judge_rejects_what_the_caption_does_not_say():
    rng = np.random.default_rng(0)
    spec = sample_spec(rng, shape="square", colour="red", direction="left", background="white")
    frames = render(spec)
    assert matches(judge(frames), spec.caption)
    assert not matches(judge(frames), caption("square", "red", "right", "white"))
    assert not matches(judge(frames), caption("square", "green", "left", "white"))
    still = np.repeat(frames[:1], FRAMES, axis=0)  # no motion
    assert judge(still).direction == "static" and not matches(judge(still), spec.caption)
    assert judge(np.full_like(frames, 128)).colour is None  # nothing but background
    noise = rng.integers(0, 256, frames.shape, dtype=np.uint8)
    assert not matches(judge(noise), spec.caption)
    with pytest.raises(ValueError, match="uint8"):
        judge(frames.astype(np.float32))


def test_flicker_psnr_ssim():
    frames = make_clip(2, 5).frames
    assert flicker(frames) == 0.0  # the clean clips' background never changes
    noisy = np.clip(frames.astype(np.int16) + np.random.default_rng(1).integers(-20, 21, frames.shape), 0, 255)
    noisy = noisy.astype(np.uint8)
    assert flicker(noisy) > 5.0
    assert psnr(frames, frames) == float("inf") and ssim(frames, frames) == pytest.approx(1.0)
    assert 15.0 < psnr(frames, noisy) < 40.0
    assert ssim(frames, noisy) < 0.95 and ssim(frames, noisy) == pytest.approx(ssim(noisy, frames))
    a, b = np.full_like(frames, 128), np.full_like(frames, 235)  # flat: SSIM is the luminance term alone
    mx, my, c1 = 128 / 255, 235 / 255, 0.01**2
    assert ssim(a, b) == pytest.approx((2 * mx * my + c1) / (mx**2 + my**2 + c1), rel=1e-9)
    with pytest.raises(ValueError, match="same shape"):
        ssim(frames, frames[:3])


def test_judge_reads_every_attribute_of_33_frame_clips():
    """The 33-frame set (larger, slower shapes: ``GEOMETRIES[33]``): shape, colour and direction read 100%, clean
    and blurred by sigma 1 (the softness of its VAE round trip)."""
    clips = [make_clip(15, i, frames=33) for i in range(JUDGE_CLIPS)]
    assert all(c.frames.shape == (33, SIZE, SIZE, 3) for c in clips)
    captions = [c.spec.caption for c in clips]
    assert {c.spec.shape for c in clips} == set(SHAPES)
    assert fidelity([judge(c.frames) for c in clips], captions, shape=True) == 1.0
    assert fidelity([judge(_blur(c.frames, 1.0)) for c in clips], captions, shape=True) == 1.0
