"""``ShapesGenerator``: many videos from one weights directory with every model loaded once and kept resident.

The quality benchmark and the tests generate hundreds of small videos; ``OpenSoraPipeline`` re-opens its
three models for every video (it streams each stage under one budget). This class runs the same maths as
``OpenSoraPipeline(weights, stream=False).generate`` (prompt preprocessing, T5 encoding, the RFLOW sampler
with CFG against ``null_caption``, the pipeline's per-step STDiT3 arguments, the VAE decode chunk by chunk,
then frame micro-batches) with the models loaded once, and caches each prompt's T5 features.
``tests/test_shapes_model.py`` checks that both give ``torch.equal`` videos.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from blockrt.pipelines.opensora import loading
from blockrt.pipelines.opensora.conditioning import model_inputs
from blockrt.pipelines.opensora.pipeline import DIRS, GenerateConfig
from blockrt.pipelines.opensora.prompt import preprocess
from blockrt.pipelines.opensora.resolution import latent_size, num_frames, resolve
from blockrt.pipelines.opensora.sampler import initial_noise, sample, timesteps
from blockrt.pipelines.opensora.video import to_uint8_frames


@dataclass
class Generated:
    """One video: ``[3, T, H, W]`` in [-1, 1] and as uint8 frames ``[T, H, W, 3]``, model calls made, the leap
    step, and timings (s)."""

    video: torch.Tensor
    frames: np.ndarray
    steps_run: int
    leapt_at: int | None
    denoise_s: float  # the sampler loop: every STDiT3 call and update
    decode_s: float  # the VAE decode


class ShapesGenerator:
    """Resident T5, STDiT3 and VAE of a weights directory (default: the shipped shapes model).

    Example:
        >>> gen = ShapesGenerator()
        >>> out = gen.generate(GenerateConfig("a red circle moving right on a blue background",
        ...                                   resolution="64x64", aspect="1:1", steps=30))
        >>> out.frames.shape
        (17, 64, 64, 3)
    """

    def __init__(self, weights: str | Path | None = None) -> None:
        from blockrt.pipelines.opensora.t5 import load_tokenizer
        from blockrt.pipelines.shapes.layout import WEIGHTS_DIR

        self.root = Path(weights) if weights is not None else WEIGHTS_DIR
        self.t5 = loading.load_t5(self.root / DIRS["t5"], meta=False).model.eval()
        self.tokenizer = load_tokenizer(self.root / DIRS["t5"])
        self.stdit = loading.load_stdit3(self.root / DIRS["stdit3"], meta=False).model.eval()
        self.vae = loading.load_vae(self.root / DIRS["vae"], meta=False).model.eval()
        self._text: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def encode(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """T5 features ``(1, 1, 300, d)`` and mask ``(1, 300)`` of a prompt (cached)."""
        from blockrt.pipelines.opensora.t5 import encode_prompts

        text = preprocess(prompt)
        if text not in self._text:
            self._text[text] = encode_prompts(self.tokenizer, self.t5, [text])
        return self._text[text]

    @torch.no_grad()
    def generate(self, cfg: GenerateConfig) -> Generated:
        """One video for ``cfg`` (prompt, size, steps, CFG, seed, LPL, TDTM), as the pipeline makes it."""
        y, mask = self.encode(cfg.prompt)
        model = self.stdit
        h, w = resolve(cfg.resolution, cfg.aspect)
        frames = num_frames(cfg.frames)
        lt, lh, lw = latent_size(frames, h, w)
        ts = timesteps(cfg.steps, height=h, width=w, num_frames=frames)
        z = initial_noise((1, model.config.in_channels, lt, lh, lw), cfg.seed)
        y_in = torch.cat([y, model.null_caption(1)])  # cond row first, then the null caption
        side = model_inputs(height=h, width=w, frames=frames, fps=cfg.fps, dtype=model.dtype)

        def model_fn(z_in: torch.Tensor, t_in: torch.Tensor, step: int, x_mask: torch.Tensor | None) -> torch.Tensor:
            return model(z_in.to(model.dtype), t_in, y_in, mask=mask, x_mask=x_mask, **cfg.merge_args(step), **side)

        t0 = time.perf_counter()
        result = sample(model_fn, z, ts, cfg_scale=cfg.cfg_scale, policy=cfg.policy())
        t1 = time.perf_counter()
        vae = self.vae
        chunks = [vae.temporal_vae.decode(vae.denormalize(zk), nk) for zk, nk in vae.split_chunks(result.z, frames)]
        video = vae.spatial_vae.decode(torch.cat(chunks, dim=2))[0]  # (3, frames, H, W)
        t2 = time.perf_counter()
        return Generated(video, to_uint8_frames(video), result.steps_run, result.leapt_at, t1 - t0, t2 - t1)
