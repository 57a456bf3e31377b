"""Reading a saved ``.mlpackage`` back on any platform: its interface, its MIL ops, its size.

``inspect_package`` loads only the protobuf spec (``coremltools.utils.load_spec``), which works on Linux
where Core ML itself (``predict``) does not. It reports the inputs and outputs with their shapes, ranges or
enumerated shapes, the op types of the ML program (counted through nested blocks), the bytes on disk and
whether weights are stored compressed (``constexpr_*`` ops: quantized or palettised weights).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .spec import Dim, ExportError, TensorIO

WEIGHTS_DIR = Path("Data") / "com.apple.CoreML" / "weights"


@dataclass
class PackageInfo:
    """What a saved package declares and holds.

    Args:
        path: the ``.mlpackage`` directory.
        inputs / outputs: name, shape (``(lo, hi)`` for a range dim, ``hi == -1`` unbounded; outputs of a
            flexible model often have no shape, ``()``), dtype and, for inputs, enumerated shapes.
        op_counts: MIL op type -> number of ops, over every function (nested blocks included).
        bytes: the whole package on disk; weight_bytes: its weight files.
        has_quantized_weights: whether any ``constexpr_*`` op (quantized/palettised weight) is present.
        spec_version: the Core ML specification version; opset: the reported function's opset (``"CoreML8"``
            for iOS 18).
        metadata: the model's user-defined metadata (coremltools and torch versions).
        functions: the ML program's function names (``("main",)``, more in a multifunction package); inputs
            and outputs are the reported function's (``inspect_package``'s ``function``, else the default one).
    """

    path: Path
    inputs: tuple[TensorIO, ...]
    outputs: tuple[TensorIO, ...]
    op_counts: dict[str, int]
    bytes: int
    weight_bytes: int
    has_quantized_weights: bool
    spec_version: int
    opset: str
    metadata: dict[str, str] = field(default_factory=dict)
    functions: tuple[str, ...] = ("main",)

    def input(self, name: str) -> TensorIO:
        """The input named ``name``."""
        return _named(self.inputs, name, "input")

    def output(self, name: str) -> TensorIO:
        """The output named ``name``."""
        return _named(self.outputs, name, "output")


def _named(items: tuple[TensorIO, ...], name: str, kind: str) -> TensorIO:
    for t in items:
        if t.name == name:
            return t
    raise KeyError(f"no {kind} {name!r}; {kind}s: {[t.name for t in items]}")


def dir_bytes(path: Path) -> int:
    """Total size of the regular files under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _feature(desc: Any) -> TensorIO:
    from coremltools.proto import FeatureTypes_pb2 as ft

    kind = desc.type.WhichOneof("Type")
    if kind != "multiArrayType":
        return TensorIO(desc.name, (), kind or "unknown")
    arr = desc.type.multiArrayType
    dtype = ft.ArrayFeatureType.ArrayDataType.Name(arr.dataType).lower()
    shape: tuple[Dim, ...] = tuple(int(s) for s in arr.shape)
    enumerated = None
    flex = arr.WhichOneof("ShapeFlexibility")
    if flex == "shapeRange":
        shape = tuple(int(r.lowerBound) if r.lowerBound == r.upperBound else (int(r.lowerBound), int(r.upperBound))
                      for r in arr.shapeRange.sizeRanges)
    elif flex == "enumeratedShapes":
        enumerated = tuple(tuple(int(v) for v in s.shape) for s in arr.enumeratedShapes.shapes)
    return TensorIO(desc.name, shape, dtype, enumerated)


def _count_ops(block: Any, counts: Counter) -> None:
    for op in block.operations:
        counts[op.type] += 1
        for inner in op.blocks:
            _count_ops(inner, counts)


def inspect_package(path: str | Path, function: str | None = None) -> PackageInfo:
    """Load a ``.mlpackage``'s spec (no Core ML runtime needed) and describe it.

    Args:
        path: the ``.mlpackage`` directory.
        function: whose inputs/outputs to report in a multifunction package (default: its default function).

    Raises ``ExportError`` naming the path when it is not a readable ML program package.
    """
    import coremltools as ct

    p = Path(path)
    if not p.is_dir() or not (p / "Manifest.json").exists():
        raise ExportError(f"{p} is not an .mlpackage directory (no Manifest.json); fix: pass the path of a package "
                          "written by the exporter")
    try:
        spec = ct.utils.load_spec(str(p))
    except Exception as e:
        raise ExportError(f"{p}: coremltools could not load its spec: {type(e).__name__}: {e}") from e
    if spec.WhichOneof("Type") != "mlProgram":
        raise ExportError(f"{p} holds a {spec.WhichOneof('Type')!r} model; expected an ML program (mlProgram)")
    counts: Counter = Counter()
    functions = spec.mlProgram.functions
    for f in functions.values():  # a multifunction package shares weights between its functions
        _count_ops(f.block_specializations[f.opset], counts)
    desc = spec.description
    chosen = function or desc.defaultFunctionName or "main"
    if chosen not in functions:
        raise ExportError(f"{p} has no function {chosen!r}; functions: {sorted(functions)}")
    opset = functions[chosen].opset
    names = tuple(f.name for f in desc.functions) or tuple(functions)
    iface = next((f for f in desc.functions if f.name == chosen), desc)  # multifunction: per-function interfaces
    weights = p / WEIGHTS_DIR
    return PackageInfo(
        path=p,
        inputs=tuple(_feature(d) for d in iface.input),
        outputs=tuple(_feature(d) for d in iface.output),
        op_counts=dict(sorted(counts.items())),
        bytes=dir_bytes(p),
        weight_bytes=dir_bytes(weights) if weights.is_dir() else 0,
        has_quantized_weights=any(t.startswith("constexpr_") for t in counts),
        spec_version=int(spec.specificationVersion),
        opset=opset,
        metadata=dict(spec.description.metadata.userDefined),
        functions=names,
    )
