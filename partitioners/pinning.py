"""Pinning by module path: move the tensors of named modules out of their blocks into the pinned part.

The fix for a weight used outside the block that owns it while another block runs (a norm of layer 0
reused by the last layer, say): ``blockrt.run(model, budget, config=RunConfig(pin=["layers.0.norm"]))``.
Works on any partitioner's plan; a block left without tensors is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from blockrt.partitioners.errors import PartitionError
from blockrt.partitioners.plan import Block, Plan


def pin_modules(model: nn.Module, plan: Plan, paths: Sequence[str]) -> Plan:
    """``plan`` with every tensor under the module ``paths`` pinned.

    A path may name a block's module (the whole module stays resident and is no longer a block entry point)
    or anything inside one. The tensors keep their state-dict keys; aliases are unchanged.

    Raises:
        PartitionError: a path names no module of ``model`` (or the whole model).

    Example:
        >>> pin_modules(dit, plan, ["transformer_blocks.0.norm1.emb"]).pinned[-1].key
        'transformer_blocks.0.norm1.emb.timestep_embedder.linear_2.bias'
    """
    for path in paths:
        if not isinstance(path, str) or not path:
            raise PartitionError(f"pin: {path!r} is not a module path such as 'encoder.block.0.layer.0'")
        try:
            model.get_submodule(path)
        except AttributeError:
            raise PartitionError(f"pin: {type(model).__qualname__} has no module {path!r}") from None

    def under(name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in paths)

    blocks: list[Block] = []
    moved = []
    for b in plan.blocks:
        keep = tuple(t for t in b.tensors if not under(t.key))
        moved += [t for t in b.tensors if under(t.key)]
        modules = tuple(m for m in b.modules if not under(m))
        if keep and modules:
            blocks.append(Block(b.name, modules, keep))
        else:
            moved += keep
    return Plan(tuple(blocks), plan.pinned + tuple(moved), dict(plan.aliases), plan.model_class, plan.partitioner)
