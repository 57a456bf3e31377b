"""``ReplayModule``: one block of a model as a standalone module, replaying the calls recorded in one pass.

A block is one or more module calls (``encoder.block.3``, or ``layers.4`` then ``layers.5``). The replay
holds those modules and a small program: for each recorded call, its arguments with every tensor replaced
by a slot (a block input, or an output of an earlier call in the block) and every other value baked in as
a constant (flags, ``None``, ints, cache objects). ``forward(*inputs)`` runs the program and returns the
block's output tensors, so it can be traced and converted like any module with tensor inputs and outputs.

The recorded modules are called through ``.forward`` rather than ``__call__``: hooks on them (a blockrt
Runtime's, which would load and evict the block's weights around every call) are skipped, while the
weights bound at export time stay in place for tracing and conversion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

SLOT, CONST = 0, 1


@dataclass
class Step:
    """One recorded call: which module, its (args, kwargs) tree, and where its output tensors go.

    ``leaves`` are ``(SLOT, k)`` for a tensor read from slot ``k`` or ``(CONST, value)`` for a baked value;
    ``out_slots`` maps positions in the flattened output to the slots they fill.
    """

    module: int
    spec: TreeSpec
    leaves: list[tuple[int, Any]]
    out_slots: list[tuple[int, int]]


class ReplayModule(nn.Module):
    """The calls of one block, replayed with its boundary tensors as inputs and outputs.

    Args:
        paths: the recorded modules' paths in the model (documentation, and ``repr``).
        modules: those modules (registered here as children ``m0``, ``m1``, ...; no weights are copied).
        steps: the recorded calls in order.
        n_inputs: slots ``0 .. n_inputs - 1`` are the inputs, in ``forward``'s argument order.
        output_slots: the slots returned, in order.
        n_slots: the total number of slots (inputs plus every recorded output tensor).
    """

    def __init__(self, paths: list[str], modules: list[nn.Module], steps: list[Step], n_inputs: int,
                 output_slots: list[int], n_slots: int) -> None:
        super().__init__()
        self.paths = list(paths)
        self.mods = nn.ModuleList(modules)
        self.steps = steps
        self.n_inputs = n_inputs
        self.output_slots = list(output_slots)
        self.n_slots = n_slots

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(inputs) != self.n_inputs:
            raise TypeError(f"ReplayModule({', '.join(self.paths)}) takes {self.n_inputs} tensor inputs, got {len(inputs)}")
        env: list[Any] = list(inputs) + [None] * (self.n_slots - self.n_inputs)
        for step in self.steps:
            leaves = [env[v] if kind == SLOT else v for kind, v in step.leaves]
            args, kwargs = tree_unflatten(leaves, step.spec)
            out = self.mods[step.module].forward(*args, **kwargs)  # not __call__: skip streaming hooks
            flat, _ = tree_flatten(out)
            for pos, slot in step.out_slots:
                env[slot] = flat[pos]
        return tuple(env[s] for s in self.output_slots)

    def extra_repr(self) -> str:
        return f"paths={self.paths}, inputs={self.n_inputs}, outputs={len(self.output_slots)}, calls={len(self.steps)}"
