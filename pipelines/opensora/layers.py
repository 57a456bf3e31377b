"""STDiT3's building blocks: embedders, attention with qk RMS-norm and RoPE, cross-attention, the final layer.

Written from ``shared/design/opensora-v1.2.md`` §1 (Open-Sora v1.2.0's ``opensora/models/layers/blocks.py``,
its timm ``Mlp`` and ``rotary_embedding_torch`` 0.5.3). Module and parameter names are the checkpoint's.
Nothing here holds a non-persistent buffer: values the original cached in buffers (the 2-D position
embedding's ``inv_freq``, RoPE's cached angles) are computed in ``forward`` on the activations' device, so a
model built on the ``meta`` device and loaded with ``load_state_dict(..., assign=True)`` (or streamed by
blockrt) has nothing left on ``meta``.

Where the original rounds through the model dtype (bf16), so does this code: see the comments at each cast.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LN_EPS = 1e-6  # every LayerNorm (non-affine) and the qk RMS-norm
ROPE_THETA = 10000.0
POS_EMBED_THETA = 10000.0
TIMESTEP_FREQ_DIM = 256  # sinusoid size of the timestep and fps embedders
TIMESTEP_MAX_PERIOD = 10000


def t2i_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """PixArt's adaLN-single modulation ``x·(1+scale) + shift`` (this op order, for bf16 rounding)."""
    return x * (1 + scale) + shift


def select_frames(x_mask: torch.Tensor, x: torch.Tensor, x_zero: torch.Tensor, T: int, S: int) -> torch.Tensor:
    """Per latent frame, ``x`` where ``x_mask`` is True and ``x_zero`` (the t=0 branch) where it is False.

    Args:
        x_mask: ``(B, T)`` bool.
        x, x_zero: ``(B, T*S, C)``.
    """
    B, N, C = x.shape
    out = torch.where(x_mask[:, :, None, None], x.view(B, T, S, C), x_zero.view(B, T, S, C))  # (B, T, S, C)
    return out.reshape(B, N, C)  # (B, T*S, C)


# --------------------------------------------------------------------------------------------------------
# Embeddings without weights
# --------------------------------------------------------------------------------------------------------


