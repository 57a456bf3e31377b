"""STDiT3 as CoreML-exportable modules: ``stdit3_embed``, ``stdit3_block_00..27``, ``stdit3_final``.

The On-device Sora split (``ondevice-sora.md`` §1, §8): the embedders, one package per layer (spatial
block i + temporal block i, the unit blockrt streams) and the final layer with unpatchify. Each wrapper
holds the original sub-modules (same parameters, nothing copied); shapes are those of one export
(resolution, frames, CFG batch), baked where ``STDiT3.forward`` computes them on the host:

- ``stdit3_embed``: patch, timestep, fps and caption embedders and ``t_block``. The 2-D position embedding
  depends only on the grid and the pixel size, so it is a constant buffer computed by the model's own
  ``pos_embed_2d``; the latent's end padding to the patch is a concatenation of zeros (no 5-D ``pad``).
  The caption mask leaves as an *additive* float mask ``(B, L)``: 0 valid, ``MASK_MIN`` padding.
- ``stdit3_block_i``: ``spatial_blocks[i]`` then ``temporal_blocks[i]``, called unchanged. The blocks
  pass the mask to ``F.scaled_dot_product_attention`` as ``y_mask[:, None, None, :]``; a float mask is
  added to the scores, where the boolean one masks with ``-inf``: identical softmax weights (exp underflows
  to exactly 0 either way), checked bit for bit against the original call. RoPE ``cos``/``sin``
  ``(T, head_dim)`` are inputs (computed on the host by ``model.rope.cos_sin``: in-graph arange + outer
  does not convert). With ``merged=True`` the block runs TDTM (``merge_frames``): same inputs, ``cos/sin``
  for ``ceil(T/2)`` frames.
- ``stdit3_final``: ``final_layer`` then ``unpatchify_5d``, a chain of <= 4-D reshapes and permutes equal
  to the original 8-D one (CoreML's rank limit is 5), and the crop of the patch padding.

Text-to-video only: the ``x_mask`` (I2V conditioning frames) branch is not exported, as in the authors' code.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from blockrt.pipelines.opensora.coreml_t5 import MASK_MIN
from blockrt.pipelines.opensora.layers import pos_embed_2d
from blockrt.pipelines.opensora.stdit3 import STDiT3, STDiT3Block


def patch_grid(model: STDiT3, latent: tuple[int, int, int]) -> tuple[int, int, int]:
    """Latent ``(T, H, W)`` -> patch grid ``(T, H, W)`` after end padding (ceil division by the patch)."""
    return tuple(-(-n // p) for n, p in zip(latent, model.config.patch_size))  # type: ignore[return-value]


class STDiT3Embed(nn.Module):
    """``(z, timestep, y, mask, fps)`` -> ``(x, t_mlp, t, y_tokens, y_mask)``.

    Shapes: z ``(B, 4, T, H, W)``; timestep ``(B,)``; y ``(B, 1, L, caption_channels)``; mask ``(n, L)``
    int (n divides B: CFG null rows reuse the prompt's mask); fps ``(n,)``. Outputs: x ``(B, T*S, C)``,
    t_mlp ``(B, 6C)``, t ``(B, C)`` (for the final layer), y_tokens ``(B, L, C)``, y_mask ``(B, L)`` additive.
    """

    def __init__(self, model: STDiT3, latent: tuple[int, int, int], height: float, width: float) -> None:
        super().__init__()
        self.model_parts = nn.ModuleDict({"x_embedder": model.x_embedder, "t_embedder": model.t_embedder,
                                          "fps_embedder": model.fps_embedder, "t_block": model.t_block,
                                          "y_embedder": model.y_embedder})
        cfg = model.config
        self.latent = tuple(latent)
        self.grid = patch_grid(model, self.latent)
        _, H, W = self.grid
        S = H * W
        scale = math.sqrt(height * width) / cfg.input_sq_size
        pos = pos_embed_2d(H, W, cfg.hidden_size, scale=scale, base_size=round(S**0.5), dtype=model.dtype,
                           device=torch.device("cpu"))
        self.register_buffer("pos_emb", pos, persistent=False)  # (1, S, C): a function of the grid only

    def _pad_to_patch(self, z: torch.Tensor) -> torch.Tensor:
        """Zeros at the end of T, H, W up to the patch grid, by concatenation (equal to ``F.pad``)."""
        for dim, (n, g, p) in zip((2, 3, 4), zip(self.latent, self.grid, self.model_parts["x_embedder"].patch_size)):
            extra = g * p - n
            if extra:
                shape = list(z.shape)
                shape[dim] = extra
                z = torch.cat([z, z.new_zeros(shape)], dim=dim)
        return z

    def forward(self, z: torch.Tensor, timestep: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                fps: torch.Tensor) -> tuple[torch.Tensor, ...]:
        p = self.model_parts
        B = z.shape[0]
        dtype = self.pos_emb.dtype
        fps_emb = p["fps_embedder"](fps.reshape(-1).repeat(B // fps.shape[0]))  # (B, C)
        t = p["t_embedder"](timestep.reshape(-1).to(dtype)) + fps_emb  # (B, C)
        t_mlp = p["t_block"](t)  # (B, 6C)
        y_tokens = p["y_embedder"](y.squeeze(1).to(dtype))  # (B, L, C)
        valid = mask.reshape(mask.shape[0], -1).repeat(B // mask.shape[0], 1) != 0  # (B, L)
        y_mask = torch.zeros(valid.shape, dtype=dtype).masked_fill(~valid, MASK_MIN)  # (B, L) additive
        x = p["x_embedder"].proj(self._pad_to_patch(z.to(dtype)))  # (B, C, T, H, W)
        x = x.flatten(2).transpose(1, 2)  # (B, T*S, C)
        T, H, W = self.grid
        x = (x.reshape(B, T, H * W, -1) + self.pos_emb).view(B, T * H * W, -1)  # (B, T*S, C)
        return x, t_mlp, t, y_tokens, y_mask


class STDiT3Layer(nn.Module):
    """``spatial_blocks[i]`` + ``temporal_blocks[i]``: ``(x, y, t_mlp, y_mask, rope_cos, rope_sin)`` -> x.

    ``y_mask`` is the additive ``(B, L)`` mask of ``STDiT3Embed``; ``rope_cos``/``rope_sin`` are
    ``(T, head_dim)`` (``(ceil(T/2), head_dim)`` when ``merged``). ``T`` and ``S`` are the export's grid.
    """

    def __init__(self, spatial: STDiT3Block, temporal: STDiT3Block, T: int, S: int, merged: bool = False) -> None:
        super().__init__()
        self.spatial, self.temporal = spatial, temporal
        self.T, self.S, self.merged = T, S, merged

    def forward(self, x: torch.Tensor, y: torch.Tensor, t_mlp: torch.Tensor, y_mask: torch.Tensor,
                rope_cos: torch.Tensor, rope_sin: torch.Tensor) -> torch.Tensor:
        kw = dict(y_mask=y_mask, merge_frames=self.merged)
        x = self.spatial(x, y, t_mlp, self.T, self.S, **kw)  # (B, T*S, C)
        return self.temporal(x, y, t_mlp, self.T, self.S, rope=(rope_cos, rope_sin), **kw)  # (B, T*S, C)


class ReferenceLayer(STDiT3Layer):
    """The same two blocks called as ``STDiT3.forward`` calls them: boolean caption mask."""

    def forward(self, x: torch.Tensor, y: torch.Tensor, t_mlp: torch.Tensor, y_mask: torch.Tensor,
                rope_cos: torch.Tensor, rope_sin: torch.Tensor) -> torch.Tensor:
        kw = dict(y_mask=y_mask == 0, merge_frames=self.merged)
        x = self.spatial(x, y, t_mlp, self.T, self.S, **kw)
        return self.temporal(x, y, t_mlp, self.T, self.S, rope=(rope_cos, rope_sin), **kw)


def unpatchify_5d(x: torch.Tensor, grid: tuple[int, int, int], patch_size: tuple[int, int, int],
                  out_channels: int) -> torch.Tensor:
    """``stdit3.unpatchify`` without 8-D tensors (before the crop): tokens ``(B, T*H*W, pt*ph*pw*C_out)``
    -> ``(B, C_out, T*pt, H*ph, W*pw)`` with
    ``out[b, c, t·pt+k, h·ph+i, w·pw+j] = x[b, (t·H+h)·W+w, ((k·ph+i)·pw+j)·C_out + c]``, every tensor <= 4-D.
    """
    B = x.shape[0]
    T, H, W = grid
    pt, ph, pw = patch_size
    C = out_channels
    x = x.reshape(B * T, H * W, pt, ph * pw * C).transpose(1, 2)  # (B*T, pt, H*W, ph*pw*C): frame t*pt+k
    x = x.reshape(B * T * pt * H, W, ph, pw * C).transpose(1, 2)  # (B*T'*H, ph, W, pw*C): row h*ph+i
    x = x.reshape(B, T * pt * H * ph * W * pw, C).transpose(1, 2)  # (B, C, T'*H'*W'): column w*pw+j
    return x.reshape(B, C, T * pt, H * ph, W * pw)  # (B, C_out, T', H', W')


class STDiT3Final(nn.Module):
    """``(x, t)`` -> velocity and sigma ``(B, out_channels, T, H, W)`` fp32, cropped to the latent size."""

    def __init__(self, model: STDiT3, latent: tuple[int, int, int], reference: bool = False) -> None:
        super().__init__()
        self.final_layer = model.final_layer
        self.latent = tuple(latent)
        self.grid = patch_grid(model, self.latent)
        self.patch_size = model.config.patch_size
        self.out_channels = model.config.out_channels
        self.reference = reference

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        from blockrt.pipelines.opensora.stdit3 import unpatchify

        T, H, W = self.grid
        x = self.final_layer(x, t, T, H * W)  # (B, T*S, prod(patch)*C_out)
        if self.reference:  # the original 8-D unpatchify
            return unpatchify(x, self.grid, self.patch_size, self.out_channels, self.latent).float()
        Tx, Hx, Wx = self.latent
        x = unpatchify_5d(x, self.grid, self.patch_size, self.out_channels)
        return x[:, :, :Tx, :Hx, :Wx].float()  # (B, C_out, T, H, W)


def block_name(i: int) -> str:
    """``stdit3_block_07``: the package of ``spatial_blocks[7]`` + ``temporal_blocks[7]``."""
    return f"stdit3_block_{i:02d}"


EMBED_IO = (("z", "timestep", "y", "mask", "fps"), ("x", "t_mlp", "t", "y_tokens", "y_mask"))
LAYER_IO = (("x", "y_tokens", "t_mlp", "y_mask", "rope_cos", "rope_sin"), ("x_out",))
FINAL_IO = (("x", "t"), ("velocity",))
