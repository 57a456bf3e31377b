"""The runtime end to end: parity with the plain model, streaming from checkpoints, the ledger, overlap."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from safetensors.torch import save_file

import blockrt
from blockrt import BudgetError, RunConfig
from models import BUILDERS
from blockrt.partitioners import partition

PASSES = 3
OVERLAP_BPS = 20e6  # throttled read bandwidth for the overlap tests: loads become slow and measurable


def output(o):
    """The tensor a model call returns (HF models return a ModelOutput)."""
    return o if isinstance(o, torch.Tensor) else o.last_hidden_state


def reference(model, inputs):
    with torch.no_grad():
        return output(model(**inputs)).clone()


def roomy(model) -> int:
    """A budget that fits pinned + 3 slots of the largest block and the activations comfortably (the
    whole-model partitioner cuts the 3-layer models below a layer, so the slots alone no longer leave room)."""
    plan = partition(model)
    return plan.pinned_bytes + 4 * plan.largest_block().nbytes + (128 << 10)


def checkpoint_of(model, tmp_path, shards: int = 1):
    """Write the model's state dict (tied tensors once) as one safetensors file or ``shards`` shards + index."""
    plan = partition(model)
    sd = model.state_dict()
    tensors = {k: sd[k].contiguous() for k in plan.all_specs()}
    if shards == 1:
        save_file(tensors, tmp_path / "model.safetensors")
        return tmp_path / "model.safetensors"
    keys = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[s::shards]}
        save_file(part, tmp_path / name)
        weight_map.update(dict.fromkeys(part, name))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return tmp_path


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_parity_every_model_every_depth(tiny_model, depth):
    name, model, inputs = tiny_model
    ref = reference(model, inputs)
    params = {n: id(p) for n, p in model.named_parameters()}
    budget = roomy(model)
    with blockrt.run(model, budget=budget, config=RunConfig(prefetch_depth=depth)) as rt:
        for _ in range(PASSES):
            assert torch.equal(output(rt(**inputs)), ref), f"{name} depth {depth}"
        s = rt.profile.summary()
        assert s.passes == PASSES
        assert s.bytes_loaded == PASSES * rt.plan.block_bytes
        assert rt.ledger.peak <= budget and s.peak_ledger_bytes <= budget
    assert {n: id(p) for n, p in model.named_parameters()} == params  # parameters keep their identity


@pytest.mark.parametrize("shards", [1, 2])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_parity_streaming_a_checkpoint_onto_a_meta_skeleton(name, shards, tmp_path):
    model, inputs = BUILDERS[name]()
    ref = reference(model, inputs)
    path = checkpoint_of(model, tmp_path, shards)
    with blockrt.meta_weights():
        skeleton, _ = BUILDERS[name]()
    assert all(p.is_meta for p in skeleton.parameters())
    with blockrt.run(skeleton, budget=roomy(model), weights=path) as rt:
        for _ in range(PASSES):
            assert torch.equal(output(rt(**inputs)), ref)


def test_meta_skeleton_with_nonpersistent_buffers_is_a_clear_error(tmp_path):
    model, _ = BUILDERS["llama"]()
    path = checkpoint_of(model, tmp_path)
    with torch.device("meta"):
        skeleton, _ = BUILDERS["llama"]()
    with pytest.raises(blockrt.BlockrtError, match="inv_freq.*meta_weights"):
        blockrt.run(skeleton, budget=roomy(model), weights=path)


def test_user_calling_the_model_directly_is_streamed_too():
    model, inputs = BUILDERS["toy"]()
    ref = reference(model, inputs)
    with blockrt.run(model, budget=roomy(model)) as rt:
        with torch.no_grad():
            assert torch.equal(model(**inputs), ref)
        with pytest.raises(blockrt.BlockrtError, match="no_grad"):
            model(**inputs)
        assert torch.equal(rt(**inputs), ref)  # still works after the refused call


