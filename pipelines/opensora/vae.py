"""Open-Sora v1.2's VAE (``OpenSoraVAE_V1_2`` -> ``VideoAutoencoderPipeline``): video <-> STDiT3 latents.

Two stages, each frame-/chunk-local:

- ``spatial_vae``: the SDXL VAE (diffusers ``AutoencoderKL``, 8x in H and W) applied to every frame as an
  image, ``micro_batch_size`` frames per call, with Open-Sora's hard-coded scale 0.18215;
- ``temporal_vae``: ``TemporalVAE`` (``vae_temporal.py``, 4x causal in time), applied to independent chunks
  of 17 frames <-> 5 latent frames;

plus the per-channel normalisation ``(z - shift) / scale`` of the final latents. The state dict matches the
``hpcai-tech/OpenSora-VAE-v1.2`` checkpoint: ``spatial_vae.module.*`` (248), ``temporal_vae.*`` (267),
``scale``, ``shift`` (517 tensors). Spec: design/opensora-v1.2.md §2.

Streaming: ``decode`` is the concatenation of independent chunks; ``split_chunks`` + ``decode_chunk`` give
them one at a time (see ``VideoAutoencoderPipeline.decode_chunk``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from diffusers import AutoencoderKL
from torch import nn

from blockrt.pipelines.opensora.vae_temporal import TemporalVAE, TemporalVAEConfig

# Open-Sora multiplies SDXL-VAE latents by SD1's 0.18215 and ignores the config's 0.13025 (spec §8.8).
SPATIAL_SCALING_FACTOR = 0.18215
SPATIAL_DOWNSAMPLE = 8


@dataclass
class SpatialVAEConfig:
    """The SDXL VAE's ``AutoencoderKL`` config (``PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers``, ``vae/``).

    ``scaling_factor`` is the config's own value, kept for completeness and *not* used (see
    ``SPATIAL_SCALING_FACTOR``). ``micro_batch_size`` frames go through the VAE per call (memory only; None
    = all frames at once). ``block_out_channels`` needs 4 entries for the 8x downsampling.
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 1024
    scaling_factor: float = 0.13025
    force_upcast: bool = True
    micro_batch_size: int | None = 4

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(self.block_out_channels)
        if len(self.block_out_channels) != 4:
            raise ValueError(
                f"the SDXL VAE has 4 blocks (8x downsampling), got block_out_channels {self.block_out_channels}"
            )
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1 or None, got {self.micro_batch_size}")

    def autoencoder_kwargs(self) -> dict[str, object]:
        """Keyword arguments for ``diffusers.AutoencoderKL``."""
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": self.down_block_types,
            "up_block_types": self.up_block_types,
            "block_out_channels": self.block_out_channels,
            "layers_per_block": self.layers_per_block,
            "act_fn": self.act_fn,
            "latent_channels": self.latent_channels,
            "norm_num_groups": self.norm_num_groups,
            "sample_size": self.sample_size,
            "scaling_factor": self.scaling_factor,
            "force_upcast": self.force_upcast,
        }


@dataclass
class VAEConfig:
    """The whole VAE v1.2; the defaults are the real sizes (393,341,007 parameters + 8 buffer values).

    ``micro_frame_size`` pixel frames form one temporal chunk (17 -> 5 latent frames). ``shift``/``scale``
    are the per-channel latent normalisation, stored as ``[1, C, 1, 1, 1]`` buffers (and in the checkpoint).
    """

    spatial: SpatialVAEConfig = field(default_factory=SpatialVAEConfig)
    temporal: TemporalVAEConfig = field(default_factory=TemporalVAEConfig)
    micro_frame_size: int = 17
    shift: tuple[float, ...] = (-0.10, 0.34, 0.27, 0.98)
    scale: tuple[float, ...] = (3.85, 2.32, 2.33, 3.06)

    def __post_init__(self) -> None:
        if self.micro_frame_size < 1:
            raise ValueError(f"micro_frame_size must be >= 1, got {self.micro_frame_size}")
        if self.spatial.latent_channels != self.temporal.in_out_channels:
            raise ValueError(
                f"spatial latent_channels {self.spatial.latent_channels} != temporal in_out_channels "
                f"{self.temporal.in_out_channels}"
            )
        c = self.temporal.embed_dim
        if len(self.shift) != c or len(self.scale) != c:
            raise ValueError(
                f"shift and scale need {c} values (one per latent channel), got {len(self.shift)}, {len(self.scale)}"
            )

    @classmethod
    def tiny(cls, micro_batch_size: int | None = 4) -> VAEConfig:
        """Same modules and key names as the real VAE, tiny channel widths: for tests (~1.6 M parameters)."""
        return cls(
            spatial=SpatialVAEConfig(
                block_out_channels=(8, 16, 32, 32), norm_num_groups=4, micro_batch_size=micro_batch_size
            ),
            temporal=TemporalVAEConfig(filters=8, num_groups=4),
        )


