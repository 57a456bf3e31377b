"""CoreML export of explicit blocks (``blockrt.coreml.export_blocks``), checked on Linux by structure.

Core ML's ``predict`` is macOS-only, so these tests read each saved package's spec back: inputs/outputs
against the manifest, flexible shapes as ranges, compressed-weight ops and weight sizes per precision and
quantization; plus the output directory's refusal and overwrite rules and the error for an op that
coremltools cannot convert. Exports are shared across tests through module-scoped fixtures (each
conversion takes about a second).
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn

pytest.importorskip("coremltools")

from blockrt.coreml import (  # noqa: E402
    ExportBlock, ExportError, ExportManifest, ExportOptions, export_blocks, inspect_package, read_manifest,
)
from blockrt.coreml.kmeans import kmeans_1d  # noqa: E402

DIM = 256  # Linear DIM x DIM layers: weights dominate the package size
INT8_RATIO = (0.2, 0.35)  # int8 weight bytes / fp32 weight bytes (int8 values + per-channel scales)
FP16_RATIO = (0.45, 0.55)
PALETTE4_RATIO = (0.1, 0.2)  # 4-bit indices + a 16-entry table per tensor
PSNR_FP16_DB = 35.0  # macOS predict() parity thresholds (Apple's ml-stable-diffusion uses 35 dB)
PSNR_FP32_DB = 60.0


class MLP(nn.Module):
    """Two Linear DIM x DIM layers with a GELU: the weight-dominated block of the size tests."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, DIM) -> (B, T, DIM)
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class TwoOut(nn.Module):
    """A block with two inputs and two outputs (hidden state and a bias passed on, like T5's)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fc(x) + bias, bias * 2


def _mlp_block(name: str = "mlp", **kw) -> ExportBlock:
    torch.manual_seed(0)
    return ExportBlock(name, MLP().eval(), (torch.randn(2, 8, DIM),), ("x",), ("y",), **kw)


def _weight_bytes(manifest: ExportManifest, name: str) -> int:
    return manifest.package(name).weight_bytes


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """The MLP exported as fp32, fp16, int8 (fp16), int4 and palette4, each into its own directory."""
    out = {}
    for label, opts in {
        "fp32": ExportOptions(precision="fp32"),
        "fp16": ExportOptions(precision="fp16"),
        "int8": ExportOptions(precision="fp16", quantize="int8"),
        "int8_fp32": ExportOptions(precision="fp32", quantize="int8"),
        "palette4": ExportOptions(precision="fp32", quantize="palette4"),
    }.items():
        d = tmp_path_factory.mktemp(label) / "export"
        out[label] = (d, export_blocks([_mlp_block(flexible={"x": (2, (1, 64), DIM)})], d, opts))
    return out


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """Two wired blocks: a two-in/two-out block feeding an MLP, with enumerated shapes and per-block quantize."""
    torch.manual_seed(1)
    x, bias = torch.randn(1, 8, DIM), torch.randn(1, 1, DIM)
    first = ExportBlock("first", TwoOut().eval(), (x, bias), ("x", "bias"), ("h", "bias_out"),
                        enumerated={"x": [(1, 8, DIM), (1, 16, DIM)]}, quantize=None, meta={"role": "block", "index": 0})
    second = ExportBlock("second", MLP().eval(), (torch.randn(1, 8, DIM),), ("x",), ("y",), meta={"index": 1})
    wiring = {"first.x": "input:x", "first.bias": "input:bias", "second.x": "first.h"}
    seen = []
    d = tmp_path_factory.mktemp("chain") / "export"
    manifest = export_blocks([first, second], d, ExportOptions(quantize="int8"), wiring=wiring,
                             extra={"model": "test"}, progress=lambda i, n, name: seen.append((i, n, name)))
    return d, manifest, seen


def test_packages_load_as_specs_and_match_the_manifest(exports) -> None:
    for label, (d, manifest) in exports.items():
        assert read_manifest(d).to_dict() == manifest.to_dict()
        (entry,) = manifest.packages
        info = inspect_package(d / entry.file)
        assert [(t.name, t.dtype) for t in info.inputs] == [(t.name, t.dtype) for t in entry.inputs], label
        assert [(t.name, t.dtype) for t in info.outputs] == [(t.name, t.dtype) for t in entry.outputs], label
        assert info.inputs[0].shape == entry.inputs[0].shape == (2, (1, 64), DIM)  # the range survived
        assert info.bytes == entry.bytes and info.weight_bytes == entry.weight_bytes
        assert info.op_counts["linear"] == 2 and info.opset == "CoreML8"  # iOS18 opset
        assert entry.checks["trace_equal"] is True


def test_quantized_weights_sizes(exports) -> None:
    fp32 = _weight_bytes(exports["fp32"][1], "mlp")
    assert fp32 >= 2 * DIM * DIM * 4  # the two weight matrices in fp32
    ratios = {k: _weight_bytes(m, "mlp") / fp32 for k, (_, m) in exports.items()}
    assert FP16_RATIO[0] <= ratios["fp16"] <= FP16_RATIO[1], ratios
    assert INT8_RATIO[0] <= ratios["int8"] <= INT8_RATIO[1], ratios
    assert INT8_RATIO[0] <= ratios["int8_fp32"] <= INT8_RATIO[1], ratios
    assert PALETTE4_RATIO[0] <= ratios["palette4"] <= PALETTE4_RATIO[1], ratios
    for label in ("fp32", "fp16"):
        d, m = exports[label]
        assert not inspect_package(d / "mlp.mlpackage").has_quantized_weights
    ops_int8 = inspect_package(exports["int8"][0] / "mlp.mlpackage").op_counts
    assert ops_int8.get("constexpr_blockwise_shift_scale") == 2, ops_int8
    assert inspect_package(exports["palette4"][0] / "mlp.mlpackage").op_counts.get("constexpr_lut_to_dense") == 2
    assert exports["int8"][1].packages[0].quantization == "int8"


def test_multifunction_package_reports_each_function(exports, chain, tmp_path) -> None:
    from coremltools.models.utils import MultiFunctionDescriptor, save_multifunction

    desc = MultiFunctionDescriptor()
    desc.add_function(str(exports["fp16"][0] / "mlp.mlpackage"), src_function_name="main", target_function_name="main")
    desc.add_function(str(chain[0] / "second.mlpackage"), src_function_name="main", target_function_name="short")
    desc.default_function_name = "main"
    save_multifunction(desc, str(tmp_path / "two.mlpackage"))
    info = inspect_package(tmp_path / "two.mlpackage")
    assert set(info.functions) == {"main", "short"} and info.input("x").shape == (2, (1, 64), DIM)
    assert inspect_package(tmp_path / "two.mlpackage", "short").input("x").shape == (1, 8, DIM)
    assert info.has_quantized_weights  # the "short" function's int8 weights
    with pytest.raises(ExportError, match="no function 'nope'"):
        inspect_package(tmp_path / "two.mlpackage", "nope")


def test_chain_manifest_wiring_enumerated_and_progress(chain) -> None:
    d, manifest, seen = chain
    assert seen == [(1, 2, "first"), (2, 2, "second")]
    assert [p.name for p in manifest.packages] == ["first", "second"] and [p.order for p in manifest.packages] == [0, 1]
    first, second = manifest.packages
    assert first.quantization is None and second.quantization == "int8"  # the per-block override
    assert not inspect_package(d / first.file).has_quantized_weights
    assert inspect_package(d / second.file).has_quantized_weights
    x_in = inspect_package(d / first.file).input("x")
    assert set(x_in.enumerated) == {(1, 8, DIM), (1, 16, DIM)} == set(first.inputs[0].enumerated)
    assert [t.name for t in first.outputs] == ["h", "bias_out"] and first.outputs[1].shape == (1, 1, DIM)
    assert first.meta == {"role": "block", "index": 0} and manifest.extra == {"model": "test"}
    again = read_manifest(d)
    assert again.wiring == {"first.x": "input:x", "first.bias": "input:bias", "second.x": "first.h"}
    assert ExportManifest.from_dict(json.loads(json.dumps(manifest.to_dict()))).to_dict() == manifest.to_dict()
    assert again.versions["coremltools"] and again.options == ExportOptions(quantize="int8")


def test_existing_non_export_directory_is_refused_untouched(tmp_path) -> None:
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not a blockrt CoreML export"):
        export_blocks([_mlp_block()], d)
    assert [p.name for p in d.iterdir()] == ["notes.txt"] and (d / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no staging directory left behind
    with pytest.raises(ExportError, match="not a blockrt CoreML export"):
        read_manifest(d)


def test_overwrite_needs_the_flag_and_replaces_atomically(tmp_path) -> None:
    d = tmp_path / "out"
    export_blocks([_mlp_block("a")], d, ExportOptions(precision="fp32"))
    with pytest.raises(ExportError, match="overwrite=True"):
        export_blocks([_mlp_block("b")], d)
    assert [p.name for p in read_manifest(d).packages] == ["a"]
    export_blocks([_mlp_block("b")], d, overwrite=True)
    assert sorted(p.name for p in d.iterdir()) == ["b.mlpackage", "export.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old export and the stage are gone


class Eigh(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.eigh(x @ x.transpose(-1, -2))[0]


def test_unconvertible_op_names_the_block_and_op(tmp_path) -> None:
    ok = _mlp_block("fine")
    bad = ExportBlock("eigen_block", Eigh(), (torch.randn(4, 4),), ("x",), ("w",))
    with pytest.raises(ExportError, match=r"block 'eigen_block'.*'linalg_eigh'") as e:
        export_blocks([ok, bad], tmp_path / "out")
    assert e.value.block == "eigen_block" and e.value.op == "linalg_eigh"
    assert "fix:" in str(e.value)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []  # nothing half-written


class Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # (B, T, 16), bool (B, T, 16)
        return self.fc(x).masked_fill(mask, 0.0)


def test_bool_inputs_become_float_features(tmp_path) -> None:
    x = torch.randn(1, 4, 16)
    block = ExportBlock("masked", Masked().eval(), (x, x > 0), ("x", "mask"), ("y",))
    manifest = export_blocks([block], tmp_path / "out", ExportOptions(precision="fp32"))
    info = inspect_package(tmp_path / "out" / "masked.mlpackage")
    assert [t.dtype for t in info.inputs] == [t.dtype for t in manifest.packages[0].inputs] == ["float32", "float32"]


def test_passthrough_output_is_refused_with_the_fix(tmp_path) -> None:
    class Pass(nn.Module):
        def forward(self, x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x + bias, bias

    x = torch.randn(1, 4, 16)
    with pytest.raises(ExportError, match="'bias_out' is input 'bias' passed through unchanged.*fix: drop it"):
        export_blocks([ExportBlock("p", Pass(), (x, torch.randn(1, 1, 16)), ("x", "bias"), ("y", "bias_out"))],
                      tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_bad_specs_fail_before_any_work() -> None:
    x = torch.randn(2, 8, DIM)
    with pytest.raises(ValueError, match="one name per input"):
        ExportBlock("b", MLP(), (x,), ("x", "y"), ("out",))
    with pytest.raises(ValueError, match="example size 8"):
        ExportBlock("b", MLP(), (x,), ("x",), ("y",), flexible={"x": (2, (9, 16), DIM)})
    with pytest.raises(ValueError, match="must include the example"):
        ExportBlock("b", MLP(), (x,), ("x",), ("y",), enumerated={"x": [(2, 4, DIM)]})
    with pytest.raises(ValueError, match="not supported"):
        ExportOptions(quantize="int3")
    with pytest.raises(ValueError, match="precision"):
        ExportOptions(precision="bf16")
    with pytest.raises(ValueError, match="ML programs"):
        ExportOptions(target="iOS14")
    with pytest.raises(ExportError, match="wiring key 'b.z'"):
        export_blocks([ExportBlock("b", MLP(), (x,), ("x",), ("y",))], "/nonexistent/never", wiring={"b.z": "input:x"})


def test_reference_mismatch_is_recorded(tmp_path) -> None:
    torch.manual_seed(5)
    other = MLP().eval()  # other random weights than _mlp_block's: not equal
    block = _mlp_block(reference=other)
    manifest = export_blocks([block], tmp_path / "out", ExportOptions(precision="fp32"))
    checks = manifest.packages[0].checks
    assert checks["reference_equal"] is False and checks["max_abs_error"] > 0
    assert checks["trace_equal"] is True


def test_kmeans_1d_is_exact_on_clustered_values() -> None:
    rng = torch.Generator().manual_seed(0)
    centers = torch.tensor([-3.0, -1.0, 0.5, 4.0])
    labels = torch.randint(0, 4, (5000,), generator=rng)
    values = (centers[labels] + 0.01 * torch.randn(5000, generator=rng)).numpy()
    lut, idx = kmeans_1d(values, 4)
    assert lut.dtype == values.dtype and idx.dtype.name == "uint8" and idx.shape == (5000,)
    assert torch.allclose(torch.from_numpy(lut), centers, atol=0.01)
    assert torch.equal(torch.from_numpy(idx.astype("int64")), labels)


@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML predict() runs only on macOS")
def test_predict_parity_on_macos(exports) -> None:
    import coremltools as ct
    import numpy as np

    torch.manual_seed(0)
    block = _mlp_block()
    x = torch.randn(2, 20, DIM)  # a length inside the exported range, not the example's
    want = block.module(x).detach().numpy()
    for label, threshold in (("fp32", PSNR_FP32_DB), ("fp16", PSNR_FP16_DB)):
        d, manifest = exports[label]
        got = ct.models.MLModel(str(d / "mlp.mlpackage")).predict({"x": x.numpy()})["y"]
        mse = float(np.mean((got - want) ** 2))
        psnr = 10 * np.log10(float(np.abs(want).max()) ** 2 / max(mse, 1e-30))
        assert psnr >= threshold, (label, psnr)
