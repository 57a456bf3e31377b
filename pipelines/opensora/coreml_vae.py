"""The Open-Sora VAE v1.2 decoders as CoreML-exportable parts (``ondevice-sora.md`` §1, §8).

Temporal decoder (``TemporalVAE``, one call per chunk of ``Tz`` latent frames -> ``num_frames`` frames):
``vae_temporal_in`` (de-normalisation, ``post_quant_conv``, ``decoder.conv1``), ``vae_temporal_mid``
(``decoder.res_blocks``), ``vae_temporal_stage_{3,2,1,0}`` (``block_res_blocks[i]``, then
``conv_blocks[i-1]`` and depth-to-time where the stage doubles time), ``vae_temporal_out`` (``norm1``, SiLU,
``conv_out``, the drop of the causal front padding). Rewrites, each equal to the original op:

- GroupNorm on ``(B, C, T, H, W)`` runs on the 4-D view ``(B, C, T, H*W)`` (same groups, same elements
  per group): CoreML's group norm (and its rank limit) does not take the 5-D tensor;
- the causal padding is explicit: zeros concatenated in front of T, the H/W zero padding left to the conv;
- depth-to-time uses 4-D reshapes instead of the 6-D one: ``(B*C, 2, T, H*W)`` -> swap -> ``(B, C, 2T, H, W)``.

Spatial decoder (the SDXL ``AutoencoderKL``, frames as the batch): ``vae_spatial_in`` (``1/0.18215``,
``post_quant_conv``, ``decoder.conv_in``), ``vae_spatial_mid``, ``vae_spatial_up_{0..3}``,
``vae_spatial_out`` (``conv_norm_out``, SiLU, ``conv_out``); diffusers' modules are called unchanged (4-D).
Shapes are fixed (one temporal chunk, one micro-batch of frames; the app pads a short last micro-batch):
coremltools 9's ``group_norm`` converter fails on any symbolic dimension (``RangeDim`` or enumerated).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from blockrt.pipelines.opensora.vae import VideoAutoencoderPipeline
from blockrt.pipelines.opensora.vae_temporal import CausalConv3d, ResBlock, time_padding


def group_norm_4d(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` for ``x (B, C, T, H, W)``, computed on ``(B, C, T, H*W)``."""
    B, C, T, H, W = x.shape
    out = F.group_norm(x.reshape(B, C, T, H * W), norm.num_groups, norm.weight, norm.bias, norm.eps)
    return out.reshape(B, C, T, H, W)


def causal_conv(cc: CausalConv3d, x: torch.Tensor) -> torch.Tensor:
    """``cc(x)``: the front time padding as concatenated zeros, H/W padding by the convolution itself."""
    pw, _, ph, _, pt, _ = cc.padding
    if pt:
        B, C, _, H, W = x.shape
        x = torch.cat([x.new_zeros(B, C, pt, H, W), x], dim=2)  # (B, C, pt + T, H, W)
    conv = cc.conv
    return F.conv3d(x, conv.weight, conv.bias, stride=conv.stride, padding=(0, ph, pw))


