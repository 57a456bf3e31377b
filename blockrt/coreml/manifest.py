"""The export manifest ``export.json``: what an app needs to stream the exported packages.

One JSON file at the top of an export directory: a format marker and version, the blockrt / coremltools /
torch versions, the options of the run, then per package in run order its file, inputs and outputs (names,
shapes or ranges, dtypes), bytes on disk, precision, quantization, the checks made while exporting, and
free-form ``meta``; plus the ``wiring`` (which package output, or which app-provided input, feeds each
package input) and the ``pinned`` tensors the app keeps itself. ``read_manifest`` refuses anything else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .spec import ExportError, ExportOptions, TensorIO

FORMAT = "blockrt-coreml-export"
FORMAT_VERSION = 1
MANIFEST = "export.json"
APP_INPUT = "input:"  # wiring source prefix: a tensor the app provides (a model input)
PINNED_INPUT = "pinned:"  # wiring source prefix: computed by the app outside the packages (pinned modules, model code)
SOURCE_PREFIXES = (APP_INPUT, PINNED_INPUT)


@dataclass
class PackageEntry:
    """One exported package, in the manifest.

    Args:
        name: the package stem; ``file`` is its directory name inside the export (``<name>.mlpackage``).
        order: its position in the run order (0-based).
        inputs / outputs: as the package declares them (input ranges; output shapes at the example inputs).
        bytes: bytes on disk of the whole package; weight_bytes: of its ``weights/`` (the streamed part).
        precision: ``"fp16"`` or ``"fp32"``; quantization: ``None`` or the mode its weights were compressed with.
        checks: ``trace_equal`` (traced == eager), ``reference_equal`` and ``max_abs_error`` (rewritten module
            vs its reference on the example inputs), ``expected_equal`` (vs outputs recorded from the model, for
            captured blocks); ``None`` or absent where not checked.
        seconds: time spent tracing, converting and compressing it.
        meta: the block's free-form ``meta``.
    """

    name: str
    file: str
    order: int
    inputs: tuple[TensorIO, ...]
    outputs: tuple[TensorIO, ...]
    bytes: int
    weight_bytes: int
    precision: str
    quantization: str | None
    checks: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "file": self.file, "order": self.order,
                "inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs],
                "bytes": self.bytes, "weight_bytes": self.weight_bytes, "precision": self.precision,
                "quantization": self.quantization, "checks": dict(self.checks), "seconds": dict(self.seconds),
                "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PackageEntry":
        return cls(name=str(d["name"]), file=str(d["file"]), order=int(d["order"]),
                   inputs=tuple(TensorIO.from_dict(t) for t in d["inputs"]),
                   outputs=tuple(TensorIO.from_dict(t) for t in d["outputs"]), bytes=int(d["bytes"]),
                   weight_bytes=int(d["weight_bytes"]), precision=str(d["precision"]), quantization=d["quantization"],
                   checks=dict(d.get("checks", {})), seconds=dict(d.get("seconds", {})), meta=dict(d.get("meta", {})))


@dataclass
class ExportManifest:
    """The contents of ``export.json``; ``packages`` are in run order.

    ``wiring`` maps ``"<package>.<input>"`` to its source: ``"<package>.<output>"``, ``"input:<name>"`` (a model
    input the app provides) or ``"pinned:<name>"`` (computed by the app outside the packages: embeddings, masks). ``pinned`` lists the state-dict keys of tensors outside every exported
    package (embeddings, final norms, ...), which the app keeps and runs itself.
    """

    packages: list[PackageEntry]
    options: ExportOptions
    wiring: dict[str, str] = field(default_factory=dict)
    pinned: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    def package(self, name: str) -> PackageEntry:
        """The entry named ``name``; ``KeyError`` listing the names if there is none."""
        for p in self.packages:
            if p.name == name:
                return p
        raise KeyError(f"no package {name!r} in this export; packages: {[p.name for p in self.packages]}")

    @property
    def total_bytes(self) -> int:
        return sum(p.bytes for p in self.packages)

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "versions": dict(self.versions),
                "options": self.options.to_dict(), "packages": [p.to_dict() for p in self.packages],
                "wiring": dict(self.wiring), "pinned": list(self.pinned), "extra": dict(self.extra)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExportManifest":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            found = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise ExportError(f"expected a blockrt CoreML export manifest (format {FORMAT!r}), found format {found!r}")
        if d.get("format_version") != FORMAT_VERSION:
            raise ExportError(f"export manifest format_version {d.get('format_version')!r} is not supported "
                              f"(expected {FORMAT_VERSION}); fix: export again with this blockrt")
        try:
            m = cls(packages=[PackageEntry.from_dict(p) for p in d["packages"]],
                    options=ExportOptions.from_dict(d["options"]), wiring=dict(d.get("wiring", {})),
                    pinned=list(d.get("pinned", [])), extra=dict(d.get("extra", {})),
                    versions=dict(d.get("versions", {})))
        except (KeyError, TypeError, ValueError) as e:
            raise ExportError(f"export manifest is malformed: {type(e).__name__}: {e}") from None
        m.validate()
        return m

    def validate(self) -> None:
        """Check names are unique, orders are 0..n-1 in sequence, and every wiring end exists."""
        names = [p.name for p in self.packages]
        if len(set(names)) != len(names):
            raise ExportError(f"export manifest has duplicate package names: {names}")
        if [p.order for p in self.packages] != list(range(len(self.packages))):
            raise ExportError(f"export manifest packages must be in run order 0..{len(names) - 1}, "
                              f"found orders {[p.order for p in self.packages]}")
        check_wiring(self.wiring, {p.name: (tuple(t.name for t in p.inputs), tuple(t.name for t in p.outputs))
                                   for p in self.packages})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


def check_wiring(wiring: dict[str, str], io: dict[str, tuple[tuple[str, ...], tuple[str, ...]]]) -> None:
    """Raise ``ExportError`` unless every key is ``"<package>.<input>"`` and every value is
    ``"<package>.<output>"``, ``"input:<name>"`` or ``"pinned:<name>"``, naming packages/features in ``io``
    (package name -> (input names, output names))."""
    for dst, src in wiring.items():
        pkg, _, feat = str(dst).rpartition(".")
        if pkg not in io or feat not in io[pkg][0]:
            raise ExportError(f"wiring key {dst!r} must name '<package>.<input>' of an exported package; packages "
                              f"and inputs: { {k: v[0] for k, v in io.items()} }")
        prefix = next((p for p in SOURCE_PREFIXES if str(src).startswith(p)), None)
        if prefix is not None:
            if not src[len(prefix):]:
                raise ExportError(f"wiring source {src!r} for {dst!r} needs a name after {prefix!r}")
            continue
        spkg, _, sfeat = str(src).rpartition(".")
        if spkg not in io or sfeat not in io[spkg][1]:
            raise ExportError(f"wiring source {src!r} for {dst!r} must be '<package>.<output>' of an exported package "
                              f"or '{APP_INPUT}<name>' / '{PINNED_INPUT}<name>'; packages and outputs: { {k: v[1] for k, v in io.items()} }")


def read_manifest(out_dir: str | Path) -> ExportManifest:
    """Read and validate ``export.json`` of an export directory (or the file itself).

    Raises ``ExportError`` naming the directory when it is not a blockrt CoreML export or a package is missing.
    """
    path = Path(out_dir)
    file = path if path.is_file() else path / MANIFEST
    root = file.parent
    if not file.exists():
        raise ExportError(f"{path} is not a blockrt CoreML export: {MANIFEST} not found; fix: point at the directory "
                          "written by blockrt.coreml.export_blocks / `blockrt export coreml`")
    try:
        d = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{file} is not valid JSON ({e}); it is not a blockrt CoreML export manifest") from None
    m = ExportManifest.from_dict(d)
    missing = [p.file for p in m.packages if not (root / p.file).is_dir()]
    if missing:
        raise ExportError(f"{root}: the manifest lists packages that are missing: {missing}; fix: export again")
    return m
