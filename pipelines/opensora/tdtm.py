"""Temporal Dimension Token Merging (TDTM, On-device Sora): merge and unmerge consecutive latent frames.

STDiT3 calls these inside every block when ``STDiT3.forward(..., merge_frames=True)``: self-attention and
cross-attention see the merged frames, everything else (modulation, gates, residuals, MLP) the full ones.
See ``shared/design/ondevice-sora.md`` §3 for the authors' version.

Grouping, for ``T`` frames (the original ``T`` is always passed explicitly, never guessed from a length):

- group ``g`` is frames ``(2g, 2g+1)``; when ``T`` is odd the last frame ``T-1`` is a group of its own, so
  there are ``T' = ceil(T/2)`` groups (``merged_frames``);
- ``merge`` takes the mean of each group: ``(x[2g] + x[2g+1]) / 2`` for a pair (exact when the two are
  equal: ``(a + a) / 2 == a`` in any float dtype), the frame itself for the single last group;
- ``unmerge`` repeats each merged frame to its group size (nearest neighbour), ``T' -> T``.

So ``unmerge(merge(x, T), T) == x`` bit for bit whenever ``x`` is constant within each group, for even and
odd ``T``. (The authors' code drops the last frame of an odd ``T`` and guesses the length back, which is
wrong for e.g. T = 13.)

Variants (training-free, next to the paper's behaviour, which stays the default):

- ``positions``: the RoPE positions of the merged frames in the temporal attention. ``"index"`` (the paper's
  code) numbers the groups 0..T'-1, which halves every temporal distance the model was trained with;
  ``"centre"`` places each group at the mean of its frame indices (``2g + 0.5`` for a pair, ``T - 1`` for an
  odd last frame alone), so merged frames keep their trained distances (``merged_positions``).
- ``blocks``: which blocks merge: ``"all"`` (the paper), ``"spatial"`` (the temporal blocks see every frame, so
  their positions never change) or ``"temporal"``.

``x_mask`` (I2V / extension conditioning frames, which use the t=0 modulation): a group may only merge
frames that are treated alike, so with ``merge_frames`` every pair must have one ``x_mask`` value in each
sample (``check_x_mask``); an all-True mask (what the T2V sampler passes) always qualifies. A mixed pair
is an error rather than a silent average of a clean conditioning frame with a noisy one.
"""

from __future__ import annotations

import torch

POSITIONS = ("index", "centre")  # RoPE positions of the merged frames: the paper's 0..T'-1, or group centres
BLOCKS = ("all", "spatial", "temporal")  # which blocks merge (the paper: all)


def check_variant(positions: str, blocks: str) -> None:
    """Raise unless ``positions`` is one of ``POSITIONS`` and ``blocks`` one of ``BLOCKS``."""
    if positions not in POSITIONS:
        raise ValueError(f"merge positions must be one of {POSITIONS} (the paper: 'index'), got {positions!r}")
    if blocks not in BLOCKS:
        raise ValueError(f"merge blocks must be one of {BLOCKS} (the paper: 'all'), got {blocks!r}")


def merged_positions(T: int, positions: str = "index") -> torch.Tensor:
    """RoPE positions ``(T',)`` fp32 of the ``ceil(T/2)`` merged frames.

    ``"index"``: ``0, 1, ..., T'-1`` (the paper's). ``"centre"``: the mean frame index of each group,
    ``2g + 0.5`` for the pair ``(2g, 2g+1)`` and ``T - 1`` for an odd last frame alone.

    Example: T = 5 → index ``[0, 1, 2]``, centre ``[0.5, 2.5, 4.0]``.
    """
    check_variant(positions, "all")
    Tm = merged_frames(T)
    g = torch.arange(Tm, dtype=torch.float32)
    if positions == "index":
        return g
    centre = 2 * g + 0.5
    if T % 2:
        centre[-1] = T - 1  # the last frame is a group of its own
    return centre


