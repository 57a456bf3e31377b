"""The Open-Sora VAE v1.2 decoders, part by part, in execution order (the paper loads them the same way).

Each decoder is streamed as its own root: one call = one pass. Open-Sora's ``decode`` runs the temporal
decoder once per chunk of 5 latents (17 frames), then the spatial (SDXL) decoder once per micro-batch of
frames, so each decoder's parts repeat cyclically, which is what the runtime's prefetch expects:

    blockrt.run(vae.temporal_vae.decoder, budget)        # TemporalDecoder: res blocks, then stages 3..0
    blockrt.run(vae.spatial_vae.module.decoder, budget)  # diffusers Decoder: mid block, up_blocks 0..3

Small convolutions and norms stay pinned. Units are modules with a ``forward`` (hooks fire on calls), so a
``ModuleList`` stage is split into its ``ResBlock`` children.
"""

from __future__ import annotations

from torch import nn

from blockrt.partitioners.plan import Plan
from blockrt.partitioners.generic import plan_from_units
from blockrt.partitioners.registry import register


@register("blockrt.pipelines.opensora.vae_temporal.TemporalDecoder")
def partition_temporal_decoder(model: nn.Module, *, target_bytes: int | None = None) -> Plan:
    """``res_blocks.i``, then for stage i = n-1..0 its res blocks and the up-sampling conv after it."""
    units: list[tuple[str, list[str]]] = [(f"res_blocks.{i}", [f"res_blocks.{i}"]) for i in range(len(model.res_blocks))]
    stages = model.block_res_blocks
    for i in reversed(range(len(stages))):
        units += [(f"block_res_blocks.{i}.{j}", [f"block_res_blocks.{i}.{j}"]) for j in range(len(stages[i]))]
        if i > 0 and any(True for _ in model.conv_blocks[i - 1].parameters()):
            units.append((f"conv_blocks.{i - 1}", [f"conv_blocks.{i - 1}"]))
    return plan_from_units(model, units, target_bytes=target_bytes, partitioner="vae-temporal-decoder")


@register("diffusers.models.autoencoders.vae.Decoder")
def partition_spatial_decoder(model: nn.Module, *, target_bytes: int | None = None) -> Plan:
    """``mid_block`` then ``up_blocks.0..n-1``; ``conv_in``, the output norm and ``conv_out`` pinned."""
    units = [("mid_block", ["mid_block"])] + [(f"up_blocks.{i}", [f"up_blocks.{i}"]) for i in range(len(model.up_blocks))]
    return plan_from_units(model, units, target_bytes=target_bytes, partitioner="vae-spatial-decoder")