def depth_to_time_4d(x: torch.Tensor) -> torch.Tensor:
    """``vae_temporal.depth_to_time`` with <= 4-D intermediates: ``out[:, c, 2t+s] = x[:, 2c+s, t]``."""
    B, C2, T, H, W = x.shape
    x = x.reshape(B * (C2 // 2), 2, T, H * W).transpose(1, 2)  # (B*C, T, 2, H*W)
    return x.reshape(B, C2 // 2, 2 * T, H, W)


class ResBlockExport(nn.Module):
    """A temporal ``ResBlock`` with the rewrites above; holds the block's own sub-modules."""

    def __init__(self, res: ResBlock) -> None:
        super().__init__()
        self.res = res

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.res
        h = causal_conv(r.conv1, F.silu(group_norm_4d(r.norm1, x)))
        h = causal_conv(r.conv2, F.silu(group_norm_4d(r.norm2, h)))
        return h + (x if r.conv3 is None else causal_conv(r.conv3, x))


class TemporalIn(nn.Module):
    """Normalised STDiT3 latents ``(B, 4, Tz, h, w)`` -> ``(B, C_top, Tz, h, w)``."""

    def __init__(self, vae: VideoAutoencoderPipeline, reference: bool = False) -> None:
        super().__init__()
        self.vae_scale, self.vae_shift = vae.scale, vae.shift  # (1, 4, 1, 1, 1) buffers, shared
        self.post_quant_conv = vae.temporal_vae.post_quant_conv
        self.conv1 = vae.temporal_vae.decoder.conv1
        self.reference = reference

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z * self.vae_scale.to(z.dtype) + self.vae_shift.to(z.dtype)  # VideoAutoencoderPipeline.denormalize
        if self.reference:
            return self.conv1(self.post_quant_conv(z))
        return causal_conv(self.conv1, causal_conv(self.post_quant_conv, z))


class ResBlocks(nn.Module):
    """A run of temporal ``ResBlock``s (``res_blocks`` or one stage), optionally followed by the stage's
    up-sampling conv and depth-to-time."""

    def __init__(self, blocks: nn.ModuleList, up_conv: nn.Module | None, to_time: bool, reference: bool = False) -> None:
        super().__init__()
        self.blocks = blocks if reference else nn.ModuleList(ResBlockExport(b) for b in blocks)
        self.up_conv = up_conv if isinstance(up_conv, CausalConv3d) else None
        self.to_time = to_time
        self.reference = reference

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from blockrt.pipelines.opensora.vae_temporal import depth_to_time

        for b in self.blocks:
            x = b(x)
        if self.up_conv is not None:
            x = self.up_conv(x) if self.reference else causal_conv(self.up_conv, x)
        if self.to_time:
            x = depth_to_time(x) if self.reference else depth_to_time_4d(x)
        return x  # (B, C, T or 2T, h, w)


class TemporalOut(nn.Module):
    """``(B, C0, 4*Tz, h, w)`` -> SDXL latents ``(B, 4, num_frames, h, w)`` (front padding dropped)."""

    def __init__(self, vae: VideoAutoencoderPipeline, num_frames: int, reference: bool = False) -> None:
        super().__init__()
        dec = vae.temporal_vae.decoder
        self.norm1, self.conv_out = dec.norm1, dec.conv_out
        self.drop = time_padding(num_frames, vae.temporal_vae.time_downsample_factor)
        self.reference = reference

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reference:
            x = self.conv_out(F.silu(self.norm1(x)))
        else:
            x = causal_conv(self.conv_out, F.silu(group_norm_4d(self.norm1, x)))
        return x[:, :, self.drop:]


def temporal_parts(vae: VideoAutoencoderPipeline, num_frames: int, reference: bool = False) -> list[tuple[str, nn.Module]]:
    """``[(name, module), ...]`` of the temporal decoder in run order (``reference``: the original ops)."""
    dec = vae.temporal_vae.decoder
    parts: list[tuple[str, nn.Module]] = [("vae_temporal_in", TemporalIn(vae, reference)),
                                          ("vae_temporal_mid", ResBlocks(dec.res_blocks, None, False, reference))]
    for i in reversed(range(len(dec.block_res_blocks))):
        up = dec.conv_blocks[i - 1] if i > 0 else None
        to_time = i > 0 and bool(dec.temporal_upsample[i - 1])
        parts.append((f"vae_temporal_stage_{i}", ResBlocks(dec.block_res_blocks[i], up, to_time, reference)))
    parts.append(("vae_temporal_out", TemporalOut(vae, num_frames, reference)))
    return parts


class SpatialIn(nn.Module):
    """SDXL latents of ``F`` frames ``(F, 4, h, w)`` -> ``(F, C, h, w)``: Open-Sora's ``/ 0.18215``,
    ``post_quant_conv``, ``decoder.conv_in``."""

    def __init__(self, vae: VideoAutoencoderPipeline) -> None:
        super().__init__()
        ae = vae.spatial_vae.module
        self.scaling_factor = vae.spatial_vae.scaling_factor
        self.post_quant_conv, self.conv_in = ae.post_quant_conv, ae.decoder.conv_in

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv_in(self.post_quant_conv(z / self.scaling_factor))


class SpatialBlock(nn.Module):
    """``mid_block`` or one of ``up_blocks``, called as ``Decoder.forward`` does (no latent embeds)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x, None)


class SpatialOut(nn.Module):
    """``(F, C, H, W)`` -> RGB frames ``(F, 3, H, W)``: ``conv_norm_out``, SiLU, ``conv_out``."""

    def __init__(self, vae: VideoAutoencoderPipeline) -> None:
        super().__init__()
        dec = vae.spatial_vae.module.decoder
        self.norm, self.act, self.conv = dec.conv_norm_out, dec.conv_act, dec.conv_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.act(self.norm(x)))


def spatial_parts(vae: VideoAutoencoderPipeline) -> list[tuple[str, nn.Module]]:
    """``[(name, module), ...]`` of the spatial decoder in run order."""
    dec = vae.spatial_vae.module.decoder
    parts: list[tuple[str, nn.Module]] = [("vae_spatial_in", SpatialIn(vae)),
                                          ("vae_spatial_mid", SpatialBlock(dec.mid_block))]
    parts += [(f"vae_spatial_up_{i}", SpatialBlock(b)) for i, b in enumerate(dec.up_blocks)]
    parts.append(("vae_spatial_out", SpatialOut(vae)))
    return parts
