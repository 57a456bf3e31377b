"""4-bit weight-only storage (``blockrt/int4.py``): packing, the round-trip bound, the loader's in-place widening
equal to the reference dequantisation, rows that do not split into groups, stores per group size, a checkpoint
converted to int4, and the block files' size."""

from __future__ import annotations

import json
import math

import pytest
import torch

import blockrt
from blockrt import RunConfig, StoreError
from blockrt.int4 import (INT4_QMAX, dequantize_int4, group_of, packed_shape, quantize_int4, scale_shape,
                          stored_name)
from blockrt.partitioners import partition
from blockrt.partitioners.plan import TensorSpec
from blockrt.quantize import chunk_elements, convert_in_place, stored_dtype, tmp_elements
from models import build_t5_encoder, build_toy
from test_storage_dtypes import as_stored, block_files, loaded_weights, output, snr_db

pytestmark = pytest.mark.timeout(120)

BUDGET = "64MB"
EPS = 1e-4  # relative slack on the half-step bound: float32 rounding of w / s and q * s
# int4 end to end, random weights (measured 33.4 dB on the toy at dim 256, 18.7 dB on the tiny T5, groups of 128)
INT4_MIN_SNR_DB = {"toy": 25.0, "t5": 14.0}
INT4_BYTES_RATIO = (0.13, 0.17)  # int4 block files / float32 ones at groups of 128: 1/8 + scales + norms


def _toy():
    return build_toy(0, dim=256, n_layers=2, n_heads=4)


def test_packing_puts_even_elements_in_the_low_nibble():
    w = torch.tensor([[7.0, -7.0, 0.0, 1.0, -1.0, 3.0, 2.0, -4.0] * 4])  # (1, 32): one group of 32, max 7 -> s = 1
    packed, scale = quantize_int4(w, 32)
    assert packed.dtype == torch.uint8 and list(packed.shape) == [1, 16] == packed_shape(w.shape)
    assert scale.dtype == torch.float32 and list(scale.shape) == [1, 1] == scale_shape(w.shape, 32)
    assert scale.item() == 1.0
    expected = [(7 + 8) | ((-7 + 8) << 4), (0 + 8) | ((1 + 8) << 4), (-1 + 8) | ((3 + 8) << 4),
                (2 + 8) | ((-4 + 8) << 4)] * 4
    assert packed[0].tolist() == expected
    assert torch.equal(dequantize_int4(packed, scale, w.shape), w)