def timestep_sinusoid(t: torch.Tensor, dim: int = TIMESTEP_FREQ_DIM) -> torch.Tensor:
    """``[cos(t·f), sin(t·f)]`` (cos first) with ``f_k = exp(-ln(10000)·k/(dim/2))``, in fp32.

    Args:
        t: ``(B,)`` any float dtype; it is promoted to fp32 (after whatever rounding its dtype did).

    Returns:
        ``(B, dim)`` fp32.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(TIMESTEP_MAX_PERIOD) * torch.arange(0, half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs.to(t.device)[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


def pos_embed_2d(
    H: int, W: int, dim: int, *, scale: float, base_size: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """2-D sin-cos position embedding of an ``H x W`` patch grid, shared by every frame.

    Token ``s = r·W + c`` (row r, column c) gets ``[sin(x_c·f), cos(x_c·f), sin(y_r·f), cos(y_r·f)]`` with
    ``f_i = 1/10000^(2i/(dim/2))`` (``dim/4`` frequencies), ``x_c = c/scale·base_size/W`` and
    ``y_r = r/scale·base_size/H``: the *column* coordinate comes first. Computed in fp32; ``f`` is first
    rounded through ``dtype`` because the bf16 original holds it in a buffer cast with the model.

    Returns:
        ``(1, H*W, dim)`` in ``dtype``.
    """
    half = dim // 2
    inv_freq = 1.0 / (POS_EMBED_THETA ** (torch.arange(0, half, 2, device=device).float() / half))
    inv_freq = inv_freq.to(dtype).float()  # (dim/4,)
    grid_y = torch.arange(H, device=device) / scale * (base_size / H)  # (H,) fp32, row coordinate
    grid_x = torch.arange(W, device=device) / scale * (base_size / W)  # (W,) fp32, column coordinate
    grid_y = grid_y[:, None].expand(H, W).reshape(-1)  # (H*W,)
    grid_x = grid_x[None, :].expand(H, W).reshape(-1)  # (H*W,)

    def sincos(pos: torch.Tensor) -> torch.Tensor:
        out = pos[:, None] * inv_freq[None]  # (H*W, dim/4)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=-1)  # (H*W, dim/2)

    return torch.cat([sincos(grid_x), sincos(grid_y)], dim=-1).unsqueeze(0).to(dtype)  # (1, H*W, dim)


# --------------------------------------------------------------------------------------------------------
# Embedders with weights
# --------------------------------------------------------------------------------------------------------


class PatchEmbed3D(nn.Module):
    """Zero-pad the latent at the end of W, H, T to multiples of the patch, ``Conv3d`` with kernel = stride,
    flatten to tokens in (t, h, w) row-major order. No norm layer."""

    def __init__(self, patch_size: tuple[int, int, int], in_channels: int, dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pt, ph, pw = self.patch_size
        _, _, T, H, W = x.shape  # (B, C_in, T, H, W)
        x = F.pad(x, (0, -W % pw, 0, -H % ph, 0, -T % pt))  # end padding, zeros
        x = self.proj(x)  # (B, C, T/pt, H/ph, W/pw)
        return x.flatten(2).transpose(1, 2)  # (B, T*S, C)


class TimestepEmbedder(nn.Module):
    """Sinusoid (``timestep_sinusoid``) cast to the weights' dtype, then ``Linear → SiLU → Linear``.

    Serves as both ``t_embedder`` and ``fps_embedder`` (the original's ``SizeEmbedder`` is this module with
    the batch tiling done by its caller).
    """

    def __init__(self, hidden_size: int, freq_dim: int = TIMESTEP_FREQ_DIM) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = timestep_sinusoid(t, self.freq_dim).to(self.mlp[0].weight.dtype)  # (B, 256)
        return self.mlp(t_freq)  # (B, C)


class Mlp(nn.Module):
    """timm's ``Mlp`` as used by Open-Sora: ``fc1 → GELU(tanh) → fc2`` (dropout 0, no norm)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CaptionEmbedder(nn.Module):
    """``y_proj`` (Mlp caption_channels → C → C) for the T5 tokens, and the learned null caption.

    ``y_embedding`` ``(model_max_length, caption_channels)`` is a persistent buffer: the classifier-free
    guidance null caption. ``forward`` does not use it; ``STDiT3.null_caption`` hands it to the sampler.
    """

    def __init__(self, caption_channels: int, hidden_size: int, token_num: int) -> None:
        super().__init__()
        self.y_proj = Mlp(caption_channels, hidden_size, hidden_size)
        self.register_buffer("y_embedding", torch.randn(token_num, caption_channels) / caption_channels**0.5)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.y_proj(y)  # (B, L, C)


