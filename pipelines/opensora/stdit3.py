"""STDiT3 (Open-Sora v1.2's spatial-temporal diffusion transformer), written from the design spec §1.

``STDiT3Config`` (defaults = STDiT3-XL/2) and ``STDiT3``, whose state dict has exactly the checkpoint's keys
and shapes (``hpcai-tech/OpenSora-STDiT-v3``: 973 entries). The model builds on the ``meta`` device (nothing
in ``__init__`` reads tensor data) and ``forward`` keeps the structure blockrt streams: ``spatial_blocks[i]``
then ``temporal_blocks[i]``, each called with everything it needs as arguments. The shared building blocks
live in ``layers.py``; ``forward(..., merge_frames=True)`` runs On-device Sora's temporal token merging
(TDTM, ``tdtm.py``) inside every block with the same weights.

Example:
    >>> with torch.device("meta"):
    ...     model = STDiT3(STDiT3Config.xl2())
    >>> model.load_state_dict(safetensors.torch.load_file("model.safetensors"), assign=True)
    >>> y = torch.cat([y_cond, model.null_caption(1)])            # cond rows first, then null rows
    >>> v = model(torch.cat([z, z]), torch.tensor([984.0, 984.0]), y, mask=mask,
    ...           fps=torch.tensor([24.0]), height=torch.tensor([240.0]), width=torch.tensor([426.0]))
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from blockrt.pipelines.opensora.layers import (
    LN_EPS,
    CaptionEmbedder,
    CrossAttention,
    Mlp,
    PatchEmbed3D,
    RotaryEmbedding,
    SelfAttention,
    T2IFinalLayer,
    TimestepEmbedder,
    pos_embed_2d,
    select_frames,
    t2i_modulate,
)
from blockrt.pipelines.opensora.tdtm import (
    check_variant,
    check_x_mask,
    merge_tokens,
    merged_frames,
    merged_positions,
    unmerge_tokens,
)


@dataclass
class STDiT3Config:
    """STDiT3 hyper-parameters; the defaults are STDiT3-XL/2 (1,207,643,972 parameters).

    ``class_dropout_prob`` is training-only (caption dropout) and kept for config.json round trips.
    """

    depth: int = 28
    hidden_size: int = 1152
    num_heads: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    in_channels: int = 4
    pred_sigma: bool = True
    mlp_ratio: float = 4.0
    caption_channels: int = 4096
    model_max_length: int = 300
    qk_norm: bool = True
    input_sq_size: int = 512
    class_dropout_prob: float = 0.1

    def __post_init__(self) -> None:
        self.patch_size = tuple(int(p) for p in self.patch_size)  # type: ignore[assignment]  # JSON gives lists
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be 3 positive ints (T, H, W), got {self.patch_size}")
        if self.depth < 1 or self.num_heads < 1 or self.hidden_size % self.num_heads:
            raise ValueError(
                f"need depth >= 1 and hidden_size divisible by num_heads, got depth {self.depth}, "
                f"hidden_size {self.hidden_size}, num_heads {self.num_heads}"
            )
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by 4 (2-D sin-cos position embedding)")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} (hidden_size/num_heads) must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def out_channels(self) -> int:
        """Channels predicted per latent channel position: 2·in_channels with ``pred_sigma`` (velocity + unused)."""
        return 2 * self.in_channels if self.pred_sigma else self.in_channels

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @classmethod
    def xl2(cls) -> STDiT3Config:
        """STDiT3-XL/2, the released Open-Sora v1.2 model."""
        return cls()

    @classmethod
    def tiny(cls, **overrides: Any) -> STDiT3Config:
        """A test-sized model (about 0.2 M parameters) with the same structure."""
        base: dict[str, Any] = dict(depth=2, hidden_size=64, num_heads=4, caption_channels=32, model_max_length=12)
        return cls(**{**base, **overrides})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> STDiT3Config:
        """From an HF ``config.json`` dict: known fields are taken, kernel/training switches ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class STDiT3Block(nn.Module):
    """One spatial or temporal transformer block (adaLN-single modulated self-attention and MLP, plus an
    unmodulated, ungated cross-attention to the caption).

    Weights: ``scale_shift_table`` ``(6, C)`` + the rows of ``t_mlp``; ``attn``; ``cross_attn``; ``mlp``.
    The block gets the latent grid ``T`` x ``S`` explicitly, so TDTM (``merge_frames``) changes the frame
    layout of its attentions inside the block without touching the caller.
    """

    def __init__(self, cfg: STDiT3Config, temporal: bool) -> None:
        super().__init__()
        C = cfg.hidden_size
        self.temporal = temporal
        self.norm1 = nn.LayerNorm(C, eps=LN_EPS, elementwise_affine=False)
        self.attn = SelfAttention(C, cfg.num_heads, cfg.qk_norm)
        self.cross_attn = CrossAttention(C, cfg.num_heads)
        self.norm2 = nn.LayerNorm(C, eps=LN_EPS, elementwise_affine=False)
        self.mlp = Mlp(C, cfg.mlp_hidden, C)
        self.scale_shift_table = nn.Parameter(torch.randn(6, C) / C**0.5)

    def _attention(
        self,
        h: torch.Tensor,
        T: int,
        S: int,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        merge_frames: bool = False,
    ) -> torch.Tensor:
        """Self-attention within each frame (spatial) or along time at each patch (temporal).

        With ``merge_frames`` it runs on the ``T' = ceil(T/2)`` merged frames (``tdtm.merge``): spatial is
        ``B*T'`` sequences of ``S`` tokens, temporal ``B*S`` sequences of ``T'`` tokens (``rope`` must then
        have ``T'`` positions); the output is repeated back to ``T`` frames (``tdtm.unmerge``).
        """
        if merge_frames:
            h = merge_tokens(h, T, S)  # (B, T'*S, C)
            h = self._attention(h, merged_frames(T), S, rope)  # (B, T'*S, C)
            return unmerge_tokens(h, T, S)  # (B, T*S, C)
        B, N, C = h.shape  # (B, T*S, C)
        if self.temporal:
            if rope is not None and rope[0].shape[0] != T:
                raise ValueError(f"rope has {rope[0].shape[0]} positions but the temporal attention spans {T} frames")
            h = h.reshape(B, T, S, C).transpose(1, 2).reshape(B * S, T, C)  # (B*S, T, C)
            h = self.attn(h, rope)
            return h.view(B, S, T, C).transpose(1, 2).reshape(B, N, C)  # (B, T*S, C)
        h = self.attn(h.reshape(B * T, S, C))  # (B*T, S, C)
        return h.view(B, N, C)  # (B, T*S, C)

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        t_mlp: torch.Tensor,
        T: int,
        S: int,
        y_mask: torch.Tensor | None = None,
        x_mask: torch.Tensor | None = None,
        t0_mlp: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        merge_frames: bool = False,
    ) -> torch.Tensor:
        """Args:
            x: ``(B, T*S, C)`` tokens, frame-major.
            y: ``(B, L, C)`` projected caption tokens; y_mask ``(B, L)`` bool (True = valid) or None.
            t_mlp: ``(B, 6C)`` the shared ``t_block`` output; t0_mlp the same for t=0 (with ``x_mask``).
            T, S: frames and patches per frame.
            x_mask: ``(B, T)`` bool: frames that are False use the t=0 modulation (I2V conditioning frames).
            rope: ``(cos, sin)`` ``(T, head_dim)`` for temporal blocks (``(ceil(T/2), head_dim)`` with
                ``merge_frames``); None for spatial blocks.
            merge_frames: TDTM (``tdtm.py``): self- and cross-attention run on consecutive frame pairs merged
                by their mean and their outputs are repeated back to ``T`` frames; modulation, gates,
                residuals and the MLP stay at ``T`` frames. With ``x_mask`` both frames of every pair must
                have the same mask value (``STDiT3.forward`` checks it; a direct caller must).

        Returns:
            ``(B, T*S, C)``.
        """
        B, N, C = x.shape
        mods = (self.scale_shift_table[None] + t_mlp.reshape(B, 6, C)).chunk(6, dim=1)  # 6 x (B, 1, C)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        if x_mask is not None:
            mods0 = (self.scale_shift_table[None] + t0_mlp.reshape(B, 6, C)).chunk(6, dim=1)
            shift_msa0, scale_msa0, gate_msa0, shift_mlp0, scale_mlp0, gate_mlp0 = mods0

        # self-attention, modulated and gated
        h = self.norm1(x)
        h_m = t2i_modulate(h, shift_msa, scale_msa)  # (B, T*S, C)
        if x_mask is not None:
            h_m = select_frames(x_mask, h_m, t2i_modulate(h, shift_msa0, scale_msa0), T, S)
        a = self._attention(h_m, T, S, rope, merge_frames)  # (B, T*S, C)
        a_g = gate_msa * a
        if x_mask is not None:
            a_g = select_frames(x_mask, a_g, gate_msa0 * a, T, S)
        x = x + a_g

        # cross-attention: no norm, no modulation, no gate; the queries are the residual stream itself
        if merge_frames:
            x = x + unmerge_tokens(self.cross_attn(merge_tokens(x, T, S), y, y_mask), T, S)  # T'*S queries
        else:
            x = x + self.cross_attn(x, y, y_mask)

        # MLP, modulated and gated
        h = self.norm2(x)
        h_m = t2i_modulate(h, shift_mlp, scale_mlp)
        if x_mask is not None:
            h_m = select_frames(x_mask, h_m, t2i_modulate(h, shift_mlp0, scale_mlp0), T, S)
        m = self.mlp(h_m)  # (B, T*S, C)
        m_g = gate_mlp * m
        if x_mask is not None:
            m_g = select_frames(x_mask, m_g, gate_mlp0 * m, T, S)
        return x + m_g  # (B, T*S, C)


