"""The user's model survives the run: after ``close`` an in-memory model has its original weights back (the same
Parameter objects, dtypes and bytes) however the run ended, a second run on it works, a skeleton stays a skeleton,
a kept ``store=`` is reused, and no file descriptor or thread is left behind."""

from __future__ import annotations

import gc
import os
import tempfile
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import blockrt
from blockrt import RunConfig
from blockrt.errors import BlockrtError
from blockrt.partitioners import partition
from blockrt.restore import RESTORE_FILE
from models import BUILDERS, build_toy

pytestmark = pytest.mark.timeout(180)

BUDGET_SWEEP = (1.0, 1.5, 3.0)  # x the roomy budget below: a sweep that runs the same model three times
PASSES = 2


def output(o):
    return o if isinstance(o, torch.Tensor) else o.last_hidden_state


def reference(model, inputs):
    with torch.no_grad():
        return output(model(**inputs)).clone()


def roomy(model) -> int:
    plan = partition(model)
    return plan.pinned_bytes + 4 * plan.largest_block().nbytes + (1 << 20)


def snapshot(model) -> dict[str, tuple[int, torch.dtype, torch.device, torch.Tensor]]:
    """Every parameter and buffer: its object's id, dtype, device and a copy of its values."""
    return {n: (id(t), t.dtype, t.device, t.detach().clone())
            for n, t in [*model.named_parameters(), *model.named_buffers()]}


def assert_same(model, before) -> None:
    after = snapshot(model)
    assert after.keys() == before.keys()
    for n, (ident, dtype, device, value) in before.items():
        got = after[n]
        assert got[0] == ident, f"{n}: another object"
        assert (got[1], got[2]) == (dtype, device), f"{n}: {got[1]} on {got[2]}, was {dtype} on {device}"
        assert torch.equal(got[3], value), f"{n}: other values"


def our_tempdirs() -> set[str]:
    return {n for n in os.listdir(tempfile.gettempdir()) if n.startswith(f"blockrt-{os.getpid()}-")}


def test_close_gives_every_model_back_bit_exact(tiny_model):
    name, model, inputs = tiny_model
    ref = reference(model, inputs)
    before = snapshot(model)
    with blockrt.run(model, budget=roomy(model)) as rt:
        for _ in range(PASSES):
            assert torch.equal(output(rt(**inputs)), ref), name
        assert any(p.is_meta for p in model.parameters())  # streaming: the blocks are placeholders meanwhile
    assert_same(model, before)
    assert torch.equal(reference(model, inputs), ref), name
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_a_budget_sweep_runs_the_same_model_again_and_again():
    model, inputs = build_toy(0)
    ref = reference(model, inputs)
    before = snapshot(model)
    base = roomy(model)
    for factor in BUDGET_SWEEP:
        with blockrt.run(model, budget=int(base * factor)) as rt:
            for _ in range(PASSES):
                assert torch.equal(rt(**inputs), ref), factor
        assert_same(model, before)
    assert torch.equal(reference(model, inputs), ref)


def test_the_embedding_table_read_by_rows_comes_back_too():
    model, inputs = BUILDERS["t5_encoder"]()
    ref = reference(model, inputs)
    before = snapshot(model)
    with blockrt.run(model, budget=roomy(model), config=RunConfig(row_stream_min_bytes=0)) as rt:
        assert rt._rows and model.shared.weight.is_meta  # the tied table is read by rows
        assert torch.equal(output(rt(**inputs)), ref)
    assert_same(model, before)
    assert model.shared.weight is model.encoder.embed_tokens.weight


@pytest.mark.parametrize("storage", ["int8", "float16", {"layers.[0-3]*": "int8"}])
@pytest.mark.parametrize("at", ["temporary", "store"])
def test_lossy_storage_gives_back_the_exact_originals(storage, at, tmp_path):
    model, inputs = build_toy(0)
    ref = reference(model, inputs)
    before = snapshot(model)
    dirs = our_tempdirs()
    store = tmp_path / "s" if at == "store" else None
    with blockrt.run(model, budget=roomy(model), store=store, config=RunConfig(storage_dtype=storage)) as rt:
        assert not torch.equal(rt(**inputs), ref)  # computed from the narrower weights
        restore_file = Path(rt._tmpdir) / RESTORE_FILE
        assert restore_file.is_file()  # the originals of what the store holds narrower, in a temporary directory
    assert_same(model, before)
    assert torch.equal(reference(model, inputs), ref)
    assert not restore_file.exists() and our_tempdirs() == dirs
    if store is not None:
        assert (store / "manifest.json").is_file()  # the user's store is kept


