"""T5 encoder blocks as CoreML-exportable modules: ``t5_embed``, ``t5_block_00..N-1``, ``t5_final_norm``.

The split is the On-device Sora one (``ondevice-sora.md`` §1): the token embedding, one package per
``T5Block`` and the final RMS norm. Every wrapper holds the original ``transformers`` sub-modules (the same
``nn.Parameter`` objects, nothing copied) and changes only what CoreML needs:

- the attention mask is an *additive* float input ``(1, 1, 1, L)``: 0 for text tokens, ``MASK_MIN`` for
  padding. transformers' SDPA path turns its boolean mask into ``where(mask, position_bias, finfo.min)``;
  ``position_bias + additive`` is the same tensor bit for bit (``finfo.min`` absorbs any bias), so blocks
  are called with the float mask and nothing else changes;
- block 0 computes the relative position bias ``(1, H, L, L)`` from a *constant* bucket table (the
  bucketing of ``T5Attention.compute_bias`` uses arange/log/where on the sequence length, which is fixed
  at export) and returns it; blocks 1..N-1 take it as an input, as in ``T5Stack`` (environment.md §0.9).

The sequence length is fixed at export (Open-Sora pads every prompt to 300 tokens). ``reference_*`` give the
original call with transformers' boolean mask and the same signature, for a bitwise comparison.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

MASK_MIN = torch.finfo(torch.float32).min  # additive mask value of padding tokens (transformers' own)


def additive_mask(mask: torch.Tensor) -> torch.Tensor:
    """Token mask ``(n, L)`` (1 = valid, 0 = padding; any int/bool dtype) -> ``(n, 1, 1, L)`` float32 additive."""
    valid = mask.reshape(mask.shape[0], 1, 1, -1) != 0
    return torch.zeros(valid.shape).masked_fill(~valid, MASK_MIN)  # (n, 1, 1, L)


def _bool_mask(mask_add: torch.Tensor) -> torch.Tensor:
    """``(n, 1, 1, L)`` additive -> ``(n, 1, L, L)`` bool, the mask transformers builds for the encoder."""
    L = mask_add.shape[-1]
    return (mask_add == 0).expand(-1, 1, L, L)


class T5Embed(nn.Module):
    """``input_ids (1, L)`` int -> ``hidden (1, L, d_model)``: the shared embedding table (a gather)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.embed = model.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)  # (1, L, d); T5Stack's dropout is the identity in eval


class T5FirstBlock(nn.Module):
    """``encoder.block[0]``: ``(hidden, mask)`` -> ``(hidden, position_bias)``.

    The relative-position buckets of ``L`` x ``L`` positions are a constant buffer (not a parameter: they
    depend only on ``L`` and the config); the bias is gathered from the block's own
    ``relative_attention_bias`` table.
    """

    def __init__(self, block: nn.Module, seq_len: int) -> None:
        super().__init__()
        self.block = block
        attn = block.layer[0].SelfAttention
        if not attn.has_relative_attention_bias:
            raise ValueError("T5FirstBlock needs encoder.block[0] (the block owning relative_attention_bias)")
        pos = torch.arange(seq_len)
        buckets = attn._relative_position_bucket(
            pos[None, :] - pos[:, None],  # (L, L): memory - context, as compute_bias
            bidirectional=not attn.is_decoder,
            num_buckets=attn.relative_attention_num_buckets,
            max_distance=attn.relative_attention_max_distance,
        )
        self.register_buffer("buckets", buckets.to(torch.int32), persistent=False)  # (L, L)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        table = self.block.layer[0].SelfAttention.relative_attention_bias
        position_bias = table(self.buckets).permute(2, 0, 1).unsqueeze(0)  # (1, H, L, L)
        out = self.block(hidden, attention_mask=mask, position_bias=position_bias)[0]  # (1, L, d)
        return out, position_bias


class T5NextBlock(nn.Module):
    """``encoder.block[i]``, i >= 1: ``(hidden, position_bias, mask)`` -> ``hidden``."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, hidden: torch.Tensor, position_bias: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.block(hidden, attention_mask=mask, position_bias=position_bias)[0]  # (1, L, d)


class T5FinalNorm(nn.Module):
    """``encoder.final_layer_norm``: ``(1, L, d)`` -> ``(1, L, d)`` (the encoder's last hidden state)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.norm = model.encoder.final_layer_norm

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden)


class _ReferenceFirst(nn.Module):
    """Block 0 called as ``T5Stack`` calls it: boolean mask, no position bias (computed inside)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.block(hidden, attention_mask=_bool_mask(mask))
        return out[0], out[1]


class _ReferenceNext(nn.Module):
    """Block i >= 1 called as ``T5Stack`` calls it: boolean mask, block 0's position bias."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, hidden: torch.Tensor, position_bias: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.block(hidden, attention_mask=_bool_mask(mask), position_bias=position_bias)[0]


def block_name(i: int) -> str:
    """``t5_block_03``: the package name of ``encoder.block[i]``."""
    return f"t5_block_{i:02d}"


def t5_parts(model: Any, seq_len: int) -> list[tuple[str, nn.Module, nn.Module | None]]:
    """``[(name, export module, reference or None), ...]`` in run order: embed, every block, final norm."""
    blocks = model.encoder.block
    parts: list[tuple[str, nn.Module, nn.Module | None]] = [("t5_embed", T5Embed(model), None)]
    parts.append((block_name(0), T5FirstBlock(blocks[0], seq_len), _ReferenceFirst(blocks[0])))
    for i in range(1, len(blocks)):
        parts.append((block_name(i), T5NextBlock(blocks[i]), _ReferenceNext(blocks[i])))
    parts.append(("t5_final_norm", T5FinalNorm(model), None))
    return parts


# I/O names per package kind (CoreML feature names).
EMBED_IO = (("input_ids",), ("hidden",))
FIRST_IO = (("hidden", "mask"), ("hidden_out", "position_bias"))
NEXT_IO = (("hidden", "position_bias", "mask"), ("hidden_out",))
FINAL_IO = (("hidden",), ("last_hidden_state",))


def t5_io(name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(input_names, output_names)`` of a package from ``t5_parts``."""
    if name == "t5_embed":
        return EMBED_IO
    if name == "t5_final_norm":
        return FINAL_IO
    return FIRST_IO if name == block_name(0) else NEXT_IO