def test_round_trip_is_within_half_a_step_per_group():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 256, generator=g) * torch.logspace(-3, 1, 12)[:, None]  # rows of very different scales
    w[3, 64:128] = 0.0  # an all-zero group
    for group in (32, 64, 128, 256):
        packed, scale = quantize_int4(w, group)
        assert list(scale.shape) == [12, 256 // group]
        back = dequantize_int4(packed, scale, w.shape)
        step = scale.repeat_interleave(group, dim=1)  # (12, 256): each element's group scale
        assert ((back - w).abs() <= step / 2 * (1 + EPS) + 1e-30).all(), group
        assert (scale == w.reshape(12, -1, group).abs().amax(2) / INT4_QMAX).all()
    packed, scale = quantize_int4(w, 64)
    assert scale[3, 1] == 0 and torch.equal(dequantize_int4(packed, scale, w.shape)[3, 64:128], torch.zeros(64))
    conv = torch.randn(6, 4, 4, 4, generator=g)  # K = 64 per output channel
    p4, s4 = quantize_int4(conv, 64)
    assert list(p4.shape) == [6, 32] and list(s4.shape) == [6, 1]
    back = dequantize_int4(p4, s4, conv.shape)
    assert back.shape == conv.shape and ((back - conv).abs() <= s4[:, :, None, None] / 2 * (1 + EPS)).all()


def test_shapes_that_do_not_split_into_groups_are_refused_or_stored_int8():
    with pytest.raises(ValueError, match="not a multiple of 64"):
        quantize_int4(torch.randn(4, 100), 64)
    with pytest.raises(ValueError, match="ndim >= 2"):
        quantize_int4(torch.randn(128), 64)
    with pytest.raises(ValueError, match="group size 48"):
        quantize_int4(torch.randn(4, 96), 48)
    with pytest.raises(ValueError, match="inf or nan"):
        quantize_int4(torch.tensor([[1.0, float("nan")] * 16] * 2), 32)
    odd = TensorSpec("w", "float32", (64, 100))  # 100 is no multiple of 64: int8 per output channel instead
    assert stored_dtype(odd, "int4-g64") == "int8"
    assert stored_dtype(TensorSpec("w", "float32", (64, 128)), "int4") == "int4-g128"
    assert stored_dtype(TensorSpec("w", "float32", (64, 128)), "int4-g64") == "int4-g64"
    assert stored_dtype(TensorSpec("b", "float32", (128,)), "int4") == "float32"  # vectors stay as computed
    assert stored_dtype(TensorSpec("i", "int64", (64, 128)), "int4") == "int64"
    assert group_of("int4") == 128 and group_of("int4-g32") == 32 and group_of("int8") is None
    with pytest.raises(ValueError, match="int4-g48"):
        RunConfig(storage_dtype="int4-g48")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,group", [((300, 256), 128), ((40, 8, 8), 64), ((3, 32), 32)])
def test_widening_in_place_equals_the_reference(dtype, shape, group):
    """The loader's maths: packed bytes at the tail of the slot region, widened front to back over several chunks
    (300 rows x 256 > one chunk; the last chunk partial), equal to ``dequantize_int4``."""
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    packed, scale = quantize_int4(w, group)
    spec = TensorSpec("w", str(dtype).removeprefix("torch."), shape)
    stored = stored_name(group)
    region = torch.full((spec.nbytes,), 0xAB, dtype=torch.uint8)
    region[spec.nbytes - packed.numel():] = packed.reshape(-1)
    tmp = torch.empty(tmp_elements(spec, stored), dtype=torch.float32)
    assert chunk_elements(spec, stored) % group == 0
    convert_in_place(region, spec, stored, scale.reshape(-1), tmp)
    assert torch.equal(region.view(dtype).view(shape), dequantize_int4(packed, scale, shape, dtype))


@pytest.mark.parametrize("name", ["toy", "t5"])
def test_int4_storage_loads_the_reference_values_within_a_named_snr(name, tmp_path):
    model, inputs = _toy() if name == "toy" else build_t5_encoder(0)
    ref = output(model, inputs)
    originals = {k: v.clone() for k, v in model.state_dict().items()}
    with blockrt.run(model, budget=BUDGET, store=tmp_path / "s", config=RunConfig(storage_dtype="int4")) as rt:
        got = loaded_weights(rt, model, inputs)
        out = output(model, inputs, rt)
        plan = rt.plan
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    held = {k: d for b in manifest["files"]["blocks"] for k, d in b["stored"].items()}
    quantised = 0
    for b in plan.blocks:
        for spec in b.tensors:
            w, back = originals[spec.key], got[spec.key]
            assert held[spec.key] == stored_dtype(spec, "int4")
            if held[spec.key] == "int4-g128":
                quantised += 1
                s = w.reshape(w.shape[0], -1, 128).abs().amax(2, keepdim=True) / INT4_QMAX
                assert ((back - w).reshape(s.shape[0], -1, 128).abs() <= s / 2 * (1 + EPS) + 1e-30).all(), spec.key
            elif held[spec.key] == spec.dtype:
                assert torch.equal(back, w), spec.key
    assert quantised >= len(plan.blocks)  # every block holds a matrix
    expected = (_toy() if name == "toy" else build_t5_encoder(0))[0]
    as_stored(expected, "int4")
    assert torch.equal(out, output(expected, inputs))  # the loader's widening is the reference maths
    assert snr_db(ref, out) >= INT4_MIN_SNR_DB[name]


def test_int4_block_files_are_an_eighth_and_group_sizes_are_separate_stores(tmp_path):
    sizes = {}
    for dtype in ("float32", "int4"):
        model, inputs = _toy()
        with blockrt.run(model, budget="256MB", store=tmp_path / dtype, config=RunConfig(storage_dtype=dtype)) as rt:
            first = output(model, inputs, rt)
            loaded = rt.profile.summary().bytes_loaded
        manifest = json.loads((tmp_path / dtype / "manifest.json").read_text())
        assert loaded == manifest["stored_bytes"]  # the profile counts the bytes read, as stored
        sizes[dtype] = block_files(tmp_path / dtype)
    ratio = sizes["int4"] / sizes["float32"]
    assert INT4_BYTES_RATIO[0] <= ratio <= INT4_BYTES_RATIO[1], ratio
    model, _ = _toy()
    with blockrt.run(model, budget="256MB", store=tmp_path / "int4", config=RunConfig(storage_dtype="int4-g128")) as rt:
        assert torch.equal(output(model, inputs, rt), first)  # "int4" is int4-g128: the same store, reused
    model, _ = _toy()
    with pytest.raises(StoreError, match="stored as int4-g128, wanted int4-g64"):
        blockrt.run(model, budget="256MB", store=tmp_path / "int4", config=RunConfig(storage_dtype="int4-g64"))
    with blockrt.meta_weights():
        skeleton, _ = _toy()
    with blockrt.run(skeleton, budget="256MB", weights=tmp_path / "int4") as rt:  # None: as the store holds it
        assert torch.equal(output(skeleton, inputs, rt), first)


def test_a_checkpoint_converts_to_int4_and_reads_back(tmp_path):
    from safetensors.torch import save_file

    model, inputs = _toy()
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    sd = model.state_dict()
    save_file({k: sd[k].contiguous() for k in partition(model).all_specs()}, str(ckpt / "model.safetensors"))
    expected = _toy()[0]
    as_stored(expected, "int4-g64")
    ref = output(expected, inputs)
    with blockrt.meta_weights():
        skeleton, _ = _toy()
    with blockrt.run(skeleton, budget="256MB", weights=ckpt, config=RunConfig(storage_dtype="int4-g64")) as rt:
        assert torch.equal(output(skeleton, inputs, rt), ref)
        key = next(t.key for t in rt.plan.blocks[0].tensors if rt._source.segment(t.key).dtype == "int4-g64")
        back = rt._source.read_tensor(key, dtype=torch.float32)  # a packed tensor read back whole
        assert torch.equal(back, dict(expected.named_parameters())[key].detach())
    assert math.isfinite(snr_db(output(_toy()[0], inputs), ref))
