"""Open-Sora v1.2's temporal VAE (``VAE_Temporal_SD``): compresses 4-channel SDXL latents 4x in time.

Causal 3-D convolutions (zero padding at the *front* of the time axis only), GroupNorm (32 groups, eps 1e-5:
PyTorch's default, unlike the SDXL VAE's 1e-6), SiLU. Time is halved twice in the encoder (strided causal
convs) and doubled twice in the decoder (a causal conv to 2x channels, then depth-to-space in time). Height
and width are never changed. Module and parameter names match ``temporal_vae.*`` in the
``hpcai-tech/OpenSora-VAE-v1.2`` checkpoint (267 tensors). Spec: design/opensora-v1.2.md §2.2.

Note for streaming: the convolutions are causal, but GroupNorm on ``[B, C, T, H, W]`` pools its statistics
over all T frames, so within one call every output frame depends on every input frame. The unit that
streams is the call (one 17-frame / 5-latent chunk of the pipeline), not the frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# torch.nn.GroupNorm's default; written out because the SDXL VAE next door uses 1e-6.
GROUPNORM_EPS = 1e-5


@dataclass
class TemporalVAEConfig:
    """``VAE_Temporal_SD`` sizes; the defaults are the real ones (309,687,144 parameters).

    ``temporal_downsample[i]`` says whether the encoder halves time after stage ``i`` (and the decoder
    doubles it before stage ``i``); every channel width ``filters * m`` must divide into ``num_groups``.
    """

    in_out_channels: int = 4
    latent_embed_dim: int = 4
    embed_dim: int = 4
    filters: int = 128
    num_res_blocks: int = 4
    channel_multipliers: tuple[int, ...] = (1, 2, 2, 4)
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    num_groups: int = 32

    def __post_init__(self) -> None:
        self.channel_multipliers = tuple(self.channel_multipliers)
        self.temporal_downsample = tuple(bool(d) for d in self.temporal_downsample)
        if len(self.temporal_downsample) != len(self.channel_multipliers) - 1:
            raise ValueError(
                f"temporal_downsample needs {len(self.channel_multipliers) - 1} entries (one per stage but the "
                f"last), got {len(self.temporal_downsample)}"
            )
        for m in self.channel_multipliers:
            if (self.filters * m) % self.num_groups:
                raise ValueError(f"channel width {self.filters * m} is not divisible by num_groups {self.num_groups}")

    @property
    def time_downsample_factor(self) -> int:
        return 2 ** sum(self.temporal_downsample)


def time_padding(num_frames: int, factor: int = 4) -> int:
    """Frames zero-padded at the front before encoding (and cropped from the front after decoding)."""
    return (factor - num_frames % factor) % factor


class CausalConv3d(nn.Module):
    """Conv3d over ``[B, C, T, H, W]`` that only looks back in time.

    Zero-pads H and W by ``k // 2`` on both sides and T by ``(k_t - 1) + (1 - stride_t)`` frames at the
    front only (2 for k=3 stride 1, 1 for k=3 stride 2, 0 for k=1), so output ``t`` sees inputs
    ``<= stride_t * t + stride_t - 1`` and never a later frame. The weight lives at ``.conv``.
    """

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride_t: int = 1, bias: bool = True) -> None:
        super().__init__()
        k = kernel_size
        t_pad = (k - 1) + (1 - stride_t)
        self.padding = (k // 2, k // 2, k // 2, k // 2, t_pad, 0)  # F.pad order: W, H, T (front, back)
        self.conv = nn.Conv3d(cin, cout, k, stride=(stride_t, 1, 1), bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.padding))  # (B, cout, ceil(T / stride_t), H, W)


class ResBlock(nn.Module):
    """GN -> SiLU -> conv3 -> GN -> SiLU -> conv3, plus the input (through a 1x1x1 ``conv3`` if widths differ)."""

    def __init__(self, cin: int, cout: int, num_groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, cin, eps=GROUPNORM_EPS)
        self.conv1 = CausalConv3d(cin, cout, 3, bias=False)
        self.norm2 = nn.GroupNorm(num_groups, cout, eps=GROUPNORM_EPS)
        self.conv2 = CausalConv3d(cout, cout, 3, bias=False)
        self.conv3 = CausalConv3d(cin, cout, 1, bias=False) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.conv3 is None else self.conv3(x))


def _stage_res_blocks(cin: int, cout: int, n: int, num_groups: int) -> nn.ModuleList:
    return nn.ModuleList(ResBlock(cin if j == 0 else cout, cout, num_groups) for j in range(n))


class TemporalEncoder(nn.Module):
    """``[B, 4, T, h, w]`` (T a multiple of 4) -> ``[B, 2*latent, T/4, h, w]`` (mean and logvar, pre-quant)."""

    def __init__(self, cfg: TemporalVAEConfig) -> None:
        super().__init__()
        widths = [cfg.filters * m for m in cfg.channel_multipliers]  # 128, 256, 256, 512
        self.conv_in = CausalConv3d(cfg.in_out_channels, cfg.filters, 3, bias=False)
        self.block_res_blocks = nn.ModuleList()
        self.conv_blocks = nn.ModuleList()  # after every stage but the last: strided conv or Identity
        prev = cfg.filters
        for i, f in enumerate(widths):
            self.block_res_blocks.append(_stage_res_blocks(prev, f, cfg.num_res_blocks, cfg.num_groups))
            prev = f
            if i < len(widths) - 1:
                down = cfg.temporal_downsample[i]
                self.conv_blocks.append(CausalConv3d(f, f, 3, stride_t=2) if down else nn.Identity())
        self.res_blocks = _stage_res_blocks(prev, prev, cfg.num_res_blocks, cfg.num_groups)
        self.norm1 = nn.GroupNorm(cfg.num_groups, prev, eps=GROUPNORM_EPS)
        self.conv2 = CausalConv3d(prev, 2 * cfg.latent_embed_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)  # (B, 128, T, h, w)
        for i, blocks in enumerate(self.block_res_blocks):
            for block in blocks:
                x = block(x)
            if i < len(self.conv_blocks):
                x = self.conv_blocks[i](x)  # T -> T/2 where temporal_downsample[i]
        for block in self.res_blocks:
            x = block(x)  # (B, 512, T/4, h, w)
        return self.conv2(F.silu(self.norm1(x)))  # (B, 8, T/4, h, w)


class TemporalDecoder(nn.Module):
    """``[B, latent, Tz, h, w]`` -> ``[B, 4, 4*Tz, h, w]``.

    Runs ``conv1``, ``res_blocks.{0..3}``, then ``block_res_blocks.{3,2,1,0}``, each followed (for stage
    ``i > 0``) by ``conv_blocks[i-1]`` and, where it upsamples, depth-to-space in time; then ``norm1``,
    SiLU, ``conv_out``. Note ``block_res_blocks`` is indexed by stage, so it executes in reverse order.
    """

    def __init__(self, cfg: TemporalVAEConfig) -> None:
        super().__init__()
        widths = [cfg.filters * m for m in cfg.channel_multipliers]  # 128, 256, 256, 512
        self.temporal_upsample = cfg.temporal_downsample  # stage i > 0 doubles time iff entry i-1
        prev = widths[-1]
        self.conv1 = CausalConv3d(cfg.latent_embed_dim, prev, 3)
        self.res_blocks = _stage_res_blocks(prev, prev, cfg.num_res_blocks, cfg.num_groups)
        blocks: list[nn.ModuleList] = [nn.ModuleList()] * len(widths)
        convs: list[nn.Module] = [nn.Identity()] * (len(widths) - 1)
        for i in reversed(range(len(widths))):  # built from the deepest stage up: prev carries over
            blocks[i] = _stage_res_blocks(prev, widths[i], cfg.num_res_blocks, cfg.num_groups)
            prev = widths[i]
            if i > 0 and cfg.temporal_downsample[i - 1]:
                convs[i - 1] = CausalConv3d(prev, 2 * prev, 3)  # f -> 2f, then (C, 2) channels -> time
        self.block_res_blocks = nn.ModuleList(blocks)
        self.conv_blocks = nn.ModuleList(convs)
        self.norm1 = nn.GroupNorm(cfg.num_groups, prev, eps=GROUPNORM_EPS)
        self.conv_out = CausalConv3d(prev, cfg.in_out_channels, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv1(z)  # (B, 512, Tz, h, w)
        for block in self.res_blocks:
            x = block(x)
        for i in reversed(range(len(self.block_res_blocks))):
            for block in self.block_res_blocks[i]:
                x = block(x)
            if i > 0:
                x = self.conv_blocks[i - 1](x)
                if self.temporal_upsample[i - 1]:
                    x = depth_to_time(x)  # (B, 2C, T, h, w) -> (B, C, 2T, h, w)
        return self.conv_out(F.silu(self.norm1(x)))  # (B, 4, 4*Tz, h, w)


def depth_to_time(x: torch.Tensor) -> torch.Tensor:
    """``out[:, c, 2t + s] = x[:, 2c + s, t]``: einops ``B (C ts) T H W -> B C (T ts) H W`` with ts=2."""
    B, C2, T, H, W = x.shape
    x = x.reshape(B, C2 // 2, 2, T, H, W).transpose(2, 3)  # (B, C, T, 2, H, W)
    return x.reshape(B, C2 // 2, 2 * T, H, W)


class DiagonalGaussian:
    """The encoder's posterior: ``moments`` channels split into mean and logvar (clamped to [-30, 20])."""

    def __init__(self, moments: torch.Tensor) -> None:
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        # Like the original: noise drawn in the default dtype, then cast to the mean's dtype and device.
        device = generator.device if generator is not None else None
        noise = torch.randn(self.mean.shape, generator=generator, device=device)
        return self.mean + self.std * noise.to(self.mean)

    def mode(self) -> torch.Tensor:
        return self.mean


