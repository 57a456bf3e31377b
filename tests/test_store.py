"""The block store and checkpoint sources when things go wrong: every failure is a clear error that names what
was expected, what was found and the fix; nothing half-written is left behind; nothing hangs or leaks."""

from __future__ import annotations

import json
import os
import random
import struct
import time
import zlib
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import blockrt
import blockrt.loader
import blockrt.store
from blockrt import LoadError, PartitionError, Plan, RestoreError, RunConfig, StoreError
from models import build_toy
from blockrt.partitioners import partition

pytestmark = pytest.mark.timeout(60)

BUDGET = "64MB"  # the toy model is ~2 MB: room for any prefetch depth
FAIL_FAST_S = 10.0  # an error must surface within this long (a hang would hit the 60 s timeout)


def reference(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).clone()


def snapshot(root: Path) -> dict[str, tuple[int, int, int, bytes]]:
    """Every file under ``root``: (inode, size, mtime_ns, crc32 of the bytes) by relative path."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(root))] = (st.st_ino, st.st_size, st.st_mtime_ns, zlib.crc32(p.read_bytes()))
    return out


def leftovers(parent: Path) -> list[str]:
    """Temporary directories a store write left next to its final path."""
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name]


def write_store(tmp_path: Path, seed: int = 0, config: RunConfig | None = None) -> Path:
    """Spill the toy model to a store at ``tmp_path / "s"`` with one full run, and return the store path."""
    store = tmp_path / "s"
    model, inputs = build_toy(seed)
    ref = reference(model, inputs)
    with blockrt.run(model, budget=BUDGET, store=store, config=config) as rt:
        assert torch.equal(rt(**inputs), ref)
    return store


def data_start(path: Path) -> int:
    """Offset of the first data byte of a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return 8 + n


def checkpoint_tensors(model) -> dict[str, torch.Tensor]:
    """The model's owned tensors (tied ones once), as a checkpoint holds them."""
    sd = model.state_dict()
    return {k: sd[k].contiguous() for k in partition(model).all_specs()}


def skeleton():
    with blockrt.meta_weights():
        model, _ = build_toy()
    return model


# -- the store -------------------------------------------------------------------------------------------


def test_store_is_reused_for_the_same_weights(tmp_path):
    store = write_store(tmp_path)
    assert store.is_dir() and not leftovers(tmp_path)  # a store the user named outlives the runtime
    before = snapshot(store)
    model, inputs = build_toy(0)  # the same weights, built again
    ref = reference(model, inputs)
    with blockrt.run(model, budget=BUDGET, store=store) as rt:
        for _ in range(2):
            assert torch.equal(rt(**inputs), ref)
    assert snapshot(store) == before  # reused: no file rewritten, replaced or touched


def test_a_store_streams_onto_a_meta_skeleton(tmp_path):
    store = write_store(tmp_path)
    model, inputs = build_toy(0)
    ref = reference(model, inputs)
    with blockrt.run(skeleton(), budget=BUDGET, weights=store) as rt:
        assert torch.equal(rt(**inputs), ref)


def test_a_store_of_other_weights_is_refused_and_left_alone(tmp_path):
    store = write_store(tmp_path, seed=0)
    before = snapshot(store)
    model, _ = build_toy(1)  # same architecture, other weights
    with pytest.raises(StoreError, match="other weights") as e:
        blockrt.run(model, budget=BUDGET, store=store)
    msg = str(e.value)
    assert str(store) in msg and "fix:" in msg and "different store path" in msg and "delete" in msg
    assert snapshot(store) == before and not leftovers(tmp_path)
    assert not any(p.is_meta for p in model.parameters())  # the model was not touched either


def test_a_store_of_another_plan_is_refused(tmp_path):
    store = write_store(tmp_path)
    before = snapshot(store)
    model, _ = build_toy(0)
    two_layers = 2 * partition(model).largest_block().nbytes
    with pytest.raises(StoreError, match="another plan") as e:
        blockrt.run(model, budget=BUDGET, store=store, config=RunConfig(target_block_bytes=two_layers))
    msg = str(e.value)
    assert "8 blocks vs 4 now" in msg and "fix:" in msg
    assert snapshot(store) == before


