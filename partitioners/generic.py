"""The generic partitioner: find a model's repeated layer stack and pack consecutive layers into blocks.

Also holds the machinery per-model partitioners reuse: ``find_layer_stack`` (which stack) and
``plan_from_units`` (given ordered units of module paths, decide who owns every state-dict tensor, pack
consecutive units up to a byte target, and build the Plan). Only shapes and dtypes are read, so models
built on the ``meta`` device work.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from blockrt.partitioners.errors import PartitionError
from blockrt.partitioners.plan import Block, Plan, TensorSpec, dtype_from_name, tensor_spec

_STACK_TYPES = (nn.ModuleList, nn.Sequential)


def check_target_bytes(target_bytes: int | None) -> None:
    """Raise unless ``target_bytes`` is ``None`` or a positive int."""
    if target_bytes is None:
        return
    if isinstance(target_bytes, bool) or not isinstance(target_bytes, int):
        raise TypeError(f"target_bytes must be an int number of bytes or None, got {target_bytes!r}")
    if target_bytes <= 0:
        raise ValueError(f"target_bytes must be > 0 (or None for one layer per block), got {target_bytes}")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def find_layer_stack(model: nn.Module) -> tuple[str, list[str]]:
    """The repeated stack of layers: ``(stack path, [layer paths])``.

    Among every ``nn.ModuleList``/``nn.Sequential`` with >= 2 children that are all of one class and hold
    parameters, the one with the most parameter bytes (ties: the first in module order, i.e. the outer one).
    Classes are compared rather than shapes, because layers may differ slightly (T5's block 0 alone carries
    ``relative_attention_bias``).

    Raises:
        PartitionError: no such stack exists.
    """
    best: tuple[int, str, list[str]] | None = None
    rejected: list[str] = []
    for path, module in model.named_modules():
        if not isinstance(module, _STACK_TYPES):
            continue
        children = list(module.named_children())
        classes = sorted({type(c).__qualname__ for _, c in children})
        if len(children) < 2 or len(classes) != 1:
            rejected.append(f"{path or '<model>'} ({len(children)} children of {', '.join(classes) or 'no class'})")
            continue
        nbytes = _param_bytes(module)
        if nbytes == 0:
            rejected.append(f"{path or '<model>'} ({len(children)} {classes[0]} without parameters)")
            continue
        if best is None or nbytes > best[0]:
            best = (nbytes, path, [_join(path, name) for name, _ in children])
    if best is None:
        name = type(model).__qualname__
        seen = f"; rejected: {'; '.join(rejected[:5])}" if rejected else ""
        raise PartitionError(
            f"generic partitioner found no repeated layer stack in {name}: expected an nn.ModuleList or "
            f"nn.Sequential of >= 2 modules of one class holding parameters (like encoder.layer, encoder.block, "
            f"transformer.h, layers){seen}; register a partitioner for {name} with blockrt.partitioners.register"
        )
    return best[1], best[2]


def _identity(t: torch.Tensor) -> tuple[object, ...]:
    """Two state-dict entries are one tensor if they are the same object or the same view of one storage."""
    if t.device.type != "meta" and t.numel() > 0:
        ptr = t.untyped_storage().data_ptr()
        return ("storage", ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
    return ("object", id(t))


def _tensor_groups(model: nn.Module) -> list[tuple[list[str], torch.Tensor]]:
    """Every distinct state-dict tensor with all its names, in state-dict order of first name."""
    groups: dict[tuple[object, ...], tuple[list[str], torch.Tensor]] = {}
    # keep_vars=True: the Parameter objects themselves, so tied weights share one identity; every name is listed.
    for key, t in model.state_dict(keep_vars=True).items():
        try:
            dtype_from_name(str(t.dtype).removeprefix("torch."))
        except ValueError as e:
            raise PartitionError(f"state-dict tensor {key!r} of {type(model).__qualname__}: {e}") from None
        groups.setdefault(_identity(t), ([], t))[0].append(key)
    return list(groups.values())


def _block_name(names: Sequence[str]) -> str:
    """``["encoder.block.0", "encoder.block.1"]`` -> ``"encoder.block.0-1"``."""
    first, last = names[0], names[-1]
    if len(names) == 1:
        return first
    head, _, a = first.rpartition(".")
    head2, _, b = last.rpartition(".")
    return f"{_join(head, a)}-{b}" if head == head2 else f"{first}-{last}"


def plan_from_units(
    model: nn.Module,
    units: Sequence[tuple[str, Sequence[str]]],
    *,
    target_bytes: int | None,
    partitioner: str,
    labels: Sequence[object] | None = None,
) -> Plan:
    """Build a Plan from ordered units, packing consecutive units into blocks of at most ``target_bytes``.

    Ownership: each distinct tensor is named by its first state-dict key; its other keys become aliases.
    A tensor reached only from inside one block belongs to that block; one reached from two blocks, or from
    a block and anything outside the units, is pinned, as is everything outside the units.

    Args:
        model: the model (any device, ``meta`` included).
        units: ``(name, module paths)`` in execution order, e.g. ``("encoder.block.0", ["encoder.block.0"])``;
            a block is one or more consecutive units.
        target_bytes: block byte target; ``None`` packs one unit per block. A unit larger than the target
            becomes a block of its own.
        partitioner: recorded in ``Plan.partitioner``.
        labels: one label per unit; only consecutive units with equal labels share a block (``None``: all
            one group). The whole-model partitioner labels each unit by its parent module, so an encoder's
            last layer never shares a block with a decoder's first.
    """
    check_target_bytes(target_bytes)
    unit_of: dict[str, int] = {}
    for i, (uname, paths) in enumerate(units):
        for path in paths:
            if not path:
                raise PartitionError(f"unit {uname!r} names the whole model; units must name submodules")
            try:
                model.get_submodule(path)
            except AttributeError:
                raise PartitionError(
                    f"unit {uname!r} names module {path!r}, which {type(model).__qualname__} lacks"
                ) from None
            if path in unit_of:
                raise PartitionError(
                    f"module {path!r} is listed twice (units {units[unit_of[path]][0]!r} and {uname!r})"
                )
            unit_of[path] = i
    for path in unit_of:
        parent = path
        while "." in parent:
            parent = parent.rpartition(".")[0]
            if parent in unit_of:
                raise PartitionError(f"module {path!r} lies inside module {parent!r}, which a unit already covers")

    def locate(key: str) -> int | None:
        parts = key.split(".")
        for n in range(len(parts) - 1, 0, -1):
            i = unit_of.get(".".join(parts[:n]))
            if i is not None:
                return i
        return None

    # Per distinct tensor: the (first, last) unit that reaches it, or None if anything outside the units does.
    groups = _tensor_groups(model)
    spans: list[tuple[int, int] | None] = []
    for keys, _ in groups:
        where = [locate(k) for k in keys]
        spans.append(None if None in where else (min(where), max(where)))  # type: ignore[type-var]

    # Bytes a block gains when unit j joins it: tensors whose reach ends at j and starts inside the block.
    ending_at: list[list[tuple[int, int]]] = [[] for _ in units]
    for (keys, t), span in zip(groups, spans):
        if span is not None:
            ending_at[span[1]].append((span[0], t.numel() * t.element_size()))

    ranges: list[tuple[int, int]] = []  # greedy: extend the block while it stays within the target
    start, size = 0, 0
    for j in range(len(units)):
        if j > start:
            grown = size + sum(b for lo, b in ending_at[j] if lo >= start)
            same = labels is None or labels[j] == labels[start]
            if target_bytes is not None and grown <= target_bytes and same:
                size = grown
                continue
            ranges.append((start, j - 1))
            start = j
        size = sum(b for lo, b in ending_at[j] if lo >= start)
    if units:
        ranges.append((start, len(units) - 1))

    block_of = [b for b, (lo, hi) in enumerate(ranges) for _ in range(lo, hi + 1)]
    owned: list[list[TensorSpec]] = [[] for _ in ranges]
    pinned: list[TensorSpec] = []
    aliases: dict[str, str] = {}
    for (keys, t), span in zip(groups, spans):
        spec = tensor_spec(keys[0], t)
        aliases.update({k: keys[0] for k in keys[1:]})
        if span is not None and block_of[span[0]] == block_of[span[1]]:
            owned[block_of[span[0]]].append(spec)
        else:
            pinned.append(spec)

    blocks = tuple(
        Block(
            name=_block_name([units[i][0] for i in range(lo, hi + 1)]),
            modules=tuple(p for i in range(lo, hi + 1) for p in units[i][1]),
            tensors=tuple(owned[b]),
        )
        for b, (lo, hi) in enumerate(ranges)
    )
    return Plan(
        blocks=blocks,
        pinned=tuple(pinned),
        aliases=aliases,
        model_class=type(model).__qualname__,
        partitioner=partitioner,
    )


def generic_partition(model: nn.Module, *, target_bytes: int | None = None) -> Plan:
    """Partition any model with one repeated layer stack: each block is one or more consecutive layers.

    Args:
        model: the model (any device, ``meta`` included).
        target_bytes: pack consecutive layers while a block stays <= this many bytes (``None``: one layer
            per block; a layer larger than the target is its own block).

    Raises:
        PartitionError: the model has no repeated layer stack (see ``find_layer_stack``).

    Example:
        >>> generic_partition(gpt2).blocks[0].name
        'h.0'
    """
    check_target_bytes(target_bytes)
    _, layers = find_layer_stack(model)
    return plan_from_units(model, [(p, (p,)) for p in layers], target_bytes=target_bytes, partitioner="generic")
