"""Training the shapes VAE (``VideoAutoencoderPipeline`` at small widths) for reconstruction, then freezing it.

Two stages, as Open-Sora's VAE is built:

1. ``train_spatial``: the spatial ``AutoencoderKL`` on single frames of random clips, MSE in pixels ([-1, 1])
   plus ``KL_WEIGHT`` x the posterior's KL; then a second phase with the shape's pixels weighted up;
2. ``train_temporal``: the temporal VAE on the *frozen* spatial VAE's latents of whole clips (posterior means,
   cached once by ``encode_spatial``), cut into the pipeline's chunks of 17 frames (``temporal_chunks``; whole
   33-frame clips would give other latents than the pipeline's: relative RMS 0.4-0.8 in the second chunk), MSE
   in that latent space (optionally with the shape's cells weighted up) plus the same small KL.

``finish_vae`` then encodes the cached clips through the temporal encoder (means) with the pipeline's own
``encode_temporal`` (chunk by chunk, as ``VideoAutoencoderPipeline.encode``) and sets the pipeline's per-channel
``shift``/``scale`` to the latents' mean and standard deviation, so STDiT3 sees unit-variance
latents, as Open-Sora's fixed constants do for its own VAE.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from blockrt.pipelines.shapes.dataset import FRAMES, make_batch, make_clip, to_video_tensor

log = logging.getLogger(__name__)

KL_WEIGHT = 1e-6
LR = 1e-3
ENCODE_BATCH = 8  # clips per spatial-encoder call when caching
FOCUS_REL = 2.0  # shape_cells: deviation over this many times the clip's median deviation

Logger = Callable[[str, int, float], None]


def _frames(seed: int, n_clips: int, batch: int, rng: np.random.Generator, frames: int) -> torch.Tensor:
    """``batch`` random frames of random ``frames``-frame clips: ``(batch, 3, H, W)`` in [-1, 1]."""
    idx = rng.integers(n_clips, size=batch)
    ts = rng.integers(frames, size=batch)
    picked = np.stack([make_clip(seed, int(i), frames).frames[int(t)] for i, t in zip(idx, ts)])  # (b, H, W, 3)
    return to_video_tensor(picked[:, None])[:, :, 0]  # (b, 3, H, W)


def shape_weights(x: torch.Tensor, focus: float, ring: int = 0) -> torch.Tensor:
    """Per-pixel loss weights ``(b, 1, H, W)``: 1 on the background, ``1 + focus`` on the shape and, with
    ``ring`` > 0, on the background within ``ring`` pixels of it (a disc or square painted where a triangle's
    sides are then costs as much as a missing apex). The background is the colour of pixel (0, 0), which no
    shape ever covers (``dataset.MARGIN``)."""
    mask = (x != x[:, :, :1, :1]).any(dim=1, keepdim=True).float()  # (b, 1, H, W)
    if ring:
        mask = F.max_pool2d(mask, 2 * ring + 1, stride=1, padding=ring)
    return 1.0 + focus * mask


def shape_cells(x: torch.Tensor) -> torch.Tensor:
    """``(b, 1, T, H, W)`` 1.0 where a latent ``(b, C, T, H, W)`` departs from its clip's background: the cell's
    absolute deviation from the per-channel median (summed over channels) is over ``FOCUS_REL`` times the clip's
    median deviation."""
    med = x.flatten(2).median(dim=2).values[..., None, None, None]  # (b, C, 1, 1, 1): the background
    dev = (x - med).abs().sum(1, keepdim=True)  # (b, 1, T, H, W)
    return (dev > FOCUS_REL * dev.flatten(1).median(dim=1).values.view(-1, 1, 1, 1, 1)).float()


def train_spatial(vae, seed: int, n_clips: int, steps: int, batch: int, on_loss: Logger, *, focus: float = 0.0,
                  ring: int = 0, lr: float = LR, cosine: bool = False, phase: int = 1, frames: int = FRAMES) -> None:
    """Train ``vae.spatial_vae.module`` (diffusers AutoencoderKL) on frames; in place.

    ``focus`` > 0 weights the shape's pixels ``1 + focus`` times the background's (``shape_weights``): with
    plain MSE the shape, ~5% of a frame, comes out as a blurred, discoloured blob; ``ring`` weights the
    background around it too. ``cosine`` decays ``lr`` to 0 over ``steps``. ``phase`` picks the data stream, so
    each phase sees other frames.
    """
    ae = vae.spatial_vae.module.train().requires_grad_(True)
    opt = torch.optim.AdamW(ae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / steps)) if cosine else 1.0)
    rng = np.random.default_rng([seed, phase])
    gen = torch.Generator().manual_seed(seed + 10 * (phase - 1))
    name = "spatial_vae_mse" if phase == 1 else f"spatial_vae_weighted_mse_phase{phase}"
    for step in range(steps):
        x = _frames(seed, n_clips, batch, rng, frames)  # (b, 3, 64, 64)
        dist = ae.encode(x).latent_dist
        rec = ae.decode(dist.sample(gen)).sample
        w = shape_weights(x, focus, ring)  # (b, 1, H, W)
        mse = ((rec - x).pow(2) * w).mean() / w.mean()
        loss = mse + KL_WEIGHT * dist.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        on_loss(name, step, mse.item())
    ae.eval().requires_grad_(False)


@torch.no_grad()
def encode_spatial(vae, seed: int, n_clips: int, frames: int = FRAMES) -> torch.Tensor:
    """Spatial latents (posterior means x 0.18215) of clips ``0..n_clips-1``: ``(n, 4, frames, 8, 8)``."""
    out = []
    for start in range(0, n_clips, ENCODE_BATCH):
        clips, _ = make_batch(seed, start, min(ENCODE_BATCH, n_clips - start), frames)
        out.append(vae.spatial_vae.encode(to_video_tensor(clips), sample_posterior=False))
    return torch.cat(out)


def train_temporal(vae, latents: torch.Tensor, seed: int, steps: int, batch: int, on_loss: Logger, *,
                   focus: float = 0.0, ring: int = 0, cosine: bool = False, lr: float = LR) -> None:
    """Train ``vae.temporal_vae`` to reconstruct cached spatial latents ``(n, 4, T, h, w)``, chunk by chunk as the
    pipeline runs it (``VideoAutoencoderPipeline.temporal_chunks``); in place. ``focus`` > 0 weights the shape's
    latent cells (``shape_cells``) ``1 + focus`` times: unweighted, the few cells that hold the shape come back
    blurred; ``ring`` > 0 weights the cells within ``ring`` cells of them too. ``cosine`` decays the learning rate
    ``lr`` to 0 over ``steps``. Starts from the temporal VAE's current weights."""
    tv = vae.temporal_vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(tv.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / steps)) if cosine else 1.0)
    gen = torch.Generator().manual_seed(seed + 2)
    n = latents.shape[0]
    for step in range(steps):
        x = latents[torch.randint(n, (batch,), generator=gen)]  # (b, 4, T, h, w)
        cells = shape_cells(x)  # (b, 1, T, h, w)
        if ring:
            cells = F.max_pool3d(cells, (1, 2 * ring + 1, 2 * ring + 1), stride=1, padding=(0, ring, ring))
        w = 1.0 + focus * cells
        mse = kl = 0.0
        for c in vae.temporal_chunks(x.shape[2]):
            xc = x[:, :, c]  # (b, 4, <=17, h, w)
            post = tv.encode(xc)
            rec = tv.decode(post.sample(gen), num_frames=xc.shape[2])
            mse = mse + ((rec - xc).pow(2) * w[:, :, c]).sum() / (w[:, :, c].sum() * xc.shape[1])
            kl = kl + 0.5 * (post.mean.pow(2) + post.std.pow(2) - 1.0 - post.logvar).sum(dim=(1, 2, 3, 4)).mean()
        loss = mse + KL_WEIGHT * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        on_loss("temporal_vae_mse", step, mse.item())
    tv.eval().requires_grad_(False)


