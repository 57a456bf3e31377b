"""``RunConfig(packed_compute=True)`` (``blockrt/packed_compute.py``): int4/int8-stored ``nn.Linear`` weights stay
packed in their slot and run through PyTorch's weight-only kernels. The streamed output equals the same kernels
run on the same weights resident, the ledger holds the packed bytes exactly, the model is restored at close, and
bad combinations and stores are refused."""

from __future__ import annotations

import json
import types

import pytest
import torch
from blockrt.partitioners import partition
from blockrt.partitioners.plan import TensorSpec
from models import build_toy
from test_storage_dtypes import output
from torch import nn

import blockrt
from blockrt import BlockrtError, BudgetError, RunConfig, StoreError
from blockrt.int4 import kernel_name, quantize_int4
from blockrt.loader import ALIGN
from blockrt.packed_compute import PackedSpec, PackedWeight, packed_keys
from blockrt.packed_kernels import (
    int4_scales_and_zeros,
    int4_to_kernel,
    linear_int4,
    linear_int8,
)
from blockrt.quantize import quantize_int8

pytestmark = pytest.mark.timeout(120)

SMALL = "2MB"  # the toy's blocks stream through two slots (retention off)
CASES = [("int4-g32", None), ("int8", None), ("int4-g64", "bfloat16"), ("int8", "bfloat16")]


def _toy():
    return build_toy(0, dim=64, n_layers=4, n_heads=4)  # Linears (192|64|256, 64|256): the kernels take them all


def _group(storage: str) -> int | None:
    return int(storage.rsplit("g", 1)[1]) if storage.startswith("int4") else None


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {f"{n}.weight": m for n, m in model.named_modules() if type(m) is nn.Linear and n.startswith("layers.")}


def packed_reference(model: nn.Module, storage: str, dtype: str | None) -> None:
    """Make every block Linear of ``model`` compute as the packed kernel does on the weight quantised as blockrt
    stores it, resident (written here from ``packed_kernels`` alone)."""
    group = _group(storage)
    for m in _linears(model).values():
        w, bias = m.weight.detach(), m.bias
        dt = getattr(torch, dtype) if dtype else w.dtype
        if group is not None:
            packed, scales = quantize_int4(w, group)
            data, sz = int4_to_kernel(packed), int4_scales_and_zeros(scales, dt)

            def fwd(self, x, data=data, sz=sz, dt=dt, bias=bias):
                return linear_int4(x.to(dt), data, group, sz).to(x.dtype) + bias
        else:
            q, s = quantize_int8(w)
            s = s.to(dt)

            def fwd(self, x, q=q, s=s, dt=dt, bias=bias):
                return linear_int8(x.to(dt), q, s).to(x.dtype) + bias
        m.forward = types.MethodType(fwd, m)


@pytest.mark.parametrize("storage,dtype", CASES)
def test_streamed_output_equals_the_packed_kernels_on_resident_weights(storage, dtype):
    model, inputs = _toy()
    ref_model, _ = _toy()
    packed_reference(ref_model, storage, dtype)
    ref = output(ref_model, inputs)
    widened_ref = _toy()[0]
    cfg = RunConfig(storage_dtype=storage, packed_compute=True, packed_dtype=dtype, retention=False)
    with blockrt.run(model, budget=SMALL, config=cfg) as rt:
        assert packed_keys(model, rt.plan) == set(_linears(model))
        outs = [output(model, inputs, rt) for _ in range(3)]  # every pass streams every block
        assert rt.profile.summary().bytes_reused == 0
    assert all(torch.equal(o, ref) for o in outs)
    with blockrt.run(widened_ref, budget=SMALL, config=RunConfig(storage_dtype=storage, retention=False)) as rt:
        assert not torch.equal(output(widened_ref, inputs, rt), ref)  # the packed kernels did run


def test_retained_blocks_compute_packed_too():
    model, inputs = _toy()
    ref_model, _ = _toy()
    packed_reference(ref_model, "int4-g32", None)
    ref = output(ref_model, inputs)
    with blockrt.run(model, budget="64MB", config=RunConfig(storage_dtype="int4-g32", packed_compute=True)) as rt:
        outs = [output(model, inputs, rt) for _ in range(4)]
        assert rt.retention.retained  # a roomy budget: every block stays resident after the measuring passes
    assert all(torch.equal(o, ref) for o in outs)


