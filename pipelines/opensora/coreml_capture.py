"""Real example inputs for the CoreML export: one pass of each Open-Sora model, streamed by blockrt, with
forward hooks recording what every exported part receives and returns.

The models are built on the ``meta`` device and streamed from their checkpoints (``blockrt.run``), so a
full-size T5-XXL is never materialised whole. The calls are the pipeline's own (``OpenSoraPipeline``):
the prompt through ``encode_prompts``, STDiT3 with the CFG batch ``cat([z, z])`` and ``cat([y, null])`` at the
first timestep of the sampler (plus the TDTM call), the VAE decoders on the first temporal chunk and the
first spatial micro-batch. Every recorded tensor is a detached clone.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import blockrt
from blockrt import RunConfig
from blockrt.pipelines.opensora import loading
from blockrt.pipelines.opensora.pipeline import DIRS
from blockrt.pipelines.opensora.resolution import latent_size, num_frames, resolve
from blockrt.pipelines.opensora.sampler import initial_noise, timesteps

log = logging.getLogger(__name__)

SAMPLER_STEPS = 30  # Open-Sora's; only the first timestep is used
SEED = 42


def _clone(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, (tuple, list)):
        return type(x)(_clone(v) for v in x)
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    return x


@dataclass
class Call:
    """One recorded module call: positional args, keyword args and the output (clones)."""

    args: tuple
    kwargs: dict
    output: Any = None


@contextmanager
def recording(modules: dict[str, nn.Module]) -> Iterator[dict[str, Call]]:
    """Record the FIRST call of each named module while the block runs; hooks removed on exit."""
    calls: dict[str, Call] = {}
    handles = []
    for name, mod in modules.items():
        def pre(m: nn.Module, args: tuple, kwargs: dict, name: str = name) -> None:
            if name not in calls:
                calls[name] = Call(_clone(args), _clone(kwargs))

        def post(m: nn.Module, args: tuple, kwargs: dict, out: Any, name: str = name) -> None:
            if calls.get(name) is not None and calls[name].output is None:
                calls[name].output = _clone(out)

        handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(mod.register_forward_hook(post, with_kwargs=True))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


@dataclass
class Shapes:
    """The video an export is traced for: pixel size, frames and the latent grid."""

    resolution: str
    aspect: str
    height: int
    width: int
    frames: int
    latent: tuple[int, int, int]

    @classmethod
    def of(cls, resolution: str, aspect: str, frames: int) -> "Shapes":
        """A preset (``resolve``: "144p", "256x256", ...) or any ``"<height>x<width>"`` in pixels (e.g. "64x64")."""
        custom = re.fullmatch(r"(\d+)x(\d+)", resolution)
        h, w = (int(custom[1]), int(custom[2])) if custom else resolve(resolution, aspect)  # "256x256" is one too
        n = num_frames(frames)
        return cls(resolution, aspect, h, w, n, latent_size(n, h, w))


@dataclass
class Captured:
    """What one pass recorded, per model: the model (meta skeleton), its weights, and the named calls."""

    model: nn.Module
    weights: Path
    calls: dict[str, Call] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def _run(model: nn.Module, weights: Path, budget: int | str, prefix: str = "") -> blockrt.Runtime:
    return blockrt.run(model, budget=budget, weights=weights, config=RunConfig(weights_prefix=prefix))


def capture_t5(directory: Path, prompt: str, budget: int | str) -> Captured:
    """The prompt through the T5 encoder: token ids, mask, every block's input and output, the final norm."""
    from blockrt.pipelines.opensora.prompt import preprocess
    from blockrt.pipelines.opensora.t5 import MAX_LENGTH, load_tokenizer, tokenize

    t5 = loading.load_t5(directory)
    model = t5.model
    if (directory / "spiece.model").exists():
        ids, mask = tokenize(load_tokenizer(directory), [preprocess(prompt)])
    else:  # no tokenizer next to the weights: a fixed id pattern of the same form (text, EOS, padding)
        log.warning("%s has no spiece.model: tracing T5 with synthetic token ids", directory)
        n = 12
        ids = torch.zeros(1, MAX_LENGTH, dtype=torch.long)
        ids[0, :n - 1] = torch.arange(2, n + 1) % model.config.vocab_size
        ids[0, n - 1] = model.config.eos_token_id
        mask = (torch.arange(MAX_LENGTH) < n).long()[None]
    mods = {f"block.{i}": b for i, b in enumerate(model.encoder.block)}
    mods["final_layer_norm"] = model.encoder.final_layer_norm
    with recording(mods) as calls, _run(model, t5.weights, budget) as rt, torch.no_grad():
        out = rt(input_ids=ids, attention_mask=mask).last_hidden_state  # (1, L, d)
    return Captured(model, t5.weights, calls, {"input_ids": ids, "mask": mask, "y": out[:, None].clone()})


