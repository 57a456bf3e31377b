"""The Plan: which state-dict keys form which block, in what order, and what stays pinned.

A Plan is plain data (JSON-serialisable) produced by a partitioner and consumed by the store, the loader
and the runtime. Keys are the model's own state-dict names; tied tensors appear once, under their owner's
name, and every other name of the same tensor is listed in ``aliases`` (alias -> owner).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

PLAN_VERSION = 1


@dataclass(frozen=True)
class TensorSpec:
    """One tensor a block owns: its state-dict key, dtype name (e.g. ``"float32"``) and shape."""

    key: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * dtype_from_name(self.dtype).itemsize


@dataclass(frozen=True)
class Block:
    """A unit of streaming: consecutive modules whose weights load and release together.

    Args:
        name: a short readable name, e.g. ``"encoder.block.0-1"``.
        modules: the module paths the block covers, in execution order (hooks go on these).
        tensors: the tensors the block owns (parameters and persistent buffers of those modules).
    """

    name: str
    modules: tuple[str, ...]
    tensors: tuple[TensorSpec, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(t.key for t in self.tensors)


@dataclass(frozen=True)
class Plan:
    """An ordered list of blocks plus the pinned tensors that stay resident.

    ``blocks`` are in execution order: block i+1 runs after block i, and block 0 runs after the last
    block of the previous pass. ``pinned`` are tensors outside every block (embeddings, norms, heads,
    tensors shared between blocks). ``aliases`` maps every other name of a tied tensor to its owner.
    """

    blocks: tuple[Block, ...]
    pinned: tuple[TensorSpec, ...]
    aliases: dict[str, str] = field(default_factory=dict)
    model_class: str = ""
    partitioner: str = ""

    @property
    def pinned_bytes(self) -> int:
        return sum(t.nbytes for t in self.pinned)

    @property
    def block_bytes(self) -> int:
        return sum(b.nbytes for b in self.blocks)

    @property
    def total_bytes(self) -> int:
        return self.pinned_bytes + self.block_bytes

    def largest_block(self) -> Block:
        return max(self.blocks, key=lambda b: b.nbytes)

    def all_specs(self) -> dict[str, TensorSpec]:
        """Every owned tensor, pinned and streamed, by key."""
        specs = {t.key: t for t in self.pinned}
        for b in self.blocks:
            specs.update({t.key: t for t in b.tensors})
        return specs

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["version"] = PLAN_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        if d.get("version") != PLAN_VERSION:
            raise ValueError(f"plan version {d.get('version')!r} is not supported (expected {PLAN_VERSION})")

        def spec(t: dict[str, Any]) -> TensorSpec:
            return TensorSpec(t["key"], t["dtype"], tuple(t["shape"]))

        blocks = tuple(
            Block(b["name"], tuple(b["modules"]), tuple(spec(t) for t in b["tensors"])) for b in d["blocks"]
        )
        return cls(
            blocks=blocks,
            pinned=tuple(spec(t) for t in d["pinned"]),
            aliases=dict(d.get("aliases", {})),
            model_class=d.get("model_class", ""),
            partitioner=d.get("partitioner", ""),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(json.loads(text))


_DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
FLOAT_DTYPES = tuple(name for name, dtype in _DTYPES.items() if dtype.is_floating_point)
"""The floating-point dtype names: ``("float64", "float32", "float16", "bfloat16")``."""


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """``"float32"`` -> ``torch.float32``; a clear error for anything else."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}; expected one of {sorted(_DTYPES)}") from None


def tensor_spec(key: str, t: torch.Tensor) -> TensorSpec:
    return TensorSpec(key, dtype_name(t.dtype), tuple(t.shape))
