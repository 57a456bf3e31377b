"""One pass's example inputs for ``blockrt plan``: what a model takes, shaped from its config and an output size.

``blockrt plan`` counts FLOPs per block on a ``meta`` pass (nothing computed, nothing loaded), so it needs inputs
of the right shapes. A transformers model takes token ids. A diffusers denoiser takes latents shaped by its
pipeline's VAE (8x spatial for SD/Flux/Wan/HunyuanVideo/CogVideoX/PixArt, 32x for LTX-Video; 4x temporal for
Wan/HunyuanVideo/CogVideoX, 8x for LTX-Video), text embeddings of the pipeline's usual length, and the timestep;
an ``AutoencoderKL`` a full-size image. ``example_inputs`` returns None for a class it does not know, and the plan
then prints load times alone.

    >>> example_inputs(flux_transformer, Size(height=1024, width=1024, frames=1, tokens=512))
    {'hidden_states': (1, 4096, 64), 'encoder_hidden_states': (1, 512, 4096), ...}
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Size:
    """The output one pass works on: pixels, frames (1 = an image) and text tokens."""

    height: int
    width: int
    frames: int
    tokens: int


def _t(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype, device="meta")


def _latent_frames(frames: int, compression: int) -> int:
    return (max(frames, 1) - 1) // compression + 1  # causal video VAEs: the first frame, then one per chunk


def _flux(m: nn.Module, s: Size) -> dict[str, Any]:
    c = m.config
    h, w = s.height // 16, s.width // 16  # 8x VAE, then 2x2 patches packed into channels
    out = {"hidden_states": _t(1, h * w, c.in_channels), "encoder_hidden_states": _t(1, s.tokens, c.joint_attention_dim),
           "pooled_projections": _t(1, c.pooled_projection_dim), "timestep": _t(1),
           "img_ids": _t(h * w, 3), "txt_ids": _t(s.tokens, 3)}
    if getattr(c, "guidance_embeds", False):
        out["guidance"] = _t(1)
    return out


def _sd3(m: nn.Module, s: Size) -> dict[str, Any]:
    c = m.config
    return {"hidden_states": _t(1, c.in_channels, s.height // 8, s.width // 8),
            "encoder_hidden_states": _t(1, s.tokens, c.joint_attention_dim),
            "pooled_projections": _t(1, c.pooled_projection_dim), "timestep": _t(1)}


def _pixart(m: nn.Module, s: Size) -> dict[str, Any]:
    c = m.config
    extra = getattr(m, "use_additional_conditions", False)  # PixArt-alpha at 1024: the size and aspect ratio
    return {"hidden_states": _t(1, c.in_channels, s.height // 8, s.width // 8),
            "encoder_hidden_states": _t(1, s.tokens, c.caption_channels), "timestep": _t(1),
            "added_cond_kwargs": {"resolution": _t(1, 2) if extra else None, "aspect_ratio": _t(1, 1) if extra else None}}


def _wan(m: nn.Module, s: Size) -> dict[str, Any]:
    c = m.config
    return {"hidden_states": _t(1, c.in_channels, _latent_frames(s.frames, 4), s.height // 8, s.width // 8),
            "encoder_hidden_states": _t(1, s.tokens, c.text_dim), "timestep": _t(1)}


def _hunyuan_video(m: nn.Module, s: Size) -> dict[str, Any]:
    c = m.config
    return {"hidden_states": _t(1, c.in_channels, _latent_frames(s.frames, 4), s.height // 8, s.width // 8),
            "encoder_hidden_states": _t(1, s.tokens, c.text_embed_dim), "timestep": _t(1),
            "encoder_attention_mask": _t(1, s.tokens), "pooled_projections": _t(1, c.pooled_projection_dim),
            "guidance": _t(1)}


def _cogvideox(m: nn.Module, s: Size) -> dict[str, Any]:
    c = m.config  # its positional embedding is sized by the config's text length: the pipeline pads to it
    return {"hidden_states": _t(1, _latent_frames(s.frames, 4), c.in_channels, s.height // 8, s.width // 8),
            "encoder_hidden_states": _t(1, c.max_text_seq_length, c.text_embed_dim), "timestep": _t(1)}


def _ltx(m: nn.Module, s: Size) -> dict[str, Any]:
    c = m.config
    f, h, w = _latent_frames(s.frames, 8), s.height // 32, s.width // 32
    return {"hidden_states": _t(1, f * h * w, c.in_channels), "encoder_hidden_states": _t(1, s.tokens, c.caption_channels),
            "timestep": _t(1), "encoder_attention_mask": _t(1, s.tokens), "num_frames": f, "height": h, "width": w}


def _unet(m: nn.Module, s: Size) -> dict[str, Any]:
    c = m.config
    out = {"sample": _t(1, c.in_channels, s.height // 8, s.width // 8), "timestep": _t(1),
           "encoder_hidden_states": _t(1, s.tokens, c.cross_attention_dim)}
    if c.addition_embed_type == "text_time":  # SDXL: pooled text and the six size/crop numbers
        text = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        out["added_cond_kwargs"] = {"text_embeds": _t(1, text), "time_ids": _t(1, 6)}
    return out


def _autoencoder_kl(m: nn.Module, s: Size) -> dict[str, Any]:
    return {"sample": _t(1, m.config.in_channels, s.height, s.width)}


def _tokens(m: nn.Module, s: Size) -> dict[str, Any]:
    out = {"input_ids": _t(1, s.tokens, dtype=torch.long)}
    if getattr(m.config, "is_encoder_decoder", False):
        out["decoder_input_ids"] = _t(1, 1, dtype=torch.long)
    return out


BY_CLASS: dict[str, Callable[[nn.Module, Size], dict[str, Any]]] = {
    "FluxTransformer2DModel": _flux, "SD3Transformer2DModel": _sd3, "PixArtTransformer2DModel": _pixart,
    "WanTransformer3DModel": _wan, "HunyuanVideoTransformer3DModel": _hunyuan_video,
    "CogVideoXTransformer3DModel": _cogvideox, "LTXVideoTransformer3DModel": _ltx,
    "UNet2DConditionModel": _unet, "AutoencoderKL": _autoencoder_kl,
}


def example_inputs(model: nn.Module, size: Size) -> dict[str, Any] | None:
    """Keyword inputs (``meta`` tensors) of one pass of ``model`` at ``size``; None for a class not known here."""
    if getattr(model, "main_input_name", None) == "input_ids":
        return _tokens(model, size)
    make = BY_CLASS.get(type(model).__name__)
    return None if make is None else make(model, size)


def describe(inputs: dict[str, Any]) -> str:
    """``hidden_states (1, 4096, 64), timestep (1,)``: the shapes, for the plan's header."""
    return ", ".join(f"{k} {tuple(v.shape)}" for k, v in inputs.items() if isinstance(v, torch.Tensor))
