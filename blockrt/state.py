"""State that outlives a pass: tensors a call passes in and gets back, such as a KV cache.

A generation loop hands the same growing cache to every call (transformers' ``DynamicCache`` in
``past_key_values``, a legacy tuple of tuples, T5's ``encoder_outputs``). Its bytes are not activations (the
working set is measured once per input kind, and every decode step has the same shapes) and not weights, so
the ledger holds them as their own kind, ``state``, measured again at the start of every pass.

What counts: every tensor reachable from the call's arguments *through a container or an object* (tuples,
lists, dicts, and objects' attributes such as a Cache's layers), at most ``MAX_DEPTH`` levels deep, each
storage once. A tensor passed directly (``input_ids``, latents, a mask) is an input, not state, and is not
counted; modules are never entered (their weights are the plan's). A cache a model keeps on itself (an
attribute of a module) is not seen: pass it in, or leave room for it in the budget.

Between two measurements the cache grows by one pass's worth (one token per layer for a decoder) and
``torch.cat`` briefly holds a layer's old and new cache at once: that much, a layer's share of the cache,
is the allowance above the ledger (measured passes see it in their working set).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

MAX_DEPTH = 5  # kwargs -> cache -> layers list -> layer object -> tensor, with one level to spare


@dataclass(frozen=True)
class State:
    """Bytes of state reachable from one call's arguments, and the largest argument holding it."""

    nbytes: int
    largest: str  # e.g. "past_key_values (DynamicCache)"; "" when there is none
    largest_bytes: int


def measure_state(args: tuple, kwargs: dict) -> State:
    """Unique storage bytes of the tensors reachable through containers and objects in ``args``/``kwargs``."""
    seen_storage: set[int] = set()
    seen_obj: set[int] = set()
    total, largest, largest_bytes = 0, "", 0
    for name, value in [*enumerate(args), *kwargs.items()]:
        if isinstance(value, LEAVES):
            continue  # an input or a flag, not state
        n = _walk(value, seen_storage, seen_obj)
        total += n
        if n > largest_bytes:
            name = f"argument {name}" if isinstance(name, int) else name
            largest, largest_bytes = f"{name} ({type(value).__name__})", n
    return State(total, largest, largest_bytes)


LEAVES = (torch.Tensor, type(None), bool, int, float, str)  # an argument passed directly: an input or a flag
_OPAQUE = (type(None), bool, int, float, str, bytes, type, nn.Module, torch.dtype, torch.device)  # never entered


def _walk(root: Any, storages: set[int], objects: set[int]) -> int:
    """Bytes of the storages not yet in ``storages`` reachable from ``root`` (``MAX_DEPTH`` levels, iteratively:
    this runs at the start of every pass, a decode step's cache is about 40 objects)."""
    total = 0
    stack = [(root, MAX_DEPTH)]
    while stack:
        x, depth = stack.pop()
        if isinstance(x, torch.Tensor):
            if x.device.type == "meta":
                continue
            s = x.untyped_storage()
            ptr = s.data_ptr()
            if ptr not in storages and s.nbytes():
                storages.add(ptr)
                total += s.nbytes()
            continue
        if depth == 0 or isinstance(x, _OPAQUE) or id(x) in objects:
            continue
        objects.add(id(x))
        if isinstance(x, dict):
            items = x.values()
        elif isinstance(x, (list, tuple, set, frozenset)):
            items = x
        else:
            items = getattr(x, "__dict__", None)
            if not isinstance(items, dict):
                continue
            items = items.values()
        stack.extend((v, depth - 1) for v in items if not isinstance(v, _OPAQUE))
    return total
