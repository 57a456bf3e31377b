"""Nothing silently wrong with a block store (issue 14): every byte that reaches a tensor is checked against the
manifest, reuse is decided by the weights' content, only regular files inside the store are read, writers of one
store coordinate, and damage gives a ``BlockrtError`` naming what was expected, what was found and the fix.
Each test fails on the code before these checks (wrong output, a reused store, a hang or a raw exception)."""

from __future__ import annotations

import os
import shutil
import struct
import threading
from pathlib import Path

import pytest
import torch

import blockrt
import blockrt.store
from blockrt import BlockrtError, LoadError, RunConfig, StoreError
from blockrt.partitioners import partition
from models import build_toy
from store_faults import (BUDGET, HANG_S, Replace, edit_manifest, flip_byte, output, refused_in_time, rewrite_header,
                          spill, stream)

pytestmark = pytest.mark.timeout(60)


# -- every byte checked against the manifest (cases 3 and 4) ------------------------------------------------


def test_a_bit_flip_in_the_pinned_file_is_refused(tmp_path):
    store = spill(tmp_path / "s")
    flip_byte(store / "pinned.safetensors", 4 * 100 + 3)
    with pytest.raises(StoreError, match=r"pinned\.safetensors.*crc32.*does not match") as e:
        stream(store)
    assert "fix:" in str(e.value)
    model, inputs = build_toy(0)
    with pytest.raises(StoreError, match="crc32"):  # reusing it for the model in memory checks it too
        blockrt.run(model, budget=BUDGET, store=store)


@pytest.mark.parametrize("version", [3, 2])
def test_swapped_offsets_of_two_same_shape_tensors_are_refused(tmp_path, version):
    store = spill(tmp_path / "s")
    if version == 2:  # a store written before manifests recorded layouts: checked against the writer's layout
        edit_manifest(store, lambda m: [m.update(format_version=2)] + [e.pop("tensors") for e in
                                                                      [m["files"]["pinned"], *m["files"]["blocks"]]])
    a, b = "layers.1.ln1.weight", "layers.1.ln2.bias"  # both float32 [64]

    def swap(h):
        h[a]["data_offsets"], h[b]["data_offsets"] = h[b]["data_offsets"], h[a]["data_offsets"]

    rewrite_header(store / "blocks" / "0001.safetensors", swap)
    with pytest.raises(StoreError, match=r"0001\.safetensors: the header does not match the manifest.*'layers\.1\.ln"):
        stream(store)


def test_a_store_reused_after_one_element_changed_is_refused(tmp_path):
    store = spill(tmp_path / "s")
    model, _ = build_toy(0)
    with torch.no_grad():
        model.layers[3].mlp[0].weight[100, 5] += 1.0  # one element the old sampled fingerprint never read
    with pytest.raises(StoreError, match="other weights") as e:
        blockrt.run(model, budget=BUDGET, store=store)
    assert "fix:" in str(e.value)


# -- only regular files, inside their root (cases 11 and 12) ---------------------------------------------------


@pytest.mark.parametrize("what", ["block", "manifest"])
def test_a_fifo_in_a_store_is_refused_without_hanging(tmp_path, what):
    store = spill(tmp_path / "s")
    if what == "block":  # a FIFO has size 0: a manifest entry of size 0 passes the size check
        edit_manifest(store, lambda m: m["files"]["blocks"][2].update(size=0))
        target = store / "blocks" / "0002.safetensors"
    else:
        target = store / "manifest.json"
    target.unlink()
    os.mkfifo(target)
    e = refused_in_time(target, lambda: stream(store))
    assert isinstance(e, StoreError) and "FIFO" in str(e), e


@pytest.mark.parametrize("name, expected", [
    ("../outside.safetensors", "climbs out"),
    ("ABS", "absolute path"),
    ("blocks/0002.safetensors", "symbolic link"),
])
def test_manifest_paths_stay_inside_the_store(tmp_path, name, expected):
    store = spill(tmp_path / "s")
    outside = tmp_path / "outside.safetensors"
    shutil.copy(store / "blocks" / "0002.safetensors", outside)
    if name == "ABS":
        name = str(outside)
    if expected == "symbolic link":
        (store / "blocks" / "0002.safetensors").unlink()
        (store / "blocks" / "0002.safetensors").symlink_to(outside)
    else:
        edit_manifest(store, lambda m: m["files"]["blocks"][2].update(file=name))
    with pytest.raises(StoreError, match=expected) as e:
        stream(store)
    assert "fix:" in str(e.value)


# -- leftovers, two writers, a full disk (case 13) --------------------------------------------------------------