class TemporalVAE(nn.Module):
    """Open-Sora's ``VAE_Temporal_SD``: 4x causal compression in time of SDXL latents.

    ``encode`` front-pads ``time_padding(n)`` zero frames so n becomes a multiple of 4; ``decode`` drops
    the same number of frames from the front, so ``decode(encode(x).mode(), n)`` has n frames again.

    Example:
        >>> vae = TemporalVAE(TemporalVAEConfig())
        >>> z = vae.encode(torch.randn(1, 4, 17, 30, 53)).mode()  # (1, 4, 5, 30, 53)
        >>> vae.decode(z, num_frames=17).shape
        torch.Size([1, 4, 17, 30, 53])
    """

    def __init__(self, config: TemporalVAEConfig | None = None) -> None:
        super().__init__()
        cfg = config or TemporalVAEConfig()
        self.config = cfg
        self.time_downsample_factor = cfg.time_downsample_factor
        self.out_channels = cfg.in_out_channels
        self.encoder = TemporalEncoder(cfg)
        self.quant_conv = CausalConv3d(2 * cfg.latent_embed_dim, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = CausalConv3d(cfg.embed_dim, cfg.latent_embed_dim, 1)
        self.decoder = TemporalDecoder(cfg)

    def get_latent_size(self, input_size: list[int | None]) -> list[int | None]:
        """``[T, H, W] -> [ceil(T / 4), H, W]`` (None passes through)."""
        t, h, w = input_size
        if t is not None:
            t = (t + time_padding(t, self.time_downsample_factor)) // self.time_downsample_factor
        return [t, h, w]

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """``[B, 4, n, h, w]`` -> posterior over ``[B, 4, ceil(n/4), h, w]``."""
        x = F.pad(x, (0, 0, 0, 0, time_padding(x.shape[2], self.time_downsample_factor), 0))  # front zeros
        moments = self.quant_conv(self.encoder(x)).to(x.dtype)  # (B, 8, Tz, h, w)
        return DiagonalGaussian(moments)

    def decode(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        """``[B, 4, Tz, h, w]`` -> ``[B, 4, num_frames, h, w]``; ``num_frames`` must be in ``4*Tz-3 .. 4*Tz``."""
        if self.get_latent_size([num_frames, None, None])[0] != z.shape[2]:
            raise ValueError(
                f"num_frames {num_frames} does not encode to {z.shape[2]} latent frames; expected "
                f"{self.time_downsample_factor * z.shape[2] - self.time_downsample_factor + 1}.."
                f"{self.time_downsample_factor * z.shape[2]}"
            )
        x = self.decoder(self.post_quant_conv(z))  # (B, 4, 4*Tz, h, w)
        return x[:, :, time_padding(num_frames, self.time_downsample_factor) :]
