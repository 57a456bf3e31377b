"""T5 encoders: one block per ``T5Block``; the embedding table and the final norm stay pinned.

Block 0 alone owns ``relative_attention_bias``; ``T5Stack`` passes the position bias it computes to every
later block as a tensor, so streaming the blocks needs nothing special (the runtime never splits forward).
"""

from __future__ import annotations

from torch import nn

from blockrt.partitioners.plan import Plan
from blockrt.partitioners.generic import plan_from_units
from blockrt.partitioners.registry import register


@register("transformers.models.t5.modeling_t5.T5EncoderModel")
def partition_t5_encoder(model: nn.Module, *, target_bytes: int | None = None) -> Plan:
    """``encoder.block.i`` per block (packed to ``target_bytes`` if given); ``shared`` and the norm pinned."""
    n = len(model.encoder.block)  # type: ignore[union-attr,arg-type]
    units = [(f"encoder.block.{i}", [f"encoder.block.{i}"]) for i in range(n)]
    return plan_from_units(model, units, target_bytes=target_bytes, partitioner="t5")