def test_stale_temporary_directories_are_removed_on_the_next_open(tmp_path):
    stale = [tmp_path / ".s.tmp-killed1", tmp_path / ".s.tmp-killed2"]
    for d in stale:  # what a writer killed with SIGKILL leaves
        (d / "blocks").mkdir(parents=True)
        (d / "blocks" / "0000.safetensors").write_bytes(b"\0" * 1000)
    spill(tmp_path / "s")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    (tmp_path / ".s.tmp-killed3").mkdir()  # a store that exists: cleaned when it is opened again
    spill(tmp_path / "s")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_two_writers_of_one_store_path_coordinate(tmp_path, monkeypatch):
    from blockrt.weights import open_weights

    real = blockrt.store.write_file
    barrier = threading.Barrier(2, timeout=HANG_S)

    def slow_write(path, *args, **kwargs):  # both writers would be writing at the same time
        if Path(path).name == "pinned.safetensors":
            try:
                barrier.wait(1.0)
            except threading.BrokenBarrierError:
                pass
        return real(path, *args, **kwargs)

    monkeypatch.setattr(blockrt.store, "write_file", slow_write)
    model, inputs = build_toy(0)
    plan = partition(model)
    storage = {b.name: None for b in plan.blocks}
    results: list[object] = []

    def writer():
        try:
            results.append(open_weights(model, plan, RunConfig(), storage, None, tmp_path / "s")[0])
        except BaseException as e:  # noqa: BLE001
            results.append(e)

    threads = [threading.Thread(target=writer) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 2 and not [r for r in results if isinstance(r, BaseException)], results
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # one store, no temporary directory, no lock file
    assert torch.equal(stream(tmp_path / "s"), output(model, inputs))


def test_a_full_disk_names_the_path_and_the_bytes(tmp_path, monkeypatch):
    import blockrt.guards

    monkeypatch.setattr(blockrt.guards.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    model, _ = build_toy(0)
    with pytest.raises(StoreError, match=r"No space left on device for the store .*/s: it needs \d+ bytes.*1000 bytes "
                                         r"are free.*fix:") as e:
        blockrt.run(model, budget=BUDGET, store=tmp_path / "s")
    assert isinstance(e.value, OSError) and e.value.errno == 28
    assert os.listdir(tmp_path) == []


# -- raw exceptions become messages (case 14) -------------------------------------------------------------------


@pytest.mark.parametrize("edit, expected", [
    (lambda m: Replace([1, 2]), r"expected a .*manifest of version.*found list"),
    (lambda m: m.pop("files"), "expected 'files'"),
    (lambda m: m.update(files=[]), "expected 'files'"),
    (lambda m: m["files"]["blocks"].pop(), "expected a file entry for each of the plan's 8 blocks, found 7"),
    (lambda m: m["files"]["blocks"][1].pop("crc32"), r"expected 'files\.blocks\[1\]\.crc32'"),
    (lambda m: m.update(plan=None), "expected 'plan'"),
    (lambda m: m.update(plan={"version": 1}), "the plan in the manifest cannot be read"),
], ids=["not-an-object", "no-files", "files-a-list", "missing-block-entry", "no-crc", "plan-null", "plan-empty"])
def test_a_damaged_manifest_is_a_store_error(tmp_path, edit, expected):
    store = spill(tmp_path / "s")
    edit_manifest(store, edit)
    with pytest.raises(StoreError, match=expected) as e:
        stream(store)
    assert "fix:" in str(e.value)


def test_a_renamed_tensor_in_a_block_header_is_a_store_error(tmp_path):
    store = spill(tmp_path / "s")
    rewrite_header(store / "blocks" / "0003.safetensors",
                   lambda h: h.update({"layers.3.ln1.wexght": h.pop("layers.3.ln1.weight")}))
    with pytest.raises(StoreError, match=r"the manifest lists \['layers\.3\.ln1\.weight'\], which the file lacks"):
        stream(store)


@pytest.mark.parametrize("where", ["header", "manifest", "index"])
def test_json_nested_100000_deep_is_a_store_error(tmp_path, where):
    deep = b"[" * 100_000 + b"]" * 100_000
    if where == "header":
        (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(deep)) + deep)
        target = tmp_path
    elif where == "manifest":
        target = spill(tmp_path / "s")
        (target / "manifest.json").write_bytes(deep)
    else:
        target = tmp_path / "ckpt"
        target.mkdir()
        (target / "model.safetensors.index.json").write_bytes(deep)
    with pytest.raises(BlockrtError, match="nested too deep"):
        stream(target)


def test_a_corrupt_block_is_still_a_load_error_naming_it(tmp_path):
    store = spill(tmp_path / "s")
    flip_byte(store / "blocks" / "0004.safetensors", 4 * 50 + 3)
    with pytest.raises(LoadError, match=r"'layers\.4'.*crc32"):
        stream(store)
