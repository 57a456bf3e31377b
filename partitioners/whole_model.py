"""The default partitioner: the whole module tree, cut into units by bytes and packed into blocks.

Any model works without a registered partitioner: the tree is decomposed recursively, so encoders *and*
decoders, every stage of a U-Net, both stacks of a dual/single-stream DiT and the embedders around them
all stream. A parameter is pinned only because it is small, an embedding table (the runtime reads large
ones by rows), owned directly by a module that was split (a ``cls_token``, a scale), or genuinely shared
(one tensor reached from two blocks, e.g. tied weights). Only shapes and dtypes are read, so ``meta``
models work and nothing is materialised.

The rules (``model_units``):

- the *unit cap* is 1/8 of the model's bytes (``UNIT_FRACTION``); a module above it is split into its
  children, and its direct parameters and buffers are pinned, unless those are not small (Mixtral's fused
  ``experts`` tensors): such a module stays one unit, above the cap;
- a module at or below the cap is one unit (its ``forward`` is where the runtime hooks it), unless it is
  smaller than 1/64 of the cap (``SMALL_FRACTION``): then it stays pinned rather than becoming a tiny block;
- modules without a ``forward`` of their own (``ModuleList``, ``ModuleDict``) are always split, since
  nothing ever calls them; ``nn.Embedding`` tables are pinned;
- classes a model lists in ``_no_split_modules`` (transformers and diffusers declare their layers there)
  are kept whole like any module that fits; one that alone exceeds the cap is split all the same, since the
  cap is what bounds a slot (SD1.5's ``CrossAttnUpBlock2D`` at 1280 channels is 30% of the UNet: it splits
  into its resnets and attentions).

Consecutive sibling units (same parent module) are packed in registration order, which is close to
execution order (the runtime learns the true order from what runs); siblings only, so names stay readable
(``encoder.block.0-3``, ``down_blocks.0-1``) and parts that run at different rates (an encoder once, a
decoder per token) never share a block.
"""

from __future__ import annotations

from torch import nn

from blockrt.partitioners.errors import PartitionError
from blockrt.partitioners.generic import check_target_bytes, plan_from_units
from blockrt.partitioners.plan import Plan

UNIT_FRACTION = 8  # a module above 1/8 of the model's bytes is split, so no unit exceeds 1/8 at real size
SMALL_FRACTION = 64  # a unit under 1/64 of the cap (1/512 of the model) is pinned instead of streamed


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def subtree_bytes(model: nn.Module) -> tuple[dict[str, int], int]:
    """Bytes of the distinct state-dict tensors under every module path (``""`` = the whole model), and the
    model's total. A tensor tied across two modules counts once in each subtree that reaches it."""
    seen: dict[str, set[int]] = {}
    sizes: dict[str, int] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        nbytes = t.numel() * t.element_size()
        parts = key.split(".")
        for n in range(len(parts)):  # every enclosing module path, the root ("") included
            path = ".".join(parts[:n])
            ids = seen.setdefault(path, set())
            if id(t) not in ids:
                ids.add(id(t))
                sizes[path] = sizes.get(path, 0) + nbytes
    return sizes, sizes.get("", 0)


def _is_container(module: nn.Module) -> bool:
    """A module nothing calls: no ``forward`` of its own (``ModuleList``, ``ModuleDict``, ``ParameterList``)."""
    return type(module).forward is nn.Module.forward


def model_units(model: nn.Module, *, max_unit_bytes: int | None = None) -> list[tuple[str, list[str]]]:
    """The units of ``model`` in registration order: ``[(module path, [module path]), ...]``.

    Args:
        model: the model (any device, ``meta`` included).
        max_unit_bytes: the unit cap; default 1/8 of the model's bytes (see the module docstring).

    Everything under the root that is not in a unit stays pinned (``plan_from_units`` pins it).
    """
    sizes, total = subtree_bytes(model)
    cap = max_unit_bytes if max_unit_bytes is not None else -(-total // UNIT_FRACTION)
    small = cap // SMALL_FRACTION
    units: list[tuple[str, list[str]]] = []

    def visit(path: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            p = _join(path, name)
            nbytes = sizes.get(p, 0)
            if nbytes == 0 or isinstance(child, nn.Embedding):
                continue  # nothing to stream, or a table the runtime pins (and reads by rows when large)
            inner = sum(sizes.get(_join(p, n), 0) for n, _ in child.named_children())
            if _is_container(child) or (nbytes > cap and inner > 0 and nbytes - inner < small):
                visit(p, child)  # its direct parameters and buffers (small) stay pinned
            elif nbytes >= small:  # a leaf above the cap (one huge matrix) is a unit of its own
                units.append((p, [p]))

    visit("", model)
    return units


def whole_model_partition(model: nn.Module, *, target_bytes: int | None = None) -> Plan:
    """Partition any model by its whole module tree (the registry's default for unregistered classes).

    Args:
        model: the model (any device, ``meta`` included).
        target_bytes: pack consecutive units while a block stays <= this many bytes. ``None`` (the default of
            ``RunConfig.target_block_bytes``) packs up to the largest unit, which is at most 1/8 of the model's
            bytes (so the default depends on the model's size): blocks never exceed the slot the largest
            unit needs anyway, and small neighbours share a block instead of each being a tiny one. A unit
            larger than ``target_bytes`` is a block of its own.

    Raises:
        PartitionError: nothing in the model can be streamed (no submodule holds parameters).

    Example:
        >>> [b.name for b in whole_model_partition(t5_for_generation).blocks][:2]
        ['encoder.block.0', 'encoder.block.1']
    """
    check_target_bytes(target_bytes)
    sizes, total = subtree_bytes(model)
    units = model_units(model)
    # a unit that owns nothing (a head whose weight is tied to a pinned embedding) is no block at all
    owning = {b.modules[0] for b in plan_from_units(model, units, target_bytes=None, partitioner="").blocks
              if b.tensors}
    units = [u for u in units if u[0] in owning]
    if not units:
        raise PartitionError(
            f"the whole-model partitioner found nothing to stream in {type(model).__qualname__} "
            f"({total} bytes): expected submodules holding parameters (layers, blocks, projections); "
            f"direct parameters, embedding tables and modules under 1/{UNIT_FRACTION * SMALL_FRACTION} of the "
            f"model stay pinned; register a partitioner with blockrt.partitioners.register"
        )
    target = target_bytes if target_bytes is not None else max(sizes[p] for p, _ in units)
    parents = [p.rpartition(".")[0] for p, _ in units]  # siblings only share a block: readable names
    return plan_from_units(model, units, target_bytes=target, partitioner="whole-model", labels=parents)