def capture_stdit3(directory: Path, shapes: Shapes, y: torch.Tensor | None, mask: torch.Tensor | None,
                   budget: int | str, tdtm: bool) -> Captured:
    """One CFG call of STDiT3 at the sampler's first timestep (and the same call with TDTM when ``tdtm``).

    ``y (1, 1, L, caption_channels)`` and ``mask (1, L)`` come from T5; without them (T5 not exported and
    absent) a seeded random caption with 8 valid tokens stands in.
    """
    st = loading.load_stdit3(directory)
    model = st.model
    cfg = model.config
    if y is None or mask is None:
        g = torch.Generator().manual_seed(SEED)
        y = torch.randn(1, 1, cfg.model_max_length, cfg.caption_channels, generator=g)
        mask = (torch.arange(cfg.model_max_length) < 8).long()[None]
    ts = timesteps(SAMPLER_STEPS, height=shapes.height, width=shapes.width, num_frames=shapes.frames)
    z = initial_noise((1, cfg.in_channels, *shapes.latent), SEED).to(model.dtype)
    side = {"fps": torch.tensor([24.0]), "height": torch.tensor([float(shapes.height)]),
            "width": torch.tensor([float(shapes.width)])}
    mods: dict[str, nn.Module] = {"model": model, "final_layer": model.final_layer}
    for i in range(cfg.depth):
        mods[f"spatial.{i}"], mods[f"temporal.{i}"] = model.spatial_blocks[i], model.temporal_blocks[i]
    calls_by_kind: dict[str, dict[str, Call]] = {}
    with _run(model, st.weights, budget) as rt, torch.no_grad():
        y_in = torch.cat([y.to(model.dtype), model.null_caption(1).clone()])  # (2, 1, L, Cc): cond, then null
        for kind, merged in (("full", False), ("tdtm", True))[: 2 if tdtm else 1]:
            with recording(mods) as calls:
                rt(torch.cat([z, z]), ts[:1].repeat(2), y_in, mask=mask, merge_frames=merged, **side)
            calls_by_kind[kind] = calls
    return Captured(model, st.weights, calls_by_kind["full"], {"tdtm": calls_by_kind.get("tdtm"), "fps": side["fps"]})


def capture_vae(directory: Path, shapes: Shapes, budget: int | str) -> Captured:
    """The first temporal chunk (seeded latent noise) and the first spatial micro-batch of frames."""
    from blockrt.sources import CheckpointSource

    vd = loading.load_vae(directory)
    vae = vd.model
    source = CheckpointSource(vd.weights)
    small = {k: source.read_tensor(k) for k in source.segments if k in ("scale", "shift") or ".post_quant_conv." in k}
    vae.load_state_dict(small, strict=False, assign=True)  # as OpenSoraPipeline._decode
    z = initial_noise((1, vae.out_channels, *shapes.latent), SEED + 1).float()
    zk, nk = vae.split_chunks(z, shapes.frames)[0]
    with torch.no_grad():
        with _run(vae.temporal_vae.decoder, vd.weights, budget, "temporal_vae.decoder."):
            x_z = vae.temporal_vae.decode(vae.denormalize(zk), nk)  # (1, 4, nk, h, w)
        mb = vae.spatial_vae.micro_batch_size or nk
        frames = x_z[0].transpose(0, 1)[:mb].contiguous()  # (mb, 4, h, w): the first micro-batch
        with _run(vae.spatial_vae.module.decoder, vd.weights, budget, "spatial_vae.module.decoder."):
            video = vae.spatial_vae.decode(x_z[:, :, :mb])  # (1, 3, mb, 8h, 8w)
    return Captured(vae, vd.weights, {}, {"chunk": zk.clone(), "chunk_frames": nk, "temporal_out": x_z.clone(),
                                          "frames": frames, "rgb": video[0].transpose(0, 1).contiguous()})


def model_dirs(root: Path) -> dict[str, Path]:
    """``{"t5": root/t5-v1_1-xxl, ...}`` for the directories present under ``root``."""
    return {k: root / d for k, d in DIRS.items() if (root / d).is_dir()}
