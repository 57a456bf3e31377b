"""What to export: one ``ExportBlock`` per CoreML package, the ``ExportOptions`` of a run, and ``ExportError``.

Everything here is validated when it is built (``__post_init__``), so a bad shape spec or an unknown
quantization mode fails before any tracing or conversion starts. ``TensorIO`` is how an input or output
of a package is described in the manifest and read back from a saved package.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import BlockrtError

PRECISIONS = ("fp16", "fp32")
QUANTIZATIONS = ("int8", "int4", "palette8", "palette4", "palette6", "palette2", "palette1")
DEFAULT = "default"  # ExportBlock.quantize: use ExportOptions.quantize
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
_IO_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

_MLPROGRAM_MIN = {"iOS": 15, "macOS": 12, "watchOS": 8, "tvOS": 15}  # the first targets with ML programs
Dim = int | tuple[int, int]  # a fixed size, or (lo, hi) with hi == -1 for unbounded


class ExportError(BlockrtError):
    """A block could not be exported: the message names the block, the operation and a fix.

    Attributes:
        block: the block's name (``None`` for errors about the whole export, e.g. the output directory).
        op: the PyTorch operation coremltools could not convert, when that is the cause.
    """

    def __init__(self, message: str, *, block: str | None = None, op: str | None = None) -> None:
        super().__init__(message)
        self.block = block
        self.op = op


@dataclass(frozen=True)
class TensorIO:
    """One input or output of a package.

    Args:
        name: the feature name in the CoreML model.
        shape: per dimension an int (fixed) or ``(lo, hi)`` (a range; ``hi == -1``: unbounded). For
            outputs, the shape at the example inputs (CoreML does not record output shapes of flexible models).
        dtype: ``"float32"``, ``"float16"``, ``"int32"`` or ``"bool"`` as the package sees it.
        enumerated: for inputs with enumerated shapes, every allowed shape (``shape`` is the default one).
    """

    name: str
    shape: tuple[Dim, ...]
    dtype: str
    enumerated: tuple[tuple[int, ...], ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "shape": [list(s) if isinstance(s, tuple) else s for s in self.shape],
                             "dtype": self.dtype}
        if self.enumerated is not None:
            d["enumerated"] = [list(s) for s in self.enumerated]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TensorIO":
        shape = tuple(tuple(s) if isinstance(s, list) else int(s) for s in d["shape"])
        enum = d.get("enumerated")
        return cls(str(d["name"]), shape, str(d["dtype"]),  # type: ignore[arg-type]
                   tuple(tuple(int(v) for v in s) for s in enum) if enum is not None else None)


@dataclass
class ExportBlock:
    """One CoreML package to produce.

    Args:
        name: the package stem (``"t5_block_03"`` -> ``t5_block_03.mlpackage``).
        module: called as ``module(*example_inputs)``; returns a tensor or a tuple of tensors.
        example_inputs: the tensors it is traced with (also the default shape of flexible inputs).
        input_names / output_names: the CoreML feature names, one per example input / per output tensor.
        flexible: input name -> per-dimension spec, an int (fixed, equal to the example's size) or
            ``(lo, hi)`` (``ct.RangeDim``; ``hi = -1`` for unbounded); the example's size must lie in it.
        enumerated: input name -> the allowed shapes (``ct.EnumeratedShapes``); must include the example's.
        quantize: ``"default"`` (the run's ``ExportOptions.quantize``), ``None`` or a mode to override it.
        reference: the original PyTorch module before any rewrite made for CoreML, same call signature;
            the rewritten ``module`` is compared with it on the example inputs (``torch.equal`` expected).
        meta: free-form JSON-serialisable data copied into the manifest entry.
        expected_outputs: outputs recorded from the original model (e.g. by ``capture_blocks``); the module's
            eager outputs are compared with them (``checks["expected_equal"]``, ``torch.equal`` expected).
    """

    name: str
    module: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    flexible: dict[str, tuple] = field(default_factory=dict)
    enumerated: dict[str, list[tuple[int, ...]]] = field(default_factory=dict)
    quantize: str | None = DEFAULT
    reference: nn.Module | None = None
    meta: dict = field(default_factory=dict)
    expected_outputs: tuple[torch.Tensor, ...] | None = None

    def __post_init__(self) -> None:
        where = f"ExportBlock {self.name!r}"
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(f"ExportBlock name must be a file stem of letters, digits, '_', '.', '-' "
                             f"starting with a letter or '_', got {self.name!r}")
        if not isinstance(self.module, nn.Module):
            raise TypeError(f"{where}: module must be an nn.Module, got {type(self.module).__name__}")
        self.example_inputs = tuple(self.example_inputs)
        self.input_names, self.output_names = tuple(self.input_names), tuple(self.output_names)
        bad = [type(x).__name__ for x in self.example_inputs if not isinstance(x, torch.Tensor)]
        if bad or not self.example_inputs:
            raise TypeError(f"{where}: example_inputs must be a non-empty tuple of tensors, found {bad or 'none'}; "
                            "bake non-tensor arguments into the module (e.g. functools.partial or a wrapper)")
        if len(self.input_names) != len(self.example_inputs):
            raise ValueError(f"{where}: {len(self.example_inputs)} example inputs but {len(self.input_names)} "
                             f"input_names {self.input_names}; give one name per input")
        if not self.output_names:
            raise ValueError(f"{where}: output_names is empty; name every output tensor")
        names = self.input_names + self.output_names
        for n in names:
            if not isinstance(n, str) or not _IO_NAME.match(n):
                raise ValueError(f"{where}: input/output name {n!r} must be an identifier (letters, digits, '_')")
        if len(set(names)) != len(names):
            raise ValueError(f"{where}: input and output names must be distinct, got {names}")
        for n in (*self.flexible, *self.enumerated):
            if n not in self.input_names:
                raise ValueError(f"{where}: flexible/enumerated shape for {n!r}, which is not an input "
                                 f"(inputs: {self.input_names})")
        both = set(self.flexible) & set(self.enumerated)
        if both:
            raise ValueError(f"{where}: inputs {sorted(both)} have both flexible and enumerated shapes; choose one")
        for n, dims in self.flexible.items():
            self.flexible[n] = _check_dims(where, n, tuple(self._example(n).shape), tuple(dims))
        for n, shapes in self.enumerated.items():
            shapes = [tuple(int(v) for v in s) for s in shapes]
            example = tuple(self._example(n).shape)
            if example not in shapes:
                raise ValueError(f"{where}: enumerated shapes of {n!r} {shapes} must include the example's {example}")
            if any(len(s) != len(example) for s in shapes):
                raise ValueError(f"{where}: enumerated shapes of {n!r} must all have rank {len(example)}, got {shapes}")
            self.enumerated[n] = shapes
        if self.quantize != DEFAULT:
            check_quantize(self.quantize, where)
        if self.reference is not None and not isinstance(self.reference, nn.Module):
            raise TypeError(f"{where}: reference must be an nn.Module or None, got {type(self.reference).__name__}")

    def _example(self, name: str) -> torch.Tensor:
        return self.example_inputs[self.input_names.index(name)]

    def input_shape(self, name: str) -> tuple[Dim, ...]:
        """The input's shape as exported: ranges where ``flexible`` says so, else the example's sizes."""
        if name in self.flexible:
            return tuple(self.flexible[name])
        return tuple(int(s) for s in self._example(name).shape)


def _check_dims(where: str, name: str, example: tuple[int, ...], dims: tuple) -> tuple[Dim, ...]:
    if len(dims) != len(example):
        raise ValueError(f"{where}: flexible shape of {name!r} has {len(dims)} dims but the example input has shape "
                         f"{example}; give one int or (lo, hi) per dimension")
    out: list[Dim] = []
    for i, (d, e) in enumerate(zip(dims, example)):
        if isinstance(d, int) and not isinstance(d, bool):
            if d != e:
                raise ValueError(f"{where}: dim {i} of {name!r} is fixed to {d} but the example has {e}; "
                                 "trace with an example of that size or make the dim a (lo, hi) range")
            out.append(d)
            continue
        try:
            lo, hi = (int(v) for v in d)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: dim {i} of {name!r} must be an int or (lo, hi), got {d!r}") from None
        if lo < 1 or (hi != -1 and hi < lo) or e < lo or (hi != -1 and e > hi):
            raise ValueError(f"{where}: dim {i} of {name!r} range ({lo}, {hi}) must satisfy 1 <= lo <= example "
                             f"size {e} <= hi (or hi == -1 for unbounded)")
        out.append((lo, hi))
    return tuple(out)


def check_quantize(mode: str | None, where: str = "quantize") -> None:
    """Raise ``ValueError`` unless ``mode`` is ``None`` or one of ``QUANTIZATIONS``."""
    if mode is not None and mode not in QUANTIZATIONS:
        raise ValueError(f"{where}: quantize={mode!r} is not supported; expected None or one of {QUANTIZATIONS}")


@dataclass(frozen=True)
class ExportOptions:
    """How every package of one export run is built.

    Args:
        precision: ``"fp16"`` or ``"fp32"``: the ML program's compute precision (inputs/outputs stay fp32).
        quantize: ``None``, ``"int8"`` (linear symmetric, per output channel), ``"int4"`` (linear symmetric,
            blocks of 32 input channels) or ``"paletteN"`` (k-means palettisation with 2^N entries, N in
            1, 2, 4, 6, 8), from ``coremltools.optimize.coreml``; weights only.
        quantize_skip_ops: MIL op types whose weights stay unquantized (embedding tables feed ``gather``).
        target: the minimum deployment target, a ``coremltools.target`` name; ML programs need iOS15 or later.
        check: compare the traced module with eager and the rewritten module with its reference.
        min_quantize_elements: weights with at most this many elements stay as they are.
    """

    precision: str = "fp16"
    quantize: str | None = None
    quantize_skip_ops: tuple[str, ...] = ("gather",)
    target: str = "iOS18"
    check: bool = True
    min_quantize_elements: int = 2048

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"ExportOptions.precision={self.precision!r}; expected one of {PRECISIONS}")
        check_quantize(self.quantize, "ExportOptions")
        object.__setattr__(self, "quantize_skip_ops", tuple(self.quantize_skip_ops))
        m = re.match(r"^(iOS|macOS|watchOS|tvOS)(\d+)$", self.target)
        if not m or int(m.group(2)) < _MLPROGRAM_MIN[m.group(1)]:
            raise ValueError(f"ExportOptions.target={self.target!r}; expected a coremltools.target name that runs ML "
                             f"programs, such as 'iOS18' (at least {', '.join(f'{k}{v}' for k, v in _MLPROGRAM_MIN.items())})")
        if not isinstance(self.min_quantize_elements, int) or self.min_quantize_elements < 0:
            raise ValueError(f"ExportOptions.min_quantize_elements must be an int >= 0, got {self.min_quantize_elements!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"precision": self.precision, "quantize": self.quantize,
                "quantize_skip_ops": list(self.quantize_skip_ops), "target": self.target, "check": self.check,
                "min_quantize_elements": self.min_quantize_elements}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExportOptions":
        return cls(precision=d["precision"], quantize=d["quantize"], quantize_skip_ops=tuple(d["quantize_skip_ops"]),
                   target=d["target"], check=bool(d["check"]), min_quantize_elements=int(d["min_quantize_elements"]))