def _slot_bytes(plan, packed: set[str], group: int, itemsize: int) -> tuple[int, int]:
    """(slot bytes of the largest block, staging bytes): packed int4 weights as N*K/2 bytes plus (K/G, N, 2)
    scales in the slot, their float32 (N, K/G) scales staged; every other tensor as computed; 64-byte aligned."""
    def aligned(n: int) -> int:
        return n + (-n % ALIGN)

    slot, staging = 0, 0
    for b in plan.blocks:
        end, scales = 0, 0
        for t in b.tensors:
            n, k = t.shape if t.key in packed else (0, 0)
            for size in ([n * k // 2, (k // group) * n * 2 * itemsize] if t.key in packed else [t.nbytes]):
                end = aligned(end) + size
            scales += aligned(4 * n * k // group) if t.key in packed else 0
        slot, staging = max(slot, end), max(staging, scales)
    return slot, staging


@pytest.mark.parametrize("dtype,itemsize", [(None, 4), ("bfloat16", 2)])
def test_the_ledger_holds_the_packed_bytes_and_a_budget_only_packed_fits(dtype, itemsize):
    model, inputs = _toy()
    plan = partition(model)
    slot, staging = _slot_bytes(plan, set(_linears(model)), 32, itemsize)
    cfg = RunConfig(storage_dtype="int4-g32", packed_compute=True, packed_dtype=dtype, retention=False)
    with blockrt.run(model, budget=SMALL, config=cfg) as rt:
        output(model, inputs, rt)
        held = rt.ledger.held()  # two slots (prefetch 1), one of them loading the next pass's block 0, and staging
        assert held["slots"] + held["in_flight"] == 2 * slot + staging
        assert rt.ledger.peak <= rt.budget
        packed_floor = rt.minimum_budget()
    with blockrt.run(model, budget=SMALL, config=RunConfig(storage_dtype="int4-g32", retention=False)) as rt:
        widened_floor = rt.minimum_budget()
    assert packed_floor < widened_floor
    between = (packed_floor + widened_floor) // 2
    with blockrt.run(model, budget=between, config=cfg) as rt:
        output(model, inputs, rt)
    with pytest.raises(BudgetError):
        blockrt.run(model, budget=between, config=RunConfig(storage_dtype="int4-g32", retention=False))


def test_the_model_is_restored_after_close():
    model, inputs = _toy()
    before = output(model, inputs)
    params = dict(model.named_parameters())
    values = {k: p.detach().clone() for k, p in params.items()}
    with blockrt.run(model, budget=SMALL, config=RunConfig(storage_dtype="int4-g32", packed_compute=True)) as rt:
        output(model, inputs, rt)
    after = dict(model.named_parameters())
    assert all(after[k] is params[k] and type(after[k]) is nn.Parameter for k in params)
    assert all(torch.equal(after[k].detach(), values[k]) for k in params)
    assert torch.equal(output(model, inputs), before)


def test_a_weight_held_by_an_autograd_graph_is_refused_and_the_model_restored():
    model, inputs = _toy()
    held = model(**inputs)  # gradients on: the graph holds the Linear weights
    cfg = RunConfig(storage_dtype="int8", packed_compute=True)
    with pytest.raises(BlockrtError, match="torch.no_grad"), blockrt.run(model, budget=SMALL, config=cfg) as rt:
        output(model, inputs, rt)
    assert all(type(m.weight) is nn.Parameter and not m.weight.is_meta for m in _linears(model).values())
    assert torch.equal(output(model, inputs), held.detach())


@pytest.mark.parametrize("kwargs,words", [
    ({"packed_compute": True}, ("expected storage_dtype", "found None", "fix")),
    ({"packed_compute": True, "storage_dtype": "float16"}, ("expected storage_dtype", "found 'float16'", "fix")),
    ({"packed_compute": True, "storage_dtype": {"layers.*": "bfloat16"}}, ("expected storage_dtype", "fix")),
    ({"packed_compute": True, "storage_dtype": "int8", "device": "cuda"}, ("expected device 'cpu'", "fix")),
    ({"packed_dtype": "bfloat16", "storage_dtype": "int8"}, ("expected packed_compute=True", "fix")),
    ({"packed_compute": True, "storage_dtype": "int8", "packed_dtype": "int8"}, ("expected None", "found 'int8'")),
    ({"packed_compute": 1, "storage_dtype": "int8"}, ("True or False",)),
])
def test_bad_combinations_raise_naming_expected_found_and_fix(kwargs, words):
    with pytest.raises(ValueError) as e:
        RunConfig(**kwargs)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_a_store_written_without_packed_compute_or_for_another_cpu_is_refused(tmp_path):
    model, inputs = _toy()
    with blockrt.run(model, budget=SMALL, store=tmp_path / "int4", config=RunConfig(storage_dtype="int4-g32")):
        pass
    with pytest.raises(StoreError, match=f"stored as int4-g32, wanted {kernel_name(32)}"):
        blockrt.run(model, budget=SMALL, store=tmp_path / "int4",
                    config=RunConfig(storage_dtype="int4-g32", packed_compute=True))
    with blockrt.run(model, budget=SMALL, store=tmp_path / "packed",
                     config=RunConfig(storage_dtype="int4-g32", packed_compute=True)) as rt:
        ref = output(model, inputs, rt)
    manifest = tmp_path / "packed" / "manifest.json"
    m = json.loads(manifest.read_text())
    for entry in m["files"]["blocks"]:
        entry["stored"] = {k: d.replace(kernel_name(32), "int4pack-othercpu-g32") for k, d in entry["stored"].items()}
    manifest.write_text(json.dumps(m))
    with blockrt.meta_weights():
        skeleton, _ = _toy()
    with pytest.raises(StoreError, match="int4pack-othercpu-g32"):
        blockrt.run(skeleton, budget=SMALL, weights=tmp_path / "packed", config=RunConfig(packed_compute=True,
                                                                                            storage_dtype="int4-g32"))
    with pytest.raises(StoreError, match="othercpu int4 kernel"):
        blockrt.run(skeleton, budget=SMALL, weights=tmp_path / "packed")  # as the store holds it: this CPU's check
    manifest.write_text(json.dumps(json.loads(manifest.read_text().replace("int4pack-othercpu-g32", kernel_name(32)))))
    with pytest.raises(StoreError, match="packed_compute=True"):
        blockrt.run(skeleton, budget=SMALL, weights=tmp_path / "packed")  # as the store holds it: widened: refused
    with blockrt.run(skeleton, budget=SMALL, weights=tmp_path / "packed",
                     config=RunConfig(storage_dtype="int4-g32", packed_compute=True)) as rt:
        assert torch.equal(output(skeleton, inputs, rt), ref)


def test_a_checkpoint_converts_to_the_packed_layout_once(tmp_path):
    from safetensors.torch import save_file

    model, inputs = _toy()
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    sd = model.state_dict()
    save_file({k: sd[k].contiguous() for k in partition(model).all_specs()}, str(ckpt / "model.safetensors"))
    ref_model, _ = _toy()
    packed_reference(ref_model, "int4-g64", "bfloat16")
    ref = output(ref_model, inputs)
    with blockrt.meta_weights():
        skeleton, _ = _toy()
    cfg = RunConfig(storage_dtype="int4-g64", packed_compute=True, packed_dtype="bfloat16", retention=False)
    with blockrt.run(skeleton, budget=SMALL, weights=ckpt, config=cfg) as rt:
        assert torch.equal(output(skeleton, inputs, rt), ref)
        key = next(iter(_linears(skeleton)))
        assert rt._source.segment(key).dtype == kernel_name(64)
        with pytest.raises(StoreError, match="packed_compute"):
            rt._source.read_tensor(key, dtype=torch.float32)  # the kernel's nibble order is never dequantised


def test_a_packed_weight_computes_only_through_linear():
    torch.manual_seed(0)
    w, x, bias = torch.randn(32, 64), torch.randn(3, 64), torch.randn(32)
    q, s = quantize_int8(w)
    spec = PackedSpec(TensorSpec("fc.weight", "float32", (32, 64)), None, "float32",
                      TensorSpec("fc.weight", "int8", (32, 64)), TensorSpec("fc.weight.scale", "float32", (32,)), 128)
    pw = spec.bind(q, s)
    assert pw.shape == (32, 64) and pw.dtype == torch.float32 and "int8" in repr(pw)
    assert torch.equal(nn.functional.linear(x, pw, bias), linear_int8(x, q, s) + bias)
    param = nn.Parameter(pw, requires_grad=False)  # what Binder swaps into the model
    assert isinstance(param, PackedWeight) and isinstance(param, nn.Parameter)
    for use in (lambda: x @ pw.T, lambda: pw + 1, lambda: pw.sum()):
        with pytest.raises(BlockrtError, match="pin="):
            use()