class SpatialVAE(nn.Module):
    """Open-Sora's ``VideoAutoencoderKL``: the SDXL VAE on every frame of ``[B, C, T, H, W]``.

    The diffusers model is ``.module`` (hence the ``spatial_vae.module.*`` keys). Frames are flattened
    batch-major (``(B T)``) and run ``micro_batch_size`` at a time.
    """

    def __init__(self, config: SpatialVAEConfig | None = None) -> None:
        super().__init__()
        cfg = config or SpatialVAEConfig()
        self.module = AutoencoderKL(**cfg.autoencoder_kwargs())
        self.micro_batch_size = cfg.micro_batch_size
        self.scaling_factor = SPATIAL_SCALING_FACTOR
        self.out_channels = cfg.latent_channels

    def get_latent_size(self, input_size: list[int | None]) -> list[int | None]:
        """``[T, H, W] -> [T, H // 8, W // 8]`` (None passes through)."""
        t, h, w = input_size
        return [t, None if h is None else h // SPATIAL_DOWNSAMPLE, None if w is None else w // SPATIAL_DOWNSAMPLE]

    def _per_frame(self, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        B, _, T = x.shape[:3]
        x = x.transpose(1, 2).flatten(0, 1)  # (B*T, C, H, W), batch-major
        bs = self.micro_batch_size or x.shape[0]
        x = torch.cat([fn(x[i : i + bs]) for i in range(0, x.shape[0], bs)])
        return x.unflatten(0, (B, T)).transpose(1, 2)  # (B, C', T, H', W')

    def encode(
        self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``[B, 3, T, H, W]`` in [-1, 1] -> ``[B, 4, T, H // 8, W // 8]`` scaled by 0.18215."""

        def enc(frames: torch.Tensor) -> torch.Tensor:
            dist = self.module.encode(frames).latent_dist
            return (dist.sample(generator) if sample_posterior else dist.mode()) * self.scaling_factor

        return self._per_frame(x, enc)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``[B, 4, T, h, w]`` -> ``[B, 3, T, 8h, 8w]`` (roughly [-1, 1]; not clamped)."""
        return self._per_frame(z, lambda frames: self.module.decode(frames / self.scaling_factor).sample)


class VideoAutoencoderPipeline(nn.Module):
    """Open-Sora v1.2's VAE: ``[B, 3, N, H, W]`` video <-> ``[B, 4, T_z, H // 8, W // 8]`` latents.

    Encode: spatial VAE per frame, temporal VAE per chunk of ``micro_frame_size`` (17) frames, then
    ``(z - shift) / scale``. Decode: ``z * scale + shift``, temporal VAE per chunk of 5 latent frames (chunk
    k yields ``min(17, N - 17k)`` frames), spatial VAE per frame. ``T_z = get_latent_size([N, H, W])[0]``
    (1 -> 1, 16 -> 4, 17 -> 5, 51 -> 15, 68 -> 20); decoded H and W are ``8 * (H // 8)``, ``8 * (W // 8)``.

    For a streaming runtime the modules executed by ``decode_chunk``, in order, are
    ``temporal_vae.post_quant_conv``, ``temporal_vae.decoder.{conv1, res_blocks.0..3,
    block_res_blocks.3, conv_blocks.2, block_res_blocks.2, conv_blocks.1, block_res_blocks.1, (conv_blocks.0
    is an Identity), block_res_blocks.0, norm1, conv_out}``, then per frame micro-batch
    ``spatial_vae.module.post_quant_conv``, ``spatial_vae.module.decoder.{conv_in, mid_block,
    up_blocks.0..3, conv_norm_out, conv_out}``.

    Example:
        >>> with torch.device("meta"):
        ...     vae = VideoAutoencoderPipeline(VAEConfig())
        >>> vae.load_state_dict(load_file(".../OpenSora-VAE-v1.2/model.safetensors"), assign=True)
        >>> video = vae.decode(z, num_frames=51)  # z: (1, 4, 15, 30, 53) -> (1, 3, 51, 240, 424)
    """

    def __init__(self, config: VAEConfig | None = None) -> None:
        super().__init__()
        cfg = config or VAEConfig()
        self.config = cfg
        self.spatial_vae = SpatialVAE(cfg.spatial)
        self.temporal_vae = TemporalVAE(cfg.temporal)
        self.micro_frame_size = cfg.micro_frame_size
        self.micro_z_frame_size = self.temporal_vae.get_latent_size([cfg.micro_frame_size, None, None])[0]
        self.out_channels = self.temporal_vae.out_channels
        # Persistent, [1, C, 1, 1, 1]; under a meta device they are placeholders until load_state_dict.
        self.register_buffer("scale", torch.tensor(cfg.scale, dtype=torch.float32).view(1, -1, 1, 1, 1))
        self.register_buffer("shift", torch.tensor(cfg.shift, dtype=torch.float32).view(1, -1, 1, 1, 1))

    def get_latent_size(self, input_size: list[int | None]) -> list[int | None]:
        """``[N, H, W] -> [5 * (N // 17) + ceil((N % 17) / 4), H // 8, W // 8]`` (None passes through)."""
        n, h, w = self.spatial_vae.get_latent_size(input_size)
        if n is not None:
            full, rest = divmod(n, self.micro_frame_size)
            n = full * self.micro_z_frame_size + self.temporal_vae.get_latent_size([rest, None, None])[0]
        return [n, h, w]

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Temporal-VAE latents -> STDiT3 latents: ``(z - shift) / scale`` per channel."""
        return (z - self.shift) / self.scale

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """STDiT3 latents -> temporal-VAE latents: ``z * scale + shift`` in z's dtype (bf16 in inference)."""
        return z * self.scale.to(z.dtype) + self.shift.to(z.dtype)

    def encode(
        self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``[B, 3, N, H, W]`` in [-1, 1] -> normalised latents ``[B, 4, T_z, H // 8, W // 8]``.

        Args:
            x: video, pixel values in [-1, 1].
            sample_posterior: draw from both VAEs' posteriors as Open-Sora does (True) or take their means.
            generator: for the posterior samples.
        """
        x_z = self.spatial_vae.encode(x, sample_posterior, generator)  # (B, 4, N, h, w)
        return self.normalize(self.encode_temporal(x_z, sample_posterior, generator))

    def temporal_chunks(self, n: int) -> list[slice]:
        """The temporal VAE's independent chunks of ``n`` frames: ``micro_frame_size`` (17) each, the last one
        shorter (17 -> [0:17]; 33 -> [0:17], [17:33]). Each is encoded alone: a trainer must cut clips the same way."""
        return [slice(i, min(i + self.micro_frame_size, n)) for i in range(0, n, self.micro_frame_size)]

    def encode_temporal(
        self, x_z: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Spatial latents ``[B, 4, N, h, w]`` -> temporal-VAE latents ``[B, 4, T_z, h, w]`` (not normalised), one
        chunk (``temporal_chunks``) at a time."""
        z_list = []
        for c in self.temporal_chunks(x_z.shape[2]):
            posterior = self.temporal_vae.encode(x_z[:, :, c])  # <= 17 frames
            z_list.append(posterior.sample(generator) if sample_posterior else posterior.mode())  # <= 5 latents
        return torch.cat(z_list, dim=2)

    def split_chunks(self, z: torch.Tensor, num_frames: int) -> list[tuple[torch.Tensor, int]]:
        """``[(z_chunk [B, 4, <=5, h, w], frames_in_chunk), ...]``: the independent units of ``decode``.

        Raises ValueError if ``num_frames`` does not encode to ``z.shape[2]`` latent frames.
        """
        expected = self.get_latent_size([num_frames, None, None])[0]
        if expected != z.shape[2]:
            raise ValueError(f"num_frames {num_frames} encodes to {expected} latent frames but z has {z.shape[2]}")
        chunks = []
        for k, i in enumerate(range(0, z.shape[2], self.micro_z_frame_size)):
            n = min(self.micro_frame_size, num_frames - k * self.micro_frame_size)
            chunks.append((z[:, :, i : i + self.micro_z_frame_size], n))
        return chunks

    def decode_chunk(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Decode one temporal chunk: ``[B, 4, <=5, h, w]`` normalised latents -> ``[B, 3, num_frames, 8h, 8w]``.

        Chunks share no state (each restarts the causal zero padding), so a streaming runtime can decode a
        video chunk by chunk: ``torch.cat([vae.decode_chunk(zk, nk) for zk, nk in vae.split_chunks(z, N)], 2)``
        equals ``vae.decode(z, N)`` bit for bit when the spatial ``micro_batch_size`` is 1; otherwise only the
        grouping of frames into spatial micro-batches differs, which changes CPU conv results in the last
        float bits (PyTorch's conv kernels are not batch-size invariant), not the maths.

        Args:
            z: one chunk of at most ``micro_z_frame_size`` (5) latent frames, as produced by ``split_chunks``.
            num_frames: pixel frames in this chunk, at most ``micro_frame_size`` (17); the chunk's first
                ``(4 - num_frames % 4) % 4`` decoded frames are dropped.
        """
        if z.shape[2] > self.micro_z_frame_size or num_frames > self.micro_frame_size:
            raise ValueError(
                f"a chunk has at most {self.micro_z_frame_size} latent / {self.micro_frame_size} pixel frames, got "
                f"{z.shape[2]} / {num_frames}; use split_chunks(z, num_frames) or decode()"
            )
        x_z = self.temporal_vae.decode(self.denormalize(z), num_frames=num_frames)  # (B, 4, num_frames, h, w)
        return self.spatial_vae.decode(x_z)  # (B, 3, num_frames, 8h, 8w)

    def decode(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Normalised latents ``[B, 4, T_z, h, w]`` -> video ``[B, 3, num_frames, 8h, 8w]`` (not clamped).

        As Open-Sora does it: all temporal chunks first, then every frame through the spatial VAE in
        micro-batches of ``micro_batch_size`` across chunk boundaries. ``num_frames`` is required (a latent
        length stands for up to 4 frame counts) and must satisfy ``get_latent_size([num_frames])[0] == T_z``.
        """
        chunks = self.split_chunks(z, num_frames)
        x_z = torch.cat([self.temporal_vae.decode(self.denormalize(zk), nk) for zk, nk in chunks], dim=2)
        # x_z: (B, 4, num_frames, h, w)
        return self.spatial_vae.decode(x_z)