def test_a_directory_that_is_not_a_store_is_refused(tmp_path):
    store = tmp_path / "s"
    store.mkdir()
    (store / "notes.txt").write_text("mine")
    model, _ = build_toy()
    with pytest.raises(StoreError, match="not a blockrt store") as e:
        blockrt.run(model, budget=BUDGET, store=store)
    assert "manifest.json" in str(e.value) and "fix:" in str(e.value)
    assert [p.name for p in store.iterdir()] == ["notes.txt"] and (store / "notes.txt").read_text() == "mine"


def test_a_truncated_block_file_is_refused_at_run(tmp_path):
    store = write_store(tmp_path)
    path = store / "blocks" / "0001.safetensors"
    size = path.stat().st_size
    os.truncate(path, size - 7)
    model, _ = build_toy()
    with pytest.raises(StoreError) as e:
        blockrt.run(model, budget=BUDGET, store=store)
    msg = str(e.value)
    assert "blocks/0001.safetensors" in msg and f"should have {size} bytes, found {size - 7} bytes" in msg
    assert "delete the store" in msg


def _flip_a_data_byte(store: Path) -> Path:
    path = store / "blocks" / "0001.safetensors"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(data_start(path) + 103)  # the sign/exponent byte of the 26th float32
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x7F]))
    assert path.stat().st_size == size
    return path


def test_a_checksum_mismatch_is_a_load_error_and_the_runtime_still_closes(tmp_path):
    store = write_store(tmp_path)
    path = _flip_a_data_byte(store)
    model, inputs = build_toy()
    rt = blockrt.run(model, budget=BUDGET, store=store)  # default RunConfig(verify="first")
    thread = rt._loader._thread
    for _ in range(2):  # a failed block is verified again next time, never used
        t0 = time.monotonic()
        with pytest.raises(LoadError, match="crc32") as e:
            rt(**inputs)
        assert time.monotonic() - t0 < FAIL_FAST_S
        assert "'layers.1'" in str(e.value) and str(path) in str(e.value)
    rt.close()
    assert not thread.is_alive()


def test_a_checksum_mismatch_passes_with_verify_never(tmp_path):
    store = write_store(tmp_path)
    _flip_a_data_byte(store)
    model, inputs = build_toy()
    ref = reference(model, inputs)
    with blockrt.run(model, budget=BUDGET, store=store, config=RunConfig(verify="never")) as rt:
        out = rt(**inputs)
    assert not torch.equal(out, ref)  # it really computed with the flipped byte


def test_a_crash_while_writing_leaves_nothing_behind(tmp_path, monkeypatch):
    real = blockrt.store.write_file
    calls = []

    def write_file(path, *args, **kwargs):  # pinned, block 0, block 1 succeed; block 2 fails
        calls.append(Path(path).name)
        if len(calls) == 4:
            raise OSError(28, "No space left on device")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(blockrt.store, "write_file", write_file)
    store = tmp_path / "s"
    model, inputs = build_toy()
    ref = reference(model, inputs)
    with pytest.raises(OSError, match="No space left"):
        blockrt.run(model, budget=BUDGET, store=store)
    assert calls == ["pinned.safetensors", "0000.safetensors", "0001.safetensors", "0002.safetensors"]
    assert not store.exists() and os.listdir(tmp_path) == []
    assert not any(p.is_meta for p in model.parameters())
    monkeypatch.setattr(blockrt.store, "write_file", real)  # the disk has room again: a retry just works
    with blockrt.run(model, budget=BUDGET, store=store) as rt:
        assert torch.equal(rt(**inputs), ref)
    assert (store / "manifest.json").exists() and not leftovers(tmp_path)


# -- checkpoint sources ----------------------------------------------------------------------------------


