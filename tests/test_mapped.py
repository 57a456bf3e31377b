"""Copy-free streaming (``RunConfig(mapped=True)``, ``mapping.py``): blocks bound to their files' pages compute
exactly like copied ones, only the streaming window stays mapped, the ledger holds it as file-backed bytes, and
nothing (a mapping, a descriptor) outlives the runtime; what cannot be mapped is copied as before."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import blockrt
from blockrt import RunConfig
from blockrt.errors import LoadError
from blockrt.mapping import MAP_ALIGN, mappable
from blockrt.partitioners import partition
from blockrt.partitioners.plan import TensorSpec
from blockrt.safetensors_format import Segment, read_layout
from models import BUILDERS, build_toy


def _out(o):
    return o if isinstance(o, torch.Tensor) else o.last_hidden_state


def _half(model) -> int:
    plan = partition(model)
    return plan.pinned_bytes + 3 * plan.largest_block().nbytes + (256 << 10)


def _mapped_rss(paths: list[str]) -> int:
    """Resident bytes of this process's mappings of ``paths`` (``/proc/self/smaps``)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5:  # a mapping's first line: range perms offset dev inode [path]
            inside = len(head) >= 6 and head[5] in paths
        elif inside and line.startswith("Rss:"):
            total += int(head[1]) * 1024
    return total


@pytest.mark.parametrize("name", ["toy", "llama", "gpt2", "t5_encoder"])
@pytest.mark.parametrize("depth", [0, 1, 2])
def test_mapped_blocks_compute_like_the_plain_model(name, depth):
    model, inputs = BUILDERS[name]()
    with torch.no_grad():
        ref = _out(model(**inputs)).clone()
    cfg = RunConfig(prefetch_depth=depth, mapped=True, retention=False, verify="always")
    with blockrt.run(model, budget=_half(model), config=cfg) as rt:
        assert rt._residency.mapped == frozenset(range(len(rt.plan.blocks)))  # a blockrt store: all aligned
        for _ in range(3):
            assert torch.equal(_out(rt(**inputs)), ref)
        held = rt.ledger.held()
        assert held["slots"] == 0  # no anonymous slot: the window is file-backed
        assert held["mapped"] == min(depth + 1, len(rt.plan.blocks)) * max(b.nbytes for b in rt.plan.blocks)
        assert rt.profile.summary().bytes_loaded == 3 * rt.plan.block_bytes
    with torch.no_grad():
        assert torch.equal(_out(model(**inputs)), ref)  # the model has its weights back


def test_mapped_and_retained_blocks_together_keep_parity():
    model, inputs = build_toy()
    with torch.no_grad():
        ref = model(**inputs).clone()
    plan = partition(model)
    budget = plan.pinned_bytes + plan.block_bytes // 2 + 4 * plan.largest_block().nbytes
    with blockrt.run(model, budget=budget, config=RunConfig(mapped=True)) as rt:
        for _ in range(4):
            assert torch.equal(rt(**inputs), ref)
        retained = rt.retention.retained
        assert 0 < len(retained) < len(rt.plan.blocks)  # some in their own (anonymous) buffers, the rest mapped
        assert rt.ledger.held()["retained"] > 0 and rt.ledger.held()["mapped"] > 0
        assert rt.ledger.peak <= budget


def test_only_the_window_stays_mapped_and_nothing_outlives_close():
    model, inputs = build_toy(dim=128)
    with blockrt.run(model, budget=_half(model), config=RunConfig(mapped=True, retention=False)) as rt:
        files = [f for f in rt.weight_files if "blocks" in f]
        fds_before = len(os.listdir("/proc/self/fd"))
        rt(**inputs)
        rt(**inputs)
        window = rt.ledger.held()["mapped"]
        assert 0 < _mapped_rss(files) <= window + len(files) * 2 * 4096  # released blocks were unmapped
        assert len(os.listdir("/proc/self/fd")) <= fds_before + 2  # mappings hold a descriptor each at most
    maps = Path("/proc/self/maps").read_text()
    assert not any(f in maps for f in files)
    assert not any(os.readlink(f"/proc/self/fd/{fd}") in files for fd in os.listdir("/proc/self/fd")
                   if os.path.exists(f"/proc/self/fd/{fd}"))