# --------------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """LlamaRMSNorm: ``weight · (x·rsqrt(mean(x²)+eps))`` with the normalisation in fp32, cast back first."""

    def __init__(self, dim: int, eps: float = LN_EPS) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rope_frequencies(dim: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``rope.freqs``: ``1/10000^(2i/dim)``, i = 0..dim/2-1, fp32 (a deterministic constant; a loader may
    fill it in when a checkpoint lacks it)."""
    return 1.0 / (ROPE_THETA ** (torch.arange(0, dim, 2, device=device)[: dim // 2].float() / dim))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Interleaved pairs: ``(x0, x1, x2, x3, ...) → (-x1, x0, -x3, x2, ...)``."""
    pairs = x.unflatten(-1, (-1, 2))  # (..., D/2, 2)
    x0, x1 = pairs.unbind(-1)
    return torch.stack((-x1, x0), dim=-1).flatten(-2)  # (..., D)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``(..., N, D)`` by per-position angles: ``x·cos + rotate_half(x)·sin``, cos/sin ``(N, D)``."""
    return x * cos + rotate_half(x) * sin


class RotaryEmbedding(nn.Module):
    """RoPE over the frame axis of the temporal blocks (rotary_embedding_torch 0.5.3, ``dim`` = head_dim).

    Holds only ``freqs`` ``(dim/2,)``, an ``nn.Parameter`` without grad as in the checkpoint (``rope.freqs``).
    Blocks do not reference this module: ``STDiT3.forward`` calls ``cos_sin`` and passes the result to
    every temporal block, so a streamed block owns no tensor of another module.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.freqs = nn.Parameter(rope_frequencies(dim), requires_grad=False)

    def cos_sin(self, n: int, dtype: torch.dtype, device: torch.device,
                positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of the angles ``pos·freqs[j//2]`` for positions 0..n-1, each ``(n, dim)`` in ``dtype``.

        Follows the original's roundings: positions are made in the activations' ``dtype``, then the
        product, its cos and sin are computed in the dtype of ``freqs`` (bf16 in the bf16 original).
        ``positions`` ``(n,)``: other positions than 0..n-1 (TDTM's group centres), rounded the same way.
        """
        freqs = self.freqs.to(device)
        if positions is None:
            pos = torch.arange(n, device=device, dtype=dtype).to(freqs.dtype)  # (n,)
        else:
            if positions.shape != (n,):
                raise ValueError(f"positions must have shape ({n},), got {tuple(positions.shape)}")
            pos = positions.to(device=device, dtype=dtype).to(freqs.dtype)  # (n,)
        angles = (pos[:, None] * freqs[None]).repeat_interleave(2, dim=-1)  # (n, dim), pairs share an angle
        return angles.cos().to(dtype), angles.sin().to(dtype)


class SelfAttention(nn.Module):
    """Multi-head self-attention: fused ``qkv`` (outer 3-way split), qk RMS-norm over head_dim, optional
    RoPE after the norm, ``F.scaled_dot_product_attention``, ``proj``."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Args: x ``(B', N, C)`` (B' sequences of N tokens); rope: ``(cos, sin)`` each ``(N, head_dim)``."""
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # 3 x (B', nh, N, hd)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = F.scaled_dot_product_attention(q, k, v)  # (B', nh, N, hd)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))  # (B', N, C)


class CrossAttention(nn.Module):
    """Image tokens attend to caption tokens: ``q_linear``, ``kv_linear`` (k = first C outputs, v = second),
    ``proj``; no norm, no RoPE. Each sample's queries see only its own valid caption tokens."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor, y_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Args: x ``(B, N, C)``; y ``(B, L, C)``; y_mask ``(B, L)`` bool, True = valid token (None: all valid).

        The original packs the valid tokens of all samples into one sequence with a block-diagonal mask;
        a per-sample key mask on padded keys is the same function.
        """
        B, N, C = x.shape
        L = y.shape[1]
        q = self.q_linear(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, N, hd)
        kv = self.kv_linear(y).view(B, L, 2, self.num_heads, self.head_dim)
        k, v = kv.unbind(2)  # 2 x (B, L, nh, hd)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, L, hd)
        attn_mask = None if y_mask is None else y_mask[:, None, None, :]  # (B, 1, 1, L)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, nh, N, hd)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))  # (B, N, C)


# --------------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------------


class T2IFinalLayer(nn.Module):
    """Non-affine LayerNorm modulated by ``t`` (t_emb + fps_emb: no SiLU, no t_block), then ``linear``.

    ``scale_shift_table`` row 0 is the shift, row 1 the scale.
    """

    def __init__(self, hidden_size: int, out_features: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, eps=LN_EPS, elementwise_affine=False)
        self.linear = nn.Linear(hidden_size, out_features)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        T: int,
        S: int,
        x_mask: torch.Tensor | None = None,
        t0: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Args: x ``(B, T*S, C)``; t, t0 ``(B, C)``; x_mask ``(B, T)`` bool. Returns ``(B, T*S, out_features)``.

        With ``x_mask``, frames where it is False take the t0 branch. As in Open-Sora v1.2.0 the t0 branch
        normalises the *already t-modulated* activations (``x`` is reassigned before it is computed); this
        is kept so I2V/extension numerics match the checkpoint's own code.
        """
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)  # 2 x (B, 1, C)
        x = t2i_modulate(self.norm_final(x), shift, scale)  # (B, T*S, C)
        if x_mask is not None:
            shift0, scale0 = (self.scale_shift_table[None] + t0[:, None]).chunk(2, dim=1)
            x_zero = t2i_modulate(self.norm_final(x), shift0, scale0)  # norm of the modulated x (original)
            x = select_frames(x_mask, x, x_zero, T, S)
        return self.linear(x)  # (B, T*S, prod(patch)*C_out)