def test_a_missing_shard_is_named(tmp_path):
    model, _ = build_toy()
    tensors = checkpoint_tensors(model)
    keys = sorted(tensors)
    weight_map = {}
    for s, part in enumerate((keys[0::2], keys[1::2])):
        name = f"model-{s + 1:05d}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, tmp_path / name)
        weight_map.update(dict.fromkeys(part, name))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(StoreError, match=r"model-00002-of-00002\.safetensors.*do not exist") as e:
        blockrt.run(skeleton(), budget=BUDGET, weights=tmp_path)
    assert "model-00001-of-00002" not in str(e.value) and "fix:" in str(e.value)


def test_checkpoint_mismatches_are_reported_together(tmp_path):
    model, _ = build_toy()
    tensors = checkpoint_tensors(model)
    tensors["layers.3.mlp.0.weight"] = torch.zeros(7, 64)  # expected [256, 64]
    del tensors["layers.5.ln2.bias"]
    tensors["layers.9.extra"] = torch.zeros(2)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(StoreError) as e:
        blockrt.run(skeleton(), budget=BUDGET, weights=tmp_path)
    msg = str(e.value)
    assert "ToyTransformer" in msg
    assert "missing keys (1): layers.5.ln2.bias" in msg
    assert "wrong shape or dtype (1): layers.3.mlp.0.weight: expected float32[256, 64], found float32[7, 64]" in msg
    assert "unexpected keys (1): layers.9.extra" in msg
    assert "strict_keys=False" in msg


def test_unexpected_keys_are_allowed_when_not_strict(tmp_path):
    model, inputs = build_toy()
    ref = reference(model, inputs)
    tensors = {**checkpoint_tensors(model), "optimizer.step": torch.tensor([7])}
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(StoreError, match=r"unexpected keys \(1\): optimizer\.step"):
        blockrt.run(skeleton(), budget=BUDGET, weights=tmp_path)
    with blockrt.run(skeleton(), budget=BUDGET, weights=tmp_path, config=RunConfig(strict_keys=False)) as rt:
        assert torch.equal(rt(**inputs), ref)


def test_a_directory_without_a_checkpoint(tmp_path):
    (tmp_path / "README.md").write_text("weights go here")
    with pytest.raises(StoreError, match=r"expected model\.safetensors.*found none"):
        blockrt.run(skeleton(), budget=BUDGET, weights=tmp_path)


def _with_header(header: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + b"\0" * 16


@pytest.mark.parametrize("content, expected", [
    (random.Random(0).randbytes(4096), "header length .* does not fit a file of 4096 bytes.*not safetensors"),
    (struct.pack("<Q", 1000) + b'{"a":', "header length 1000 does not fit a file of 13 bytes"),
    (b"\x01\x02", "found 2 bytes \\(no header\\)"),
    (_with_header(b"{not json"), "not valid JSON"),
    (_with_header(b"[1,2]"), "expected a safetensors header \\(a JSON object\\), found list"),
    (_with_header(b'{"a": 5}'), "tensor 'a' has dtype None"),
    (_with_header(b'{"a": {"dtype": "F32", "x": 1}}'), "tensor 'a' has a malformed entry"),
    (_with_header(b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 12]}}'),
     r"tensor 'a' of dtype F32 and shape \[2\] needs 8 bytes.*\[0, 12\]"),
], ids=["random-bytes", "header-past-eof", "tiny", "bad-json", "json-list", "entry-not-object", "no-offsets",
        "offsets-disagree-with-shape"])
def test_a_file_that_is_not_safetensors(tmp_path, content, expected):
    (tmp_path / "model.safetensors").write_bytes(content)
    with pytest.raises(StoreError, match=expected) as e:
        blockrt.run(skeleton(), budget=BUDGET, weights=tmp_path / "model.safetensors")
    assert str(tmp_path / "model.safetensors") in str(e.value)


# -- the loader, the partitioner, resources, the manifest -------------------------------------------------