@torch.no_grad()
def finish_vae(vae, spatial_latents: torch.Tensor, set_stats: bool = True) -> torch.Tensor:
    """Encode the cached clips through the temporal VAE (means) chunk by chunk, as the pipeline does, set
    ``shift``/``scale`` from their per-channel statistics (unless ``set_stats`` is False: a VAE loaded from a
    weights directory keeps its own), and return the normalised STDiT3 latents ``(n, 4, T_z, h, w)`` (5 latent
    frames from 17 pixel frames, 9 from 33)."""
    z = torch.cat([vae.encode_temporal(spatial_latents[i:i + 64], sample_posterior=False)
                   for i in range(0, spatial_latents.shape[0], 64)])  # (n, 4, T_z, h, w)
    if not set_stats:
        return vae.normalize(z)
    mean = z.mean(dim=(0, 2, 3, 4)).view(1, -1, 1, 1, 1)
    std = z.std(dim=(0, 2, 3, 4)).view(1, -1, 1, 1, 1)
    vae.shift.copy_(mean)
    vae.scale.copy_(std)
    return vae.normalize(z)


@torch.no_grad()
def reconstruction_psnr(vae, seed: int, start: int, n: int,
                        frames: int = FRAMES) -> tuple[float, np.ndarray, np.ndarray]:
    """PSNR (dB, uint8 frames) of clips ``start..start+n-1`` through the whole VAE (encode means, decode), with
    the originals and reconstructions as uint8 ``(n, T, H, W, 3)``."""
    from blockrt.pipelines.opensora.video import to_uint8_frames

    clips, _ = make_batch(seed, start, n, frames)
    x = to_video_tensor(clips)
    t0 = time.perf_counter()
    rec = vae.decode(vae.encode(x, sample_posterior=False), num_frames=frames)  # (n, 3, T, H, W)
    log.info("VAE round trip of %d clips: %.1f s", n, time.perf_counter() - t0)
    out = np.stack([to_uint8_frames(r) for r in rec])
    mse = np.mean((out.astype(np.float64) - clips.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12))), clips, out


def round_trip_attributes(original: np.ndarray, reconstructed: np.ndarray, specs) -> dict[str, float]:
    """What survives a VAE round trip, as the judge reads it: the fraction of clips whose reconstruction shows
    the caption's shape, colour and direction (``original``/``reconstructed``: uint8 ``(n, T, H, W, 3)``;
    ``specs``: their ``ClipSpec``s). A model trained on these latents cannot draw what the VAE loses: the first
    shipped VAE kept the circle and lost the square and the triangle."""
    from blockrt.pipelines.shapes.judge import judge

    if len(original) != len(reconstructed) or len(original) != len(specs):
        raise ValueError(f"expected as many originals, reconstructions and specs; found {len(original)}, "
                         f"{len(reconstructed)}, {len(specs)}")
    verdicts = [judge(r) for r in reconstructed]
    n = max(len(specs), 1)
    return {attr: sum(getattr(v, attr) == getattr(s, attr) for v, s in zip(verdicts, specs)) / n
            for attr in ("shape", "colour", "direction")}