def test_an_unaligned_checkpoint_is_converted_once_into_an_aligned_store(tmp_path):
    model, inputs = build_toy()
    with torch.no_grad():
        ref = model(**inputs).clone()
    plan = partition(model)
    sd = model.state_dict()
    tensors = {k: sd[k].contiguous() for k in plan.all_specs()}
    for pad in range(0, 64, 8):  # the header's length moves every tensor; find one layout of each kind
        save_file(tensors, tmp_path / "model.safetensors", metadata={"pad": "x" * pad})
        segs = read_layout(tmp_path / "model.safetensors").segments
        if all(segs[k].offset % MAP_ALIGN for b in plan.blocks for k in b.keys):
            break
    else:
        pytest.skip("no header length put every block tensor off the alignment")
    skeleton = build_toy()[0]
    for mapped in (False, True):
        cfg = RunConfig(mapped=mapped, retention=False, store_path=tmp_path / "aligned")
        with blockrt.run(skeleton, budget=_half(model), weights=tmp_path / "model.safetensors", config=cfg) as rt:
            assert torch.equal(rt(**inputs), ref)
            if mapped:  # converted into an aligned store, every block mapped
                assert rt._residency.mapped == frozenset(range(len(rt.plan.blocks)))
                assert all(str(tmp_path / "aligned") in f for f in rt.weight_files)
            else:  # read in place, copied
                assert rt.weight_files == [str(tmp_path / "model.safetensors")] and rt.ledger.held()["slots"] > 0


def test_mappable_wants_the_compute_dtype_the_shape_and_the_alignment():
    spec = TensorSpec("w", "float32", (4, 16))
    seg = Segment("w", "/f", 128, 256, "float32", (4, 16))
    assert mappable([spec], [seg])
    assert not mappable([spec], [Segment("w", "/f", 136, 256, "float32", (4, 16))])  # 8 bytes off
    assert not mappable([spec], [Segment("w", "/f", 128, 128, "bfloat16", (4, 16))])  # widened on load
    assert not mappable([], [])


def test_a_corrupt_block_is_refused_when_mapped(tmp_path):
    model, inputs = build_toy()
    store = tmp_path / "store"
    with blockrt.run(model, budget=_half(model), config=RunConfig(store_path=store, retention=False)) as rt:
        rt(**inputs)
    block = sorted((store / "blocks").iterdir())[1]
    data = bytearray(block.read_bytes())
    data[-3] ^= 0x40
    block.write_bytes(bytes(data))
    with blockrt.meta_weights():
        skeleton = build_toy()[0]
    with pytest.raises(LoadError, match="crc32"):
        with blockrt.run(skeleton, budget=_half(model), weights=store,
                         config=RunConfig(mapped=True, retention=False, verify="always")) as rt:
            rt(**inputs)


def test_a_file_changed_under_a_mapping_is_refused_not_a_crash(tmp_path):
    model, inputs = build_toy()
    store = tmp_path / "store"
    with blockrt.run(model, budget=_half(model), config=RunConfig(store_path=store, retention=False)) as rt:
        rt(**inputs)
    with blockrt.meta_weights():
        skeleton = build_toy()[0]
    with blockrt.run(skeleton, budget=_half(model), weights=store, config=RunConfig(mapped=True, retention=False)) as rt:
        rt(**inputs)
        last = sorted((store / "blocks").iterdir())[-1]
        os.truncate(last, 64)  # in place, under the mapping
        with pytest.raises(LoadError, match="shrank|expected"):
            rt(**inputs)


def test_mapped_is_checked():
    with pytest.raises(ValueError, match="device='cpu'"):
        RunConfig(mapped=True, device="cuda")
    with pytest.raises(ValueError, match="mapped must be"):
        RunConfig(mapped="yes")