@pytest.mark.parametrize("how", ["file-deleted", "read-error"])
def test_a_loader_failure_surfaces_in_the_callers_thread(tmp_path, monkeypatch, how):
    store = write_store(tmp_path)
    path = store / "blocks" / "0002.safetensors"
    model, inputs = build_toy()
    rt = blockrt.run(model, budget=BUDGET, store=store)
    if how == "file-deleted":
        path.unlink()
    else:
        real = blockrt.loader.read_exactly

        def read_exactly(fd, views, offset, p):
            if p == str(path):
                raise OSError(5, "Input/output error")
            return real(fd, views, offset, p)

        monkeypatch.setattr(blockrt.loader, "read_exactly", read_exactly)
    thread = rt._loader._thread
    t0 = time.monotonic()
    with pytest.raises(LoadError) as e:
        rt(**inputs)
    assert time.monotonic() - t0 < FAIL_FAST_S
    msg = str(e.value)
    assert "'layers.2'" in msg and str(path) in msg
    assert ("FileNotFoundError" if how == "file-deleted" else "Input/output error") in msg
    assert thread.is_alive()  # one failed block does not kill the loader
    if how == "file-deleted":  # the model cannot get that block back from the store: close says so, and closes
        with pytest.raises(RestoreError, match=r"layers\.2\..*FileNotFoundError"):
            rt.close()
    else:
        rt.close()
    assert not thread.is_alive()


def test_a_model_the_partitioner_cannot_split():
    model = nn.Sequential(nn.ReLU(), nn.Dropout())  # no weights at all
    with pytest.raises(PartitionError, match="found nothing to stream in Sequential") as e:
        blockrt.run(model, budget=BUDGET)
    assert "register a partitioner" in str(e.value)


def test_no_file_handles_leak(tmp_path):
    proc = psutil.Process()
    model, inputs = build_toy()
    with blockrt.run(model, budget=BUDGET) as rt:  # warm up: lazily opened library handles stay open
        rt(**inputs)
    fds = proc.num_fds()

    store = write_store(tmp_path)  # a full run/close cycle with a user store
    assert proc.num_fds() == fds

    model, inputs = build_toy()
    with blockrt.run(model, budget=BUDGET, store=store) as rt:  # reuse
        rt(**inputs)
    assert proc.num_fds() == fds

    (store / "blocks" / "0003.safetensors").unlink()  # a damaged store, refused at open
    model, inputs = build_toy()
    with pytest.raises(StoreError):
        blockrt.run(model, budget=BUDGET, store=store)
    assert proc.num_fds() == fds

    _flip_a_data_byte(write_store(tmp_path / "again"))
    model, inputs = build_toy()
    rt = blockrt.run(model, budget=BUDGET, store=tmp_path / "again" / "s")
    with pytest.raises(LoadError):
        rt(**inputs)
    rt.close()
    assert proc.num_fds() == fds


def test_the_manifest_describes_the_store(tmp_path):
    store = tmp_path / "s"
    model, inputs = build_toy()
    with blockrt.run(model, budget=BUDGET, store=store) as rt:
        rt(**inputs)
        plan = rt.plan
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["format"] == "blockrt-store" and manifest["format_version"] == blockrt.store.FORMAT_VERSION
    assert manifest["blockrt_version"] == blockrt.__version__
    assert isinstance(manifest["fingerprint"], str) and len(manifest["fingerprint"]) == 32
    assert manifest["dtypes"] == ["float32"]
    assert manifest["total_bytes"] == plan.total_bytes
    assert Plan.from_dict(manifest["plan"]) == plan
    entries = [manifest["files"]["pinned"], *manifest["files"]["blocks"]]
    assert [e["file"] for e in entries] == ["pinned.safetensors"] + [f"blocks/{i:04d}.safetensors" for i in range(8)]
    sd = build_toy()[0].state_dict()
    for entry, keys in zip(entries, [[t.key for t in plan.pinned], *[b.keys for b in plan.blocks]]):
        path = store / entry["file"]
        data = path.read_bytes()
        assert entry["size"] == len(data)
        assert entry["crc32"] == zlib.crc32(data[data_start(path):])
        tensors = load_file(path)  # block files are plain safetensors, readable by the reference library
        assert sorted(tensors) == sorted(keys)
        assert all(torch.equal(tensors[k], sd[k]) for k in keys)
    assert [e["nbytes"] for e in manifest["files"]["blocks"]] == [b.nbytes for b in plan.blocks]
