"""Binding: the one materialize/evict pair that moves a block's weights in and out of the user's model.

The user's ``nn.Parameter`` (and buffer) objects keep their identity: ``torch.utils.swap_tensors``
exchanges their contents with either a view into a slot (materialize) or an ``Evicted`` placeholder of the
same shape and dtype (evict: ``meta`` device, ``placeholder.py``), so a stray use of an evicted weight raises
a ``BlockrtError`` naming it instead of computing on stale data. Tied names share one object, so binding the owner binds every alias.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .errors import BlockrtError
from .packed_compute import PackedWeight
from .partitioners.plan import TensorSpec, dtype_from_name
from .placeholder import Evicted


def _slot_of(model: nn.Module, key: str) -> tuple[nn.Module, str, bool]:
    prefix, _, name = key.rpartition(".")
    module = model.get_submodule(prefix) if prefix else model
    if name in module._parameters:
        return module, name, True
    if name in module._buffers:
        return module, name, False
    raise KeyError(f"{key!r} is neither a parameter nor a buffer of {type(module).__name__}")


class Binder:
    """Swaps tensors of ``model`` named by state-dict keys."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._where: dict[str, tuple[nn.Module, str, bool]] = {}  # key -> (module, name, is_param), looked up once

    def _slot(self, key: str) -> tuple[nn.Module, str, bool]:
        where = self._where.get(key)
        if where is None:
            where = self._where[key] = _slot_of(self.model, key)
        return where

    def tensor(self, key: str) -> torch.Tensor:
        module, name, is_param = self._slot(key)
        t = module._parameters[name] if is_param else module._buffers[name]
        assert t is not None
        return t

    def _swap(self, key: str, new: torch.Tensor) -> None:
        module, name, is_param = self._slot(key)
        old = module._parameters[name] if is_param else module._buffers[name]
        if old is None:
            raise KeyError(f"{key!r} is None in the model")
        if is_param and isinstance(new, Evicted):
            new.requires_grad_(old.requires_grad)
            new._is_param = True  # what nn.Parameter marks on a subclass, without its detach (a dispatched op)
        elif is_param:
            new = nn.Parameter(new, requires_grad=old.requires_grad)
        try:
            torch.utils.swap_tensors(old, new)
        except RuntimeError:
            if isinstance(new, PackedWeight):  # its class is its behaviour: moving the data alone cannot carry it
                raise BlockrtError(
                    f"binding the packed weight {key!r} needs the model's own tensor object (torch.utils.swap_tensors)"
                    ", but something else holds it: typically the autograd graph of an output the model computed "
                    "with gradients enabled; fix: compute such outputs under torch.no_grad() (or delete them) before "
                    "blockrt.run, or packed_compute=False") from None
            # something else still holds the tensor (a view of a weight in a traceback's frame, say): move the
            # data alone. Across devices (meta) that is impossible: an empty tensor then fails any stray use.
            old.data = new if new.device == old.device else torch.empty(0, dtype=new.dtype, device=old.device)

    def materialize(self, pairs: Iterable[tuple[TensorSpec, torch.Tensor]]) -> None:
        """Point each named tensor at its data (a slot view or a pinned tensor)."""
        for spec, data in pairs:
            self._swap(spec.key, data)

    def evict(self, specs: Iterable[TensorSpec], block: str) -> None:
        """Replace each named tensor's data by an ``Evicted`` placeholder (same shape and dtype) of ``block``."""
        for spec in specs:
            self._swap(spec.key, Evicted(spec.shape, dtype_from_name(spec.dtype), spec.key, block))


def meta_leftovers(model: nn.Module, streamed: set[str]) -> list[str]:
    """Names of parameters/buffers still on ``meta`` that no block streams (they would fail at forward)."""
    return [name for name, t in [*model.named_parameters(), *model.named_buffers()]
            if t.is_meta and name not in streamed]