def merged_frames(T: int) -> int:
    """Number of frame groups ``T' = ceil(T/2)``: pairs, plus the last frame alone when ``T`` is odd."""
    if T < 1:
        raise ValueError(f"need at least one frame to merge, got T={T}")
    return (T + 1) // 2


def merge(x: torch.Tensor, T: int, dim: int = 1) -> torch.Tensor:
    """Mean of each frame group along ``dim`` (length ``T``) → length ``ceil(T/2)``.

    Example: T = 5 → ``[(f0+f1)/2, (f2+f3)/2, f4]``.
    """
    dim = dim % x.ndim
    if x.shape[dim] != T:
        raise ValueError(f"merge: dim {dim} of shape {tuple(x.shape)} has {x.shape[dim]} frames, expected T={T}")
    merged_frames(T)  # validates T
    pairs = x.narrow(dim, 0, T - T % 2).unflatten(dim, (T // 2, 2))  # (..., T//2, 2, ...)
    out = (pairs.select(dim + 1, 0) + pairs.select(dim + 1, 1)) / 2  # (..., T//2, ...)
    if T % 2:
        out = torch.cat([out, x.narrow(dim, T - 1, 1)], dim=dim)  # the last frame is its own group
    return out  # (..., ceil(T/2), ...)


def unmerge(x: torch.Tensor, T: int, dim: int = 1) -> torch.Tensor:
    """Repeat each merged frame to its group size along ``dim``: length ``ceil(T/2)`` → ``T``.

    Example: T = 5 → ``[m0, m0, m1, m1, m2]``.
    """
    dim = dim % x.ndim
    Tm = merged_frames(T)
    if x.shape[dim] != Tm:
        raise ValueError(
            f"unmerge: dim {dim} of shape {tuple(x.shape)} has {x.shape[dim]} frames, expected ceil({T}/2)={Tm}"
        )
    return x.repeat_interleave(2, dim=dim).narrow(dim, 0, T)  # odd T: the last group's copy is dropped


def merge_tokens(x: torch.Tensor, T: int, S: int) -> torch.Tensor:
    """``merge`` on frame-major tokens: ``(B, T*S, C)`` → ``(B, T'*S, C)``."""
    B, N, C = x.shape
    if N != T * S:
        raise ValueError(f"merge_tokens: {N} tokens is not T*S = {T}*{S}")
    return merge(x.view(B, T, S, C), T, dim=1).reshape(B, -1, C)


def unmerge_tokens(x: torch.Tensor, T: int, S: int) -> torch.Tensor:
    """``unmerge`` on frame-major tokens: ``(B, T'*S, C)`` → ``(B, T*S, C)``."""
    B, N, C = x.shape
    Tm = merged_frames(T)
    if N != Tm * S:
        raise ValueError(f"unmerge_tokens: {N} tokens is not T'*S = {Tm}*{S} (T={T})")
    return unmerge(x.view(B, Tm, S, C), T, dim=1).reshape(B, T * S, C)


def check_x_mask(x_mask: torch.Tensor, T: int) -> None:
    """Raise unless both frames of every pair have the same ``x_mask`` value in each sample.

    Args:
        x_mask: ``(B, T)`` bool. Reads it on the host (one sync).
    """
    if x_mask.shape[-1] != T:
        raise ValueError(f"x_mask has {x_mask.shape[-1]} frames, expected T={T}")
    n = T - T % 2
    mixed = x_mask[:, 0:n:2] != x_mask[:, 1:n:2]  # (B, T//2)
    if bool(mixed.any()):
        b, g = (int(i) for i in mixed.nonzero()[0])
        raise ValueError(
            f"merge_frames=True needs x_mask to be equal within each merged frame pair (2g, 2g+1), but sample {b} "
            f"has x_mask[{2 * g}]={bool(x_mask[b, 2 * g])} and x_mask[{2 * g + 1}]={bool(x_mask[b, 2 * g + 1])}: "
            "pass merge_frames=False for this call, or place conditioning frames on whole pairs"
        )
