"""CoreML export: each block of a model as its own ``.mlpackage``, plus a manifest to stream them on a phone.

    from blockrt.coreml import ExportBlock, ExportOptions, export_blocks, export_model, inspect_package
    manifest = export_blocks([ExportBlock("layer_0", layer, (x,), ("x",), ("y",))], "out/coreml",
                             ExportOptions(precision="fp16", quantize="int8"))
    manifest = export_model(model, (), {"input_ids": ids}, "out/model")   # every block of the plan
    info = inspect_package("out/coreml/layer_0.mlpackage")   # works on Linux: spec only, no predict()

``export_model`` / ``capture_blocks`` build the blocks from a model and its blockrt Plan by recording one
pass through the runtime's hooks. Needs ``coremltools`` (the ``coreml`` extra); conversion, compression,
saving and inspection work on Linux, ``MLModel.predict`` only on macOS.
"""

from .capture import CapturedBlock, capture_blocks
from .export import export_blocks
from .from_model import export_model
from .inspect import PackageInfo, inspect_package
from .manifest import ExportManifest, PackageEntry, read_manifest
from .replay import ReplayModule
from .spec import ExportBlock, ExportError, ExportOptions, TensorIO

__all__ = [
    "CapturedBlock", "ExportBlock", "ExportError", "ExportManifest", "ExportOptions", "PackageEntry", "PackageInfo",
    "ReplayModule", "TensorIO", "capture_blocks", "export_blocks", "export_model", "inspect_package", "read_manifest",
]
