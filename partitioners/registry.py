"""The partitioner registry: which function splits which model class into a Plan.

Partitioners are chosen by model class (never by file or checkpoint names). The most specific class in
``type(model).__mro__`` with a registered function wins; anything unregistered falls back to the
whole-model partitioner (``whole_model.py``), which decomposes the whole module tree by bytes. ``pin``
moves named modules' tensors out of their blocks afterwards, whichever partitioner ran.
"""

from __future__ import annotations

from typing import Callable, Protocol

from torch import nn

from blockrt.partitioners.plan import Plan
from blockrt.partitioners.generic import check_target_bytes, generic_partition
from blockrt.partitioners.pinning import pin_modules
from blockrt.partitioners.whole_model import whole_model_partition


class PartitionFn(Protocol):
    """``fn(model, *, target_bytes) -> Plan``: the signature every partitioner has."""

    def __call__(self, model: nn.Module, *, target_bytes: int | None) -> Plan: ...


_REGISTRY: dict[type | str, PartitionFn] = {}


def class_path(cls: type) -> str:
    """``"transformers.models.t5.modeling_t5.T5EncoderModel"``: the class's module and qualified name."""
    return f"{cls.__module__}.{cls.__qualname__}"


def register(cls: type | str) -> Callable[[PartitionFn], PartitionFn]:
    """Register a partitioner for ``cls`` and its subclasses (unless they have their own).

    Args:
        cls: the model class, e.g. ``transformers.T5EncoderModel``, or its full class path as a string
            (``"transformers.models.t5.modeling_t5.T5EncoderModel"``) so that registering does not import
            an optional dependency; it matches exactly that class (module and qualified name).

    Example:
        >>> @register(MyNet)
        ... def partition_mynet(model, *, target_bytes=None) -> Plan: ...
    """
    if not isinstance(cls, (type, str)):
        raise TypeError(f"register expects a model class or its class path, got {cls!r}; use @register(MyModel)")

    def decorator(fn: PartitionFn) -> PartitionFn:
        old = _REGISTRY.get(cls)
        # Re-registering the same function (e.g. a module reload) is fine; silently replacing another is not.
        if old is not None and (old.__module__, old.__qualname__) != (fn.__module__, fn.__qualname__):
            name = cls if isinstance(cls, str) else cls.__qualname__
            raise ValueError(
                f"a partitioner for {name} is already registered ({old.__module__}.{old.__qualname__}); "
                f"call blockrt.partitioners.registry.unregister({name}) first to replace it"
            )
        _REGISTRY[cls] = fn
        return fn

    return decorator


def unregister(cls: type | str) -> None:
    """Remove the partitioner registered for exactly ``cls`` (no error if there is none)."""
    _REGISTRY.pop(cls, None)


def lookup(model_class: type) -> PartitionFn:
    """The partitioner ``partition`` would use for an instance of ``model_class``."""
    for klass in model_class.__mro__:
        fn = _REGISTRY.get(klass) or _REGISTRY.get(class_path(klass))
        if fn is not None:
            return fn
    return whole_model_partition


def layer_partitioner(model_class: type) -> PartitionFn:
    """For exporters that want one package per layer: the registered partitioner, else the layer-stack one
    (``generic_partition``) instead of the whole-model default."""
    fn = lookup(model_class)
    return generic_partition if fn is whole_model_partition else fn


def partition(
    model: nn.Module, *, target_bytes: int | None = None, partitioner: PartitionFn | None = None,
    pin: tuple[str, ...] | list[str] = (),
) -> Plan:
    """Split ``model`` into a Plan of streamable blocks and pinned tensors.

    Args:
        model: the model; it may live on the ``meta`` device (only shapes and dtypes are read).
        target_bytes: pack consecutive layers into blocks of at most this many bytes
            (``None``: the partitioner's default; the whole-model one packs up to its largest unit, at most 1/8
            of the model). A single layer larger than the target is its own block.
        partitioner: force this function instead of the one registered for the model's class.
        pin: module paths whose tensors stay resident instead of streaming (``pin_modules``), e.g. a module
            whose weights are used while another block runs.

    Example:
        >>> plan = partition(model, target_bytes=256 << 20)
    """
    check_target_bytes(target_bytes)
    if partitioner is None:
        fn = lookup(type(model))
    elif callable(partitioner):
        fn = partitioner
    else:
        raise TypeError(f"partitioner must be a callable fn(model, *, target_bytes) -> Plan, got {partitioner!r}")
    plan = fn(model, target_bytes=target_bytes)
    if not isinstance(plan, Plan):
        name = getattr(fn, "__qualname__", repr(fn))
        raise TypeError(f"partitioner {name} returned {type(plan).__qualname__}, expected a blockrt.Plan")
    return pin_modules(model, plan, pin) if pin else plan