def test_a_store_kept_at_store_path_is_reused_and_the_model_restored(tmp_path):
    model, inputs = build_toy(0)
    ref = reference(model, inputs)
    before = snapshot(model)
    store = tmp_path / "store"
    with blockrt.run(model, budget=roomy(model), store=store) as rt:
        assert torch.equal(rt(**inputs), ref)
        assert rt._tmpdir is None  # nothing temporary: the store holds the originals exactly
    assert_same(model, before)
    manifest = store / "manifest.json"
    written = manifest.stat().st_mtime_ns, {p.name: p.stat().st_ino for p in (store / "blocks").iterdir()}
    with blockrt.run(model, budget=2 * roomy(model), store=store) as rt:  # reused, not rewritten
        assert str(store) in rt.weight_files[0]
        assert torch.equal(rt(**inputs), ref)
    assert (manifest.stat().st_mtime_ns, {p.name: p.stat().st_ino for p in (store / "blocks").iterdir()}) == written
    assert_same(model, before)
    assert torch.equal(reference(model, inputs), ref)


class Boom(RuntimeError):
    pass


def raise_in(module: torch.nn.Module, exc: type[BaseException], armed: dict) -> None:
    def hook(mod, args):
        if armed["on"]:
            armed["on"] = False
            raise exc("raised inside a block")
    module.register_forward_pre_hook(hook)


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
@pytest.mark.parametrize("storage", [None, "int8"])
def test_a_failed_pass_still_gives_the_model_back(exc, storage):
    model, inputs = build_toy(0)
    ref = reference(model, inputs)
    armed = {"on": False}
    raise_in(model.layers[3].mlp, exc, armed)
    before = snapshot(model)
    with pytest.raises(exc):
        with blockrt.run(model, budget=roomy(model), config=RunConfig(storage_dtype=storage)) as rt:
            rt(**inputs)
            armed["on"] = True
            rt(**inputs)
    assert_same(model, before)
    assert torch.equal(reference(model, inputs), ref)
    with blockrt.run(model, budget=roomy(model)) as rt:  # and it streams again
        assert torch.equal(rt(**inputs), ref)
    assert_same(model, before)


def test_a_pass_interrupted_outside_the_runtime_is_closed_and_the_model_given_back():
    """``model(...)`` called directly and interrupted: the pass is still open when close runs."""
    model, inputs = build_toy(0)
    ref = reference(model, inputs)
    armed = {"on": False}
    raise_in(model.layers[5].attn, KeyboardInterrupt, armed)
    before = snapshot(model)
    rt = blockrt.run(model, budget=roomy(model))
    with torch.no_grad():
        armed["on"] = True
        with pytest.raises(KeyboardInterrupt):
            model(**inputs)
    rt.close()
    assert_same(model, before)
    assert torch.equal(reference(model, inputs), ref)


@pytest.mark.parametrize("storage", [None, "int8"])
def test_a_set_up_that_fails_halfway_leaves_the_model_whole(storage, monkeypatch):
    model, inputs = build_toy(0)
    ref = reference(model, inputs)
    before = snapshot(model)
    dirs = our_tempdirs()
    installed = []

    def fail_after_some_hooks(self):
        installed.append(self.model.layers[0].register_forward_pre_hook(lambda mod, args: None))
        self._hooks.append(installed[-1])
        assert any(p.is_meta for p in self.model.parameters())  # the blocks are placeholders by now
        raise Boom("set-up failed")

    monkeypatch.setattr(blockrt.runtime.Runtime, "_install_hooks", fail_after_some_hooks)
    with pytest.raises(Boom):
        blockrt.run(model, budget=roomy(model), config=RunConfig(storage_dtype=storage))
    assert installed and not model.layers[0]._forward_pre_hooks  # what it had installed is gone
    assert_same(model, before)
    assert our_tempdirs() == dirs
    assert torch.equal(reference(model, inputs), ref)


def test_fds_and_threads_come_back_to_their_count(tmp_path):
    model, inputs = build_toy(0)
    ref = reference(model, inputs)
    with blockrt.run(model, budget=roomy(model)) as rt:  # once first: lazy imports and torch's own pools
        rt(**inputs)
    gc.collect()
    fds, threads = len(os.listdir("/proc/self/fd")), threading.active_count()
    for storage, store in ((None, None), ("int8", None), (None, tmp_path / "s")):
        with blockrt.run(model, budget=roomy(model), store=store, config=RunConfig(storage_dtype=storage)) as rt:
            assert torch.equal(rt(**inputs), ref) == (storage is None)
            assert threading.active_count() > threads  # the loader (and the RSS sampler) ran
        gc.collect()
        assert len(os.listdir("/proc/self/fd")) == fds, storage
        assert threading.active_count() == threads, [t.name for t in threading.enumerate()]
    assert torch.equal(reference(model, inputs), ref)


