"""STDiT3: one block = ``spatial_blocks[i]`` + ``temporal_blocks[i]``, as the On-device Sora paper streams it.

The embedders (patch, timestep, fps, caption), ``t_block``, ``rope`` and the final layer are small and stay
pinned. At XL/2 each block is about 170 MB of fp32 weights.
"""

from __future__ import annotations

from torch import nn

from blockrt.partitioners.plan import Plan
from blockrt.partitioners.generic import plan_from_units
from blockrt.partitioners.registry import register


@register("blockrt.pipelines.opensora.stdit3.STDiT3")
def partition_stdit3(model: nn.Module, *, target_bytes: int | None = None) -> Plan:
    """Block i streams ``spatial_blocks.i`` then ``temporal_blocks.i`` (their execution order)."""
    n = len(model.spatial_blocks)  # type: ignore[arg-type]
    units = [(f"st_blocks.{i}", [f"spatial_blocks.{i}", f"temporal_blocks.{i}"]) for i in range(n)]
    return plan_from_units(model, units, target_bytes=target_bytes, partitioner="stdit3")