def _tile(v: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    """Repeat a per-prompt tensor ``(n, ...)`` to the CFG batch ``(batch, ...)`` as ``[v, v, ...]``."""
    n = v.shape[0]
    if n == batch:
        return v
    if n == 0 or batch % n:
        raise ValueError(f"{what} has batch {n}, which does not divide the model batch {batch}")
    return v.repeat(batch // n, *([1] * (v.ndim - 1)))


def _first_value(v: torch.Tensor | float | int | None, what: str) -> float:
    if v is None:
        raise ValueError(f"STDiT3.forward needs {what} (pixel size of the video, a tensor [n] or a number)")
    if isinstance(v, torch.Tensor):
        return float(v.reshape(-1)[0])  # one host read per call (the original's height[0].item())
    return float(v)


class STDiT3(nn.Module):
    """Open-Sora v1.2's STDiT3: latent video ``(B, 4, T, H, W)`` + timestep + T5 caption → velocity.

    Sub-modules (checkpoint names): ``x_embedder``, ``t_embedder``, ``fps_embedder``, ``t_block``,
    ``y_embedder``, ``rope``, ``spatial_blocks``/``temporal_blocks`` (``depth`` each), ``final_layer``.
    Dtype follows the weights; the output is fp32.
    """

    def __init__(self, config: STDiT3Config | None = None) -> None:
        super().__init__()
        cfg = self.config = config or STDiT3Config()
        C = cfg.hidden_size
        self.rope = RotaryEmbedding(cfg.head_dim)
        self.x_embedder = PatchEmbed3D(cfg.patch_size, cfg.in_channels, C)
        self.t_embedder = TimestepEmbedder(C)
        self.fps_embedder = TimestepEmbedder(C)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        self.y_embedder = CaptionEmbedder(cfg.caption_channels, C, cfg.model_max_length)
        self.spatial_blocks = nn.ModuleList(STDiT3Block(cfg, temporal=False) for _ in range(cfg.depth))
        self.temporal_blocks = nn.ModuleList(STDiT3Block(cfg, temporal=True) for _ in range(cfg.depth))
        self.final_layer = T2IFinalLayer(C, math.prod(cfg.patch_size) * cfg.out_channels)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: that of the weights (``x_embedder.proj.weight``)."""
        return self.x_embedder.proj.weight.dtype

    def null_caption(self, n: int = 1) -> torch.Tensor:
        """The CFG null caption for ``n`` prompts: ``y_embedder.y_embedding`` as ``(n, 1, L, caption_channels)``.

        Concatenate it *after* the conditional captions (``y = cat([y_cond, null])``) and pass the prompts'
        own token mask: the null rows are masked with their prompt's mask.
        """
        return self.y_embedder.y_embedding[None, None].expand(n, 1, -1, -1)

    def encode_text(self, y: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Project caption tokens and expand the token mask to the batch.

        Args:
            y: ``(B, 1, L, caption_channels)`` (or ``(B, L, caption_channels)``) in the model dtype.
            mask: ``(n, L)`` int/bool with ``n`` dividing B (tiled: CFG null rows reuse the prompt's mask),
                or None for all tokens valid.

        Returns:
            ``(B, L, C)`` projected tokens and ``(B, L)`` bool validity (or None).
        """
        if y.ndim == 4:
            y = y.squeeze(1)
        y = self.y_embedder(y)  # (B, L, C)
        if mask is None:
            return y, None
        mask = _tile(mask.reshape(mask.shape[0], -1), y.shape[0], "mask")
        if mask.shape[1] != y.shape[1]:
            raise ValueError(f"mask has {mask.shape[1]} tokens but y has {y.shape[1]}")
        return y, (mask != 0).to(y.device)

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        y: torch.Tensor,
        mask: torch.Tensor | None = None,
        x_mask: torch.Tensor | None = None,
        fps: torch.Tensor | float | None = None,
        height: torch.Tensor | float | None = None,
        width: torch.Tensor | float | None = None,
        merge_frames: bool = False,
        merge_positions: str = "index",
        merge_blocks: str = "all",
        **kwargs: Any,
    ) -> torch.Tensor:
        """Predict the velocity (channels 0..in_channels-1) and the unused sigma channels.

        Args:
            x: ``(B, in_channels, T, H, W)`` latent; any H, W (padded to the patch at the end, cropped back).
            timestep: ``(B,)`` in [0, 1000]; cast to the model dtype first (bf16 quantises it).
            y: ``(B, 1, L, caption_channels)`` T5 features; for CFG the conditional rows come first.
            mask: ``(n, L)`` caption token mask (1 = valid), n dividing B, or None (all valid).
            x_mask: ``(B, T)`` (or ``(n, T)``) bool; frames that are False are treated as clean (t = 0).
            fps: ``(n,)`` frames per second (24 for video, 120 for a single image) or a number.
            height, width: ``(n,)`` pixel size of the video (the first entry is used) or numbers.
            merge_frames: TDTM: every block's self- and cross-attention runs on ``ceil(T/2)`` merged frames
                (pairs averaged, an odd last frame alone; RoPE positions 0..ceil(T/2)-1). The sampler sets it
                for the steps ``GenerateConfig.merges`` picks. With ``x_mask``, each pair must share one mask value.
            merge_positions: TDTM's RoPE positions of the merged frames (``tdtm.merged_positions``): ``"index"``
                0..ceil(T/2)-1 (the paper's), or ``"centre"`` (``2g + 0.5``: the trained distances kept).
            merge_blocks: which blocks merge with ``merge_frames``: ``"all"`` (the paper's), ``"spatial"``,
                ``"temporal"``; the others run on every frame.
            **kwargs: ignored (the sampler also passes ``num_frames``, ``ar``).

        Returns:
            ``(B, out_channels, T, H, W)`` fp32.
        """
        cfg = self.config
        dtype = self.dtype
        check_variant(merge_positions, merge_blocks)
        B, _, Tx, Hx, Wx = x.shape
        device = x.device
        x, y = x.to(dtype), y.to(dtype)
        timestep = torch.as_tensor(timestep, device=device).reshape(-1).to(dtype)  # bf16 quantises t
        if y.shape[0] != B or timestep.shape[0] not in (1, B):
            raise ValueError(f"x has batch {B} but y has {y.shape[0]} and timestep {timestep.shape[0]}")
        timestep = timestep.expand(B)

        # patch grid (after end padding)
        pt, ph, pw = cfg.patch_size
        T, H, W = -(-Tx // pt), -(-Hx // ph), -(-Wx // pw)
        S = H * W
        scale = math.sqrt(_first_value(height, "height") * _first_value(width, "width")) / cfg.input_sq_size
        pos_emb = pos_embed_2d(H, W, cfg.hidden_size, scale=scale, base_size=round(S**0.5), dtype=dtype, device=device)

        # timestep + fps conditioning, shared by all blocks (and the t=0 set for x_mask)
        if fps is None:
            raise ValueError("STDiT3.forward needs fps (24 for video, 120 for single images): a tensor [n] or a number")
        fps = _tile(torch.as_tensor(fps, device=device).reshape(-1), B, "fps")
        fps_emb = self.fps_embedder(fps)  # (B, C)
        t = self.t_embedder(timestep) + fps_emb  # (B, C)
        t_mlp = self.t_block(t)  # (B, 6C)
        t0 = t0_mlp = None
        if x_mask is not None:
            x_mask = _tile(x_mask.to(device=device, dtype=torch.bool), B, "x_mask")
            if x_mask.shape[1] != T:
                raise ValueError(f"x_mask has {x_mask.shape[1]} frames but the latent has {T}")
            if merge_frames:
                check_x_mask(x_mask, T)  # both frames of a merged pair must share one x_mask value
            t0 = self.t_embedder(torch.zeros_like(timestep)) + fps_emb  # (B, C)
            t0_mlp = self.t_block(t0)  # (B, 6C)

        y, y_mask = self.encode_text(y, mask)  # (B, L, C), (B, L)

        x = self.x_embedder(x)  # (B, T*S, C)
        x = (x.reshape(B, T, S, -1) + pos_emb).view(B, T * S, -1)  # (B, T*S, C)

        merge_s = merge_frames and merge_blocks in ("all", "spatial")
        merge_t = merge_frames and merge_blocks in ("all", "temporal")
        if not merge_t:
            rope = self.rope.cos_sin(T, dtype, device)  # 2 x (T, head_dim)
        elif merge_positions == "index":
            rope = self.rope.cos_sin(merged_frames(T), dtype, device)  # 2 x (T', head_dim): positions 0..T'-1
        else:  # 2 x (T', head_dim) at the groups' centre frame indices
            rope = self.rope.cos_sin(merged_frames(T), dtype, device, merged_positions(T, merge_positions))
        kw = dict(y_mask=y_mask, x_mask=x_mask, t0_mlp=t0_mlp)
        for spatial, temporal in zip(self.spatial_blocks, self.temporal_blocks):
            x = spatial(x, y, t_mlp, T, S, merge_frames=merge_s, **kw)
            x = temporal(x, y, t_mlp, T, S, rope=rope, merge_frames=merge_t, **kw)

        x = self.final_layer(x, t, T, S, x_mask=x_mask, t0=t0)  # (B, T*S, prod(patch)*C_out)
        return unpatchify(x, (T, H, W), cfg.patch_size, cfg.out_channels, (Tx, Hx, Wx)).float()


def unpatchify(
    x: torch.Tensor,
    grid: tuple[int, int, int],
    patch_size: tuple[int, int, int],
    out_channels: int,
    size: tuple[int, int, int],
) -> torch.Tensor:
    """Tokens ``(B, T*H*W, pt*ph*pw*C_out)`` (C_out fastest) → ``(B, C_out, T·pt, H·ph, W·pw)``, cropped to
    ``size``:

    ``out[b, c, t·pt+k, h·ph+i, w·pw+j] = x[b, (t·H+h)·W+w, ((k·ph+i)·pw+j)·C_out + c]``.
    """
    B = x.shape[0]
    T, H, W = grid
    pt, ph, pw = patch_size
    x = x.view(B, T, H, W, pt, ph, pw, out_channels)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(B, out_channels, T * pt, H * ph, W * pw)
    Tx, Hx, Wx = size
    return x[:, :, :Tx, :Hx, :Wx]  # (B, C_out, T, H, W)
