"""Storage dtypes of blocks: float32 storage is bit-identical to today, float16/bfloat16 are exact casts, int8
weight-only stays within half a step per element and a named SNR of float32 at a quarter of the bytes;
per-block choices, store reuse and refusal across dtypes, converted checkpoints, the ledger with the
loader's staging, and corruption of an int8 file."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import blockrt
import blockrt.store
from blockrt import BudgetError, LoadError, RunConfig, StoreError
from blockrt.binding import Binder
from blockrt.quantize import INT8_MAX, dequantize_int8, from_storage, quantize_int8, stored_dtype, to_storage
from models import build_t5_encoder, build_toy
from blockrt.partitioners import partition

pytestmark = pytest.mark.timeout(120)

BUDGET = "64MB"
INT8_MIN_SNR_DB = {"toy": 40.0, "t5": 30.0}  # measured 50.5 and 37.3 dB: random weights, per-channel int8
HALF_MIN_SNR_DB = 40.0  # float16/bfloat16 storage: measured 59-78 dB
INT8_BYTES_RATIO = (0.24, 0.30)  # int8 block files / float32 ones, where matrices dominate
INT4_QUICK_MIN_SNR_DB = 10.0  # the storage benchmark's --quick int4 rows (random weights; measured 12.0 dB at groups of 64 on the tiny T5)
EPS = 1e-4  # relative slack on the int8 bound: float32 rounding of w / scale and q * scale (up to ~127 ulp)

BUILDERS = {"toy": build_toy, "t5": build_t5_encoder}


def output(model, inputs, rt=None) -> torch.Tensor:
    with torch.no_grad():
        out = (rt or model)(**inputs)
    return (out if isinstance(out, torch.Tensor) else out.last_hidden_state).clone()


def snr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    noise = ((out - ref) ** 2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10((ref ** 2).sum().item() / noise)


def as_stored(model, storage: dict[str, str | None] | str) -> None:
    """Give ``model``'s block weights the values storage turns them into (the loader's exact maths)."""
    plan = partition(model)
    binder = Binder(model)
    with torch.no_grad():
        for b in plan.blocks:
            want = storage if isinstance(storage, str) else storage.get(b.name)
            for spec in b.tensors:
                t = binder.tensor(spec.key)
                parts = to_storage(spec.key, t, stored_dtype(spec, want))
                t.copy_(from_storage(parts[spec.key], parts.get(spec.key + ".scale"), t.dtype))


def loaded_weights(rt, model, inputs) -> dict[str, torch.Tensor]:
    """Every block tensor as the loader put it in the slot, captured while its block is bound."""
    binder, seen = Binder(model), {}
    hooks = []
    for b in rt.plan.blocks:
        def grab(mod, args, b=b):
            seen.update({t.key: binder.tensor(t.key).detach().clone() for t in b.tensors})
        hooks.append(model.get_submodule(b.modules[0]).register_forward_pre_hook(grab))  # after blockrt's own
    try:
        output(model, inputs, rt)
    finally:
        for h in hooks:
            h.remove()
    return seen


def block_files(store: Path) -> int:
    return sum(p.stat().st_size for p in (store / "blocks").glob("*.safetensors"))


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


# -- the dtypes ------------------------------------------------------------------------------------------


def test_float32_storage_is_bit_identical(tmp_path):
    model, inputs = build_toy(0)
    ref = output(model, inputs)
    with blockrt.run(model, budget=BUDGET, store=tmp_path / "s", config=RunConfig(storage_dtype="float32")) as rt:
        assert torch.equal(output(model, inputs, rt), ref)
    plain = build_toy(0)[0]
    with blockrt.run(plain, budget=BUDGET, store=tmp_path / "plain") as rt:
        output(plain, inputs, rt)
    ours, plain_m = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("s", "plain"))
    for a, b in zip(ours["files"]["blocks"], plain_m["files"]["blocks"]):
        assert a["crc32"] == b["crc32"] and a["stored"] == b["stored"]  # the same data as with no storage dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_storage_is_an_exact_cast(dtype, tmp_path):
    model, inputs = build_toy(0)
    ref = output(model, inputs)
    originals = {k: v.clone() for k, v in model.state_dict().items()}
    name = str(dtype).removeprefix("torch.")
    with blockrt.run(model, budget=BUDGET, store=tmp_path / "s", config=RunConfig(storage_dtype=name)) as rt:
        got = loaded_weights(rt, model, inputs)
        out = output(model, inputs, rt)
    assert set(got) == {k for b in rt.plan.blocks for k in b.keys}
    for k, w in got.items():
        assert w.dtype == torch.float32 and torch.equal(w, originals[k].to(dtype).to(torch.float32)), k
    stored = load_file(tmp_path / "s" / "blocks" / "0000.safetensors")
    assert {t.dtype for t in stored.values()} == {dtype}
    expected = build_toy(0)[0]
    as_stored(expected, name)
    assert torch.equal(out, output(expected, inputs))  # the same maths as a model holding the cast weights
    assert snr_db(ref, out) >= HALF_MIN_SNR_DB


def test_int8_round_trip_is_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 40, generator=g) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different scales
    w[5] = 0.0  # an all-zero row
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (48,)
    assert int(q.abs().max()) <= INT8_MAX and scale[5] == 0 and not q[5].any()
    back = dequantize_int8(q, scale)
    err = (back - w).abs()
    assert (err <= scale[:, None] / 2 * (1 + EPS) + 1e-30).all()
    assert torch.equal(back[5], torch.zeros(40))
    conv = torch.randn(6, 3, 2, 2, generator=g)  # per output channel over the other dims
    q4, s4 = quantize_int8(conv)
    assert q4.shape == conv.shape and s4.shape == (6,)
    assert ((dequantize_int8(q4, s4) - conv).abs() <= s4[:, None, None, None] / 2 * (1 + EPS)).all()
    with pytest.raises(ValueError, match="inf or nan"):
        quantize_int8(torch.tensor([[1.0, float("nan")]] * 2))


@pytest.mark.parametrize("name", ["toy", "t5"])
def test_int8_storage_loads_within_the_bound_and_snr(name, tmp_path):
    model, inputs = BUILDERS[name](0)
    ref = output(model, inputs)
    originals = {k: v.clone() for k, v in model.state_dict().items()}
    with blockrt.run(model, budget=BUDGET, store=tmp_path / "s", config=RunConfig(storage_dtype="int8")) as rt:
        got = loaded_weights(rt, model, inputs)
        out = output(model, inputs, rt)
        plan = rt.plan
    quantised = 0
    for b in plan.blocks:
        for spec in b.tensors:
            w, back = originals[spec.key], got[spec.key]
            if stored_dtype(spec, "int8") == "int8":
                quantised += 1
                step = w.reshape(w.shape[0], -1).abs().amax(1) / INT8_MAX
                err = (back - w).reshape(w.shape[0], -1).abs()
                assert (err <= step[:, None] / 2 * (1 + EPS) + 1e-30).all(), spec.key
            else:  # biases, norms, small tensors: as computed, exactly
                assert torch.equal(back, w), spec.key
    assert quantised >= 4 * len(plan.blocks)
    expected = BUILDERS[name](0)[0]
    as_stored(expected, "int8")
    assert torch.equal(out, output(expected, inputs))  # the loader's dequantisation is the reference maths
    assert snr_db(ref, out) >= INT8_MIN_SNR_DB[name]


def test_int8_block_files_are_a_quarter_of_float32(tmp_path):
    sizes = {}
    for dtype in ("float32", "int8"):
        model, inputs = build_toy(0, dim=256, n_layers=2, n_heads=4)
        with blockrt.run(model, budget="256MB", store=tmp_path / dtype, config=RunConfig(storage_dtype=dtype)) as rt:
            output(model, inputs, rt)
            summary = rt.profile.summary()
            loaded = summary.bytes_loaded
        assert summary.bytes_materialised == rt.plan.block_bytes  # one pass: every block once, as computed
        assert ("bytes_materialised" in str(summary)) == (dtype == "int8")  # shown where it differs
        manifest = json.loads((tmp_path / dtype / "manifest.json").read_text())
        sizes[dtype] = (block_files(tmp_path / dtype), loaded, manifest["stored_bytes"])
    ratio = sizes["int8"][0] / sizes["float32"][0]
    assert INT8_BYTES_RATIO[0] <= ratio <= INT8_BYTES_RATIO[1], ratio
    assert sizes["int8"][1] == sizes["int8"][2]  # the profile counts the bytes read, as stored
    assert sizes["float32"][1] == sizes["float32"][2]


def test_a_dict_chooses_per_block(tmp_path):
    storage = {"layers.[01]": "int8", "layers.2": "float16", "layers.*": "bfloat16", "layers.3": "float32"}
    model, inputs = build_toy(0)
    with blockrt.run(model, budget=BUDGET, store=tmp_path / "s", config=RunConfig(storage_dtype=storage)) as rt:
        out = output(model, inputs, rt)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    asked = [b["storage_dtype"] for b in manifest["files"]["blocks"]]
    assert asked == ["int8", "int8", "float16"] + ["bfloat16"] * 5  # first match wins: layers.3 is bfloat16
    block0 = manifest["files"]["blocks"][0]["stored"]
    assert block0["layers.0.mlp.0.weight"] == "int8" and block0["layers.0.ln1.weight"] == "float32"
    expected = build_toy(0)[0]
    as_stored(expected, {f"layers.{i}": d for i, d in enumerate(asked)})
    assert torch.equal(out, output(expected, inputs))


# -- stores across dtypes --------------------------------------------------------------------------------


def test_stores_are_reused_for_the_same_dtype_and_refused_for_another(tmp_path):
    store = tmp_path / "s"
    model, inputs = build_toy(0)
    with blockrt.run(model, budget=BUDGET, store=store, config=RunConfig(storage_dtype="int8")) as rt:
        first = output(model, inputs, rt)
    before = snapshot(store)
    model, _ = build_toy(0)
    with blockrt.run(model, budget=BUDGET, config=RunConfig(storage_dtype="int8", store_path=str(store))) as rt:
        assert torch.equal(output(model, inputs, rt), first)
    assert snapshot(store) == before  # reused, untouched
    for other in (None, "float16"):
        model, _ = build_toy(0)
        with pytest.raises(StoreError, match="other storage dtypes") as e:
            blockrt.run(model, budget=BUDGET, store=store, config=RunConfig(storage_dtype=other))
        assert "layers.0" in str(e.value) and "fix:" in str(e.value)
    fp32 = tmp_path / "fp32"
    model, _ = build_toy(0)
    blockrt.run(model, budget=BUDGET, store=fp32).close()
    model, _ = build_toy(0)
    with pytest.raises(StoreError, match="stored as float32, wanted int8"):
        blockrt.run(model, budget=BUDGET, store=fp32, config=RunConfig(storage_dtype="int8"))
    assert snapshot(store) == before
    # streamed as weights=: None takes what the store holds; another dtype is refused
    with blockrt.meta_weights():
        skeleton, _ = build_toy(0)
    with blockrt.run(skeleton, budget=BUDGET, weights=store) as rt:
        assert torch.equal(output(skeleton, inputs, rt), first)
    with blockrt.meta_weights():
        skeleton, _ = build_toy(0)
    with pytest.raises(StoreError, match="other storage dtypes"):
        blockrt.run(skeleton, budget=BUDGET, weights=store, config=RunConfig(storage_dtype="bfloat16"))


def test_a_version_1_store_still_opens(tmp_path):
    store = tmp_path / "s"
    model, inputs = build_toy(0)
    with blockrt.run(model, budget=BUDGET, store=store) as rt:
        ref = output(model, inputs, rt)
    path = store / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["format_version"] = 1  # what blockrt wrote before storage dtypes
    for key in ("origin", "stored_bytes"):
        del manifest[key]
    for b in manifest["files"]["blocks"]:
        for key in ("stored_bytes", "storage_dtype", "stored"):
            del b[key]
    path.write_text(json.dumps(manifest))
    model, _ = build_toy(0)
    with blockrt.run(model, budget=BUDGET, store=store) as rt:
        assert torch.equal(output(model, inputs, rt), ref)
    model, _ = build_toy(0)
    with pytest.raises(StoreError, match="other storage dtypes"):
        blockrt.run(model, budget=BUDGET, store=store, config=RunConfig(storage_dtype="int8"))


def test_crc_detects_corruption_in_an_int8_file(tmp_path):
    store = tmp_path / "s"
    model, inputs = build_toy(0)
    blockrt.run(model, budget=BUDGET, store=store, config=RunConfig(storage_dtype="int8")).close()
    path = store / "blocks" / "0002.safetensors"
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    begin = 8 + n + header["layers.2.mlp.0.weight"]["data_offsets"][0]  # an int8 matrix
    assert header["layers.2.mlp.0.weight"]["dtype"] == "I8"
    data = bytearray(path.read_bytes())
    data[begin + 10] ^= 0x40
    path.write_bytes(bytes(data))
    with blockrt.meta_weights():
        skeleton, _ = build_toy(0)
    with blockrt.run(skeleton, budget=BUDGET, weights=store) as rt:
        with pytest.raises(LoadError, match=r"layers\.2.*crc32"):
            output(skeleton, inputs, rt)


# -- the ledger ------------------------------------------------------------------------------------------


def test_the_ledger_holds_the_staging_and_stays_under_the_budget(tmp_path):
    model, inputs = build_toy(0)
    probe = blockrt.run(model, budget=BUDGET, config=RunConfig(storage_dtype="int8", retention=False))
    parts = probe._retention.floor()
    staging, slots = parts.staging_bytes, parts.slots * parts.slot_bytes
    floor = probe.minimum_budget()
    held = probe.ledger.held()
    probe.close()
    assert staging > 0 and floor == probe.plan.pinned_bytes + slots + staging
    assert held["slots"] + held["in_flight"] == slots + staging  # slots being filled count as in flight
    with pytest.raises(BudgetError, match="staging"):
        blockrt.run(build_toy(0)[0], budget=floor - 1, config=RunConfig(storage_dtype="int8"))
    budget = floor + 600_000  # room for the toy's activations, not for retaining every block
    model, _ = build_toy(0)
    with blockrt.run(model, budget=budget, config=RunConfig(storage_dtype="int8")) as rt:
        for _ in range(4):
            output(model, inputs, rt)
        summary = rt.profile.summary()
    assert 0 < summary.peak_ledger_bytes <= budget
    assert rt.ledger.held()["slots"] == 0  # the slots and the staging are returned on close


# -- checkpoints -----------------------------------------------------------------------------------------


def write_checkpoint(directory: Path, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    model, _ = build_toy(seed)
    directory.mkdir(parents=True, exist_ok=True)
    owned = partition(model).all_specs()
    save_file({k: v.to(dtype).contiguous() for k, v in model.state_dict().items() if k in owned},
              directory / "model.safetensors")
    return directory


def run_skeleton(weights: Path, inputs, config: RunConfig | None = None) -> torch.Tensor:
    with blockrt.meta_weights():
        skeleton, _ = build_toy(0)
    with blockrt.run(skeleton, budget=BUDGET, weights=weights, config=config) as rt:
        return output(skeleton, inputs, rt)


def test_a_checkpoint_is_converted_once_and_cached(tmp_path, blockrt_cache):
    ckpt = write_checkpoint(tmp_path / "ckpt")
    _, inputs = build_toy(0)
    expected = build_toy(0)[0]
    as_stored(expected, "int8")
    ref = output(expected, inputs)
    assert torch.equal(run_skeleton(ckpt, inputs, RunConfig(storage_dtype="int8")), ref)
    caches = list((blockrt_cache / "stores").iterdir())
    assert len(caches) == 1 and not [p for p in caches if ".tmp-" in p.name]
    before = snapshot(caches[0])
    assert torch.equal(run_skeleton(ckpt, inputs, RunConfig(storage_dtype="int8")), ref)
    assert snapshot(caches[0]) == before and list((blockrt_cache / "stores").iterdir()) == caches  # reused
    run_skeleton(ckpt, inputs, RunConfig(storage_dtype="float16"))
    assert len(list((blockrt_cache / "stores").iterdir())) == 2  # another storage dtype: another store
    plain = build_toy(0)
    assert torch.equal(run_skeleton(ckpt, inputs), output(*plain))  # None: streamed in place, nothing converted
    assert len(list((blockrt_cache / "stores").iterdir())) == 2
    own = tmp_path / "mine"
    assert torch.equal(run_skeleton(ckpt, inputs, RunConfig(storage_dtype="int8", store_path=str(own))), ref)
    assert (own / "manifest.json").exists()
    assert sorted(p.name for p in ckpt.iterdir()) == ["model.safetensors"]  # nothing beside it: a hub snapshot
    # may be read-only or shared; the converted stores are in blockrt's user cache


def test_convert_store_ahead_of_time(tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt")
    with blockrt.meta_weights():
        skeleton, inputs = build_toy(0)
    out = blockrt.convert_store(skeleton, ckpt, tmp_path / "t5-int8", {"layers.[0-3]": "int8"})
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["origin"]["kind"] == "checkpoint"
    assert [b["storage_dtype"] for b in manifest["files"]["blocks"]] == ["int8"] * 4 + [None] * 4
    expected = build_toy(0)[0]
    as_stored(expected, {f"layers.{i}": "int8" for i in range(4)})
    assert torch.equal(run_skeleton(out, inputs), output(expected, inputs))
    assert blockrt.convert_store(partition(expected), ckpt, out, {"layers.[0-3]": "int8"}) == out  # reused
    with pytest.raises(StoreError, match="other storage dtypes"):
        blockrt.convert_store(skeleton, ckpt, out, "int8")
    write_checkpoint(tmp_path / "ckpt", seed=1)  # the checkpoint changed: the store is of other weights
    with pytest.raises(StoreError, match="other weights"):
        blockrt.convert_store(skeleton, ckpt, out, {"layers.[0-3]": "int8"})


def test_a_bfloat16_checkpoint_streams_into_a_float32_model(tmp_path, blockrt_cache):
    ckpt = write_checkpoint(tmp_path / "ckpt", torch.bfloat16)
    expected, inputs = build_toy(0)
    with torch.no_grad():
        for p in expected.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    assert torch.equal(run_skeleton(ckpt, inputs), output(expected, inputs))  # widened by the loader
    assert not (ckpt / ".blockrt").exists() and not blockrt_cache.exists()  # widened on load: nothing converted


def test_an_unwritable_checkpoint_directory_needs_a_store_path(tmp_path, monkeypatch):
    ckpt = write_checkpoint(tmp_path / "ckpt")
    _, inputs = build_toy(0)
    monkeypatch.setattr(blockrt.store.os, "access", lambda path, mode: False)  # tests may run as root
    with pytest.raises(StoreError, match=r"not writable.*store_path"):
        run_skeleton(ckpt, inputs, RunConfig(storage_dtype="int8"))
    run_skeleton(ckpt, inputs, RunConfig(storage_dtype="int8", store_path=str(tmp_path / "elsewhere")))
    assert (tmp_path / "elsewhere" / "manifest.json").exists()


# -- bad input -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["int3", "int4-g48", "fp16", {}, {"layers.*": "half"}, {"": "int8"}, 8])
def test_an_invalid_storage_dtype_says_what_is_accepted(bad):
    with pytest.raises(ValueError, match="storage_dtype") as e:
        RunConfig(storage_dtype=bad)
    assert "float16" in str(e.value) and "int8" in str(e.value) and "glob" in str(e.value)


def test_storage_wider_than_the_model_is_refused(tmp_path):
    model, inputs = build_toy(0)
    model = model.half()
    with pytest.raises(ValueError, match="wider than"):
        blockrt.run(model, budget=BUDGET, config=RunConfig(storage_dtype="float32"))
    assert not any(p.is_meta for p in model.parameters())
    with blockrt.run(model, budget=BUDGET, store=tmp_path / "s", config=RunConfig(storage_dtype="int8")) as rt:
        rt(**inputs)
    stored = load_file(tmp_path / "s" / "blocks" / "0000.safetensors")
    assert stored["layers.0.ln1.weight"].dtype == torch.float16  # 1-D tensors stay in the compute dtype
    assert stored["layers.0.mlp.0.weight"].dtype == torch.int8
    assert os.path.exists(tmp_path / "s" / "manifest.json")


# -- the benchmark ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_storage_quality_benchmark_runs(tmp_path, capsys):
    from benchmark_modules import load_benchmark

    main = load_benchmark("storage_quality").main
    assert main(["--quick", "--passes", "2", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {(r["model"], r["storage_dtype"]) for r in rows} >= {("t5", "int8"), ("stdit3", "int8")}
    for r in rows:
        assert r["peak_ledger_bytes"] <= r["budget"]
        if r["storage_dtype"] == "float32":
            assert r["snr_db"] is None and r["max_abs_err"] == 0  # identical: infinite SNR, written as null
        elif r["storage_dtype"].startswith("int4"):  # the tiny models' rows mostly do not split into groups of 128
            assert r["snr_db"] > INT4_QUICK_MIN_SNR_DB and r["bytes_ratio"] < 0.3
        else:
            assert r["snr_db"] > 30 and r["bytes_ratio"] < 0.55
        assert r["read_gbps"] > 0 and (r["storage_dtype"] == "float32" or r["widen_gbps"] > 0)
    assert not (tmp_path / "work").exists()  # checkpoints and stores removed
    assert "int8" in capsys.readouterr().out