def test_restore_false_keeps_the_placeholders(tmp_path):
    model, inputs = build_toy(0)
    ref = reference(model, inputs)
    with blockrt.run(model, budget=roomy(model), store=tmp_path / "s", config=RunConfig(restore=False)) as rt:
        assert torch.equal(rt(**inputs), ref)
    assert all(p.is_meta for p in model.layers.parameters())
    with pytest.raises(BlockrtError, match="restore=False.*weights="):
        blockrt.run(model, budget=roomy(model))
    with blockrt.run(model, budget=roomy(model), weights=tmp_path / "s") as rt:  # streamed from the kept store
        assert torch.equal(rt(**inputs), ref)
    with pytest.raises(ValueError, match="restore"):
        RunConfig(restore="yes")


def test_a_skeleton_stays_a_skeleton_and_streams_again(tmp_path):
    model, inputs = build_toy(0)
    ref = reference(model, inputs)
    state = model.state_dict()
    save_file({k: state[k].contiguous() for k in partition(model).all_specs()}, tmp_path / "model.safetensors")
    with blockrt.meta_weights():
        skeleton, _ = build_toy(0)
    for budget in (roomy(model), 2 * roomy(model)):
        with blockrt.run(skeleton, budget=budget, weights=tmp_path) as rt:
            assert torch.equal(rt(**inputs), ref)
        streamed = {k for b in rt.plan.blocks for k in b.keys}
        on_meta = {n for n, p in skeleton.named_parameters() if p.is_meta}
        assert streamed and on_meta == streamed  # nothing read back: it never held its blocks (pinned stays bound)
        assert not skeleton._forward_hooks and not skeleton._forward_pre_hooks
        with torch.no_grad(), pytest.raises(BlockrtError, match="evicted meta placeholder.*stays a skeleton"):
            skeleton(**inputs)  # a plain call fails on the placeholders, naming them
    with pytest.raises(BlockrtError, match="weights="):
        blockrt.run(skeleton, budget=roomy(model))


def test_a_runtime_dropped_without_close_keeps_streaming_its_model():
    """The hooks hold the runtime: while the model lives the runtime is not collected, and the model still runs
    (streamed); nothing is restored by the garbage collector (see ``blockrt/restore.py``)."""
    model, inputs = build_toy(0)
    ref = reference(model, inputs)
    rt = blockrt.run(model, budget=roomy(model))
    tmpdir = rt._tmpdir
    del rt
    gc.collect()
    assert os.path.isdir(tmpdir)  # the store is still there: the runtime is alive
    with torch.no_grad():
        assert torch.equal(model(**inputs), ref)
    del model
    gc.collect()  # the model gone, the runtime is collected: its finalizer removes the temporary store
    assert not os.path.exists(tmpdir)


def test_a_store_file_gone_is_named_at_close_and_never_masks_the_error_in_flight(tmp_path, caplog):
    model, inputs = build_toy(0)
    store = tmp_path / "s"
    rt = blockrt.run(model, budget=roomy(model), store=store)
    (store / "blocks" / "0001.safetensors").unlink()
    with pytest.raises(blockrt.RestoreError, match=r"layers\.1\..*FileNotFoundError.*the rest was restored"):
        rt.close()
    assert {n.split(".")[1] for n, p in model.named_parameters() if p.is_meta} == {"1"}  # only that block
    rt = blockrt.run(build_toy(0)[0], budget=roomy(model), store=tmp_path / "t")
    (tmp_path / "t" / "blocks" / "0002.safetensors").unlink()
    with pytest.raises(Boom):  # the with-block's own exception comes out; the restore problem is logged
        with rt:
            raise Boom("the caller's error")
    assert "could not all be put back" in caplog.text


def test_after_generate_with_a_cache_the_model_fds_and_threads_come_back():
    """T5's generate (the encoder through get_encoder(), a cache as state) at two budgets on the same model: both
    bit-exact, then the plain model equal again and no file descriptor or thread left behind."""
    from test_generate import _generate, _same, _t5

    ids = torch.randint(1, 256, (2, 6), generator=torch.Generator().manual_seed(1))
    model = _t5()
    ref = _generate(model, ids, new=4)
    plan = partition(model)
    with blockrt.run(model, budget=10**10) as rt:  # every block retained; lazy imports and torch's pools first
        assert _same(_generate(model, ids, new=4), ref)
    gc.collect()
    fds, threads = len(os.listdir("/proc/self/fd")), threading.active_count()
    with blockrt.run(model, budget=plan.total_bytes // 2) as rt:  # streamed
        assert _same(_generate(model, ids, new=4), ref)
        assert len(rt.retention.retained) < len(rt.plan.blocks)
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) == fds
    assert threading.active_count() == threads, [t.name for t in threading.enumerate()]
    assert _same(_generate(model, ids, new=4), ref)
