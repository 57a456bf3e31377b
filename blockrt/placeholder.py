"""The evicted placeholder: what a streamed weight is while its block is not resident.

A plain ``meta`` tensor is not enough: torch 2.13's CPU ``mm``/``linear`` with one ``meta`` operand returns
uninitialised memory instead of raising, so ``x @ self.layers[0].weight`` read outside the block's own
modules would compute a silently wrong result. ``Evicted`` is a ``meta`` tensor subclass that knows its key and
block: every op that mixes it with a real tensor raises a ``BlockrtError`` naming both and the fix; ops among
``meta`` tensors only (planning on a skeleton, ``nn.Parameter`` wrapping it, ``state_dict``'s ``detach``) run on
``meta`` and stay placeholders. Shape, dtype and ``is_meta`` are attributes, so reading them costs nothing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map

from .partitioners.errors import BlockrtError


class Evicted(torch.Tensor):
    """A streamed tensor while its block is not resident (``device='meta'``, same shape and dtype)."""

    key: str
    block: str
    __torch_function__ = torch._C._disabled_torch_function_impl  # straight to __torch_dispatch__: no Python layer

    @staticmethod
    def __new__(cls, shape: torch.Size | tuple[int, ...], dtype: torch.dtype, key: str, block: str) -> Evicted:
        t = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device="meta")
        t.key, t.block = key, block
        return t

    def __repr__(self) -> str:  # the default repr would dispatch ops on the data
        return f"Evicted({self.key!r}, block={self.block!r}, shape={tuple(self.shape)}, dtype={self.dtype})"

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        flat, _ = tree_flatten((args, kwargs or {}))
        first = next(t for t in flat if isinstance(t, Evicted))
        if any(isinstance(t, torch.Tensor) and not t.is_meta for t in flat):
            raise evicted_use(first, str(func))
        plain = tree_map(lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta").as_strided(t.shape, t.stride())
                         if isinstance(t, Evicted) else t, (args, kwargs or {}))
        out = func(*plain[0], **plain[1])
        return tree_map(lambda t: Evicted(t.shape, t.dtype, first.key, first.block)
                        if isinstance(t, torch.Tensor) and t.is_meta and not isinstance(t, Evicted) else t, out)


def evicted_use(t: Evicted, op: str) -> BlockrtError:
    """The error for computing with ``t`` while its block is not resident."""
    owner = t.key.rpartition(".")[0]
    return BlockrtError(
        f"{op} used the streamed weight {t.key!r} (block {t.block!r}) while it was an evicted meta placeholder: "
        f"its block is resident only while one of its own modules runs, so a weight read directly (e.g. "
        f"self.layer.weight in another module's forward) or after the run finds this placeholder. Fix: pass "
        f"config=RunConfig(pin=[{owner!r}]) to keep it resident, or call the model inside blockrt.run (a model "
        f"streamed with weights= stays a skeleton after close)"
    )