def test_budget_below_the_minimum_is_refused_before_anything_runs():
    model, _ = BUILDERS["toy"]()
    plan = partition(model)
    need = plan.pinned_bytes + 2 * plan.largest_block().nbytes
    with pytest.raises(BudgetError) as e:
        blockrt.run(model, budget=need // 2)
    msg = str(e.value)
    assert plan.largest_block().name in msg and "smallest feasible" in msg
    smallest = int(msg.split("raise the budget to at least ")[1].split()[0])
    with blockrt.run(model, budget=smallest) as rt:  # the budget it names really works
        assert rt.ledger.peak <= smallest
    assert not any(p.is_meta for p in model.parameters())  # the model has its weights back after close


def test_invalid_arguments():
    model, _ = BUILDERS["toy"]()
    with pytest.raises(ValueError, match="budget"):
        blockrt.run(model, budget="3.3 gigs")
    with pytest.raises(ValueError, match="prefetch_depth"):
        RunConfig(prefetch_depth=-1)
    with pytest.raises(ValueError, match="verify"):
        RunConfig(verify="sometimes")


def _lane_overlaps(events) -> int:
    """How many compute events of block i overlap a load event of a later block."""
    loads = [e for e in events if e.kind == "load"]
    n = 0
    for c in (e for e in events if e.kind == "compute"):
        if any(ld.block != c.block and ld.start < c.end and ld.end > c.start for ld in loads):
            n += 1
    return n


class SlowLayer(torch.nn.Module):
    """A linear layer whose compute takes a fixed extra time (a sleep releases the GIL like a kernel)."""

    def __init__(self, dim: int, sleep_s: float) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(dim, dim)
        self.sleep_s = sleep_s

    def forward(self, x):
        threading.Event().wait(self.sleep_s)
        return self.linear(x)


class SlowBlocks(torch.nn.Module):
    """Layers whose compute time is fixed, so load and compute can be balanced exactly."""

    def __init__(self, n: int = 6, dim: int = 512, sleep_s: float = 0.05) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(SlowLayer(dim, sleep_s) for _ in range(n))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_prefetch_overlaps_loads_with_compute():
    x = torch.randn(4, 512)
    ratios = {}
    for depth in (0, 1):
        torch.manual_seed(0)
        model = SlowBlocks()
        ref = reference(model, {"x": x})
        bps = model.layers[0].linear.weight.nbytes / 0.05  # load time per block = compute time per block
        cfg = RunConfig(prefetch_depth=depth, read_bytes_per_s=bps)
        # one block per SlowLayer, its sleep included (the whole-model partitioner would make the weight-owning
        # linear the block and leave the sleep outside every block's compute: overlaps only by chance)
        from blockrt.partitioners.generic import generic_partition

        with blockrt.run(model, budget="64MB", config=cfg, partitioner=generic_partition) as rt:
            assert [b.name for b in rt.plan.blocks] == [f"layers.{i}" for i in range(6)]
            for _ in range(3):
                assert torch.equal(rt(x), ref)
            s = rt.profile.summary(passes=[1, 2])  # steady state
            ratios[depth] = s.roofline_ratio
            overlaps = _lane_overlaps(rt.profile.events)
        if depth == 1:
            assert overlaps >= 10, "loads of block i+1 should run while block i computes"
        else:
            assert overlaps == 0
    assert ratios[1] < 1.35, ratios
    assert ratios[0] > 1.7, ratios


def test_close_stops_the_thread_and_leaks_no_files():
    import psutil

    proc = psutil.Process()
    before_fds = proc.num_fds()
    model, inputs = BUILDERS["toy"]()
    rt = blockrt.run(model, budget=roomy(model))
    rt(**inputs)
    thread = rt._loader._thread
    rt.close()
    rt.close()  # idempotent
    assert not thread.is_alive()
    assert proc.num_fds() == before_fds
    with pytest.raises(blockrt.BlockrtError, match="closed"):
        rt(**inputs)


def test_failed_setup_leaves_no_temporary_store_and_keeps_the_weights(monkeypatch, tmp_path):
    import glob
    import tempfile

    model, inputs = BUILDERS["toy"]()
    ref = reference(model, inputs)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # a temp dir no other process writes to
    pattern = f"{tempfile.gettempdir()}/blockrt-*"
    before = set(glob.glob(pattern))

    def fail(*args, **kwargs):
        raise OSError("simulated failure while binding the pinned part")

    monkeypatch.setattr(blockrt.runtime, "bind_pinned", fail)
    with pytest.raises(OSError, match="simulated"):
        blockrt.run(model, budget=roomy(model))
    assert set(glob.glob(pattern)) == before
    assert torch.equal(reference(model, inputs), ref)  # nothing was evicted


@pytest.mark.parametrize("depth", [1, 2])
def test_expect_last_pass_reads_no_block_for_a_pass_that_never_comes(depth):
    """Without the hint the last blocks prefetch the next pass's first ones; with it, every load serves a pass
    that ran, the output is unchanged, and a call after all still works (loading on demand)."""
    config = blockrt.RunConfig(prefetch_depth=depth, retention=False)
    loads = {}
    for hint in (False, True):
        model, inputs = BUILDERS["toy"](n_layers=4)
        ref = reference(model, inputs)
        with blockrt.run(model, budget=roomy(model), config=config) as rt:
            assert torch.equal(output(rt(**inputs)), ref)
            if hint:
                rt.expect_last_pass()
            assert torch.equal(output(rt(**inputs)), ref)
            rt._loader.drain(10.0)  # every submitted read finishes and is recorded (close would fail queued ones)
            loads[hint] = [e.pass_idx for e in rt.profile.events if e.kind == "load"]
    n = len(partition(BUILDERS["toy"](n_layers=4)[0]).blocks)
    assert sorted(loads[True]) == [0] * n + [1] * n
    assert loads[False].count(2) == depth  # the blocks read for a third pass


def test_a_call_after_the_announced_last_pass_still_streams():
    model, inputs = BUILDERS["toy"](n_layers=4)
    ref = reference(model, inputs)
    with blockrt.run(model, budget=roomy(model), config=blockrt.RunConfig(prefetch_depth=1)) as rt:
        rt.expect_last_pass()
        for _ in range(4):  # the hint lasts one call; the next loads its first block on demand
            assert torch.equal(output(rt(**inputs)), ref)
