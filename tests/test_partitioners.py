"""Tests of the partitioners: the generic partitioner on tiny HF models and the toy, and the registry."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from blockrt.errors import PartitionError
from blockrt.partitioners.plan import Plan
from models import build_t5_encoder, build_toy
from blockrt.partitioners import generic_partition, partition, register
from blockrt.partitioners.registry import lookup, unregister
from blockrt.pipelines.toy import ToyConfig, ToyTransformer

# model name -> (stack path, number of layers)
EXPECTED_STACKS = {
    "toy": ("layers", 8),
    "t5_encoder": ("encoder.block", 4),
    "bert": ("encoder.layer", 3),
    "gpt2": ("h", 3),
    "llama": ("layers", 3),
}


def unique_bytes(model: nn.Module) -> int:
    """Bytes of the distinct tensors in the state dict (tied tensors once)."""
    seen = {id(t): t for t in model.state_dict(keep_vars=True).values()}
    return sum(t.numel() * t.element_size() for t in seen.values())


def check_covers(plan: Plan, model: nn.Module) -> None:
    """Every state-dict key is owned by exactly one block, pinned, or an alias of an owner; nothing else."""
    sd = model.state_dict(keep_vars=True)
    places = [t.key for b in plan.blocks for t in b.tensors] + [t.key for t in plan.pinned] + list(plan.aliases)
    assert sorted(places) == sorted(sd), "a key is missing or listed twice"
    owners = plan.all_specs()
    for alias, owner in plan.aliases.items():
        assert owner in owners and sd[alias] is sd[owner]
    for key, spec in owners.items():
        assert spec.shape == tuple(sd[key].shape)
    for b in plan.blocks:  # block tensors live inside the block's modules, in state-dict order
        assert all(any(t.key.startswith(m + ".") for m in b.modules) for t in b.tensors)
        order = [k for k in sd if k in set(b.keys)]
        assert list(b.keys) == order


def test_generic_finds_stack_and_covers_state_dict(tiny_model) -> None:
    name, model, _ = tiny_model
    stack, n = EXPECTED_STACKS[name]
    plan = generic_partition(model)
    assert plan.partitioner == "generic" and plan.model_class == type(model).__qualname__
    if name == "t5_encoder":  # the registered T5 partitioner splits it the same way
        registered = partition(model)
        assert registered.partitioner == "t5" and registered.blocks == plan.blocks and registered.pinned == plan.pinned
    assert [b.modules for b in plan.blocks] == [(f"{stack}.{i}",) for i in range(n)]
    assert [b.name for b in plan.blocks] == [f"{stack}.{i}" for i in range(n)]
    check_covers(plan, model)
    assert plan.total_bytes == unique_bytes(model)
    assert all(b.nbytes > 0 for b in plan.blocks)


def test_partition_leaves_model_untouched(tiny_model) -> None:
    _, model, inputs = tiny_model
    before = {k: (v, v.detach().clone()) for k, v in model.state_dict(keep_vars=True).items()}
    partition(model, target_bytes=1 << 20)
    after = model.state_dict(keep_vars=True)
    assert all(after[k] is v and torch.equal(v, c) for k, (v, c) in before.items())


def test_toy_forward_shape() -> None:
    model, inputs = build_toy()
    with torch.no_grad():
        logits = model(**inputs)
    assert logits.shape == (*inputs["ids"].shape, model.cfg.vocab)


def test_toy_tied_head_stored_once() -> None:
    model, _ = build_toy()
    plan = generic_partition(model)
    assert plan.aliases == {"head.weight": "tok_emb.weight"}
    pinned = [t.key for t in plan.pinned]
    assert pinned == ["tok_emb.weight", "pos_emb.weight", "norm.weight", "norm.bias"]
    pinned_params = (model.tok_emb.weight, model.pos_emb.weight, model.norm.weight, model.norm.bias)
    assert plan.pinned_bytes == sum(p.numel() * 4 for p in pinned_params)


def test_t5_shared_embedding_is_aliased_and_block0_is_larger() -> None:
    model, _ = build_t5_encoder()
    plan = generic_partition(model)
    assert plan.aliases == {"encoder.embed_tokens.weight": "shared.weight"}
    assert "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight" in plan.blocks[0].keys
    assert plan.blocks[0].nbytes > plan.blocks[1].nbytes == plan.blocks[3].nbytes


@pytest.mark.parametrize("name", ["toy", "gpt2", "llama", "bert"])
def test_target_packs_two_equal_layers(name: str) -> None:
    from models import BUILDERS

    model, _ = BUILDERS[name]()
    stack, n = EXPECTED_STACKS[name]
    one = generic_partition(model).blocks[0].nbytes
    plan = generic_partition(model, target_bytes=2 * one)
    expected = [tuple(f"{stack}.{j}" for j in range(i, min(i + 2, n))) for i in range(0, n, 2)]
    assert [b.modules for b in plan.blocks] == expected
    assert plan.blocks[0].name == f"{stack}.0-1"
    assert all(b.nbytes <= 2 * one for b in plan.blocks)
    check_covers(plan, model)
    assert plan.total_bytes == unique_bytes(model)
    # just under two layers: back to one layer per block; a huge target: one block.
    assert len(generic_partition(model, target_bytes=2 * one - 1).blocks) == n
    assert len(generic_partition(model, target_bytes=1).blocks) == n
    assert [b.name for b in generic_partition(model, target_bytes=1 << 40).blocks] == [f"{stack}.0-{n - 1}"]


def test_target_t5_larger_first_block() -> None:
    model, _ = build_t5_encoder()
    sizes = [b.nbytes for b in generic_partition(model).blocks]
    plan = partition(model, target_bytes=sizes[0] + sizes[1])
    assert [b.name for b in plan.blocks] == ["encoder.block.0-1", "encoder.block.2-3"]
    plan = partition(model, target_bytes=2 * sizes[1])  # block 0 alone exceeds half of it with block 1
    assert [b.name for b in plan.blocks] == ["encoder.block.0", "encoder.block.1-2", "encoder.block.3"]


def test_meta_device_plan_matches_real() -> None:
    cfg = ToyConfig(vocab=128, dim=64, n_layers=8, n_heads=4, max_len=32)
    with torch.device("meta"):
        meta = ToyTransformer(cfg)
    real = ToyTransformer(cfg)
    for target in (None, 200_000):
        assert generic_partition(meta, target_bytes=target) == generic_partition(real, target_bytes=target)
    check_covers(generic_partition(meta), meta)


def test_plan_json_round_trip(tiny_model) -> None:
    _, model, _ = tiny_model
    plan = partition(model, target_bytes=100_000)
    assert Plan.from_json(plan.to_json()) == plan


class _SharedLayer(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.register_buffer("scale", torch.ones(dim))  # persistent: in the plan
        self.register_buffer("cache", torch.zeros(dim), persistent=False)  # not in state_dict nor the plan


class _SharedNet(nn.Module):
    def __init__(self, n: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.layers = nn.ModuleList(_SharedLayer() for _ in range(n))


def test_tensor_shared_between_layers_is_pinned_unless_in_one_block() -> None:
    net = _SharedNet()
    net.layers[1].fc.weight = net.layers[0].fc.weight  # shared by layers 0 and 1
    net.layers[3].fc.bias = net.inp.bias  # shared by layer 3 and a module outside the stack
    plan = generic_partition(net)
    assert [t.key for t in plan.pinned] == ["inp.weight", "inp.bias", "layers.0.fc.weight"]
    assert plan.aliases == {"layers.1.fc.weight": "layers.0.fc.weight", "layers.3.fc.bias": "inp.bias"}
    assert plan.blocks[0].keys == ("layers.0.scale", "layers.0.fc.bias")  # state-dict order, buffer first
    assert plan.blocks[3].keys == ("layers.3.scale", "layers.3.fc.weight")
    assert all("cache" not in k for b in plan.blocks for k in b.keys)
    check_covers(plan, net)
    # packing layers 0 and 1 together makes their shared weight the block's own, and it counts towards the target
    shared = net.layers[0].fc.weight.numel() * 4
    target = plan.blocks[0].nbytes + plan.blocks[1].nbytes + shared
    packed = generic_partition(net, target_bytes=target)
    assert [b.name for b in packed.blocks] == ["layers.0-1", "layers.2", "layers.3"]
    assert "layers.0.fc.weight" in packed.blocks[0].keys and packed.blocks[0].nbytes == target
    assert [t.key for t in packed.pinned] == ["inp.weight", "inp.bias"]
    check_covers(packed, net)
    assert len(generic_partition(net, target_bytes=target - 1).blocks) == 4


class _Sized(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, 4, bias=False)  # 16 * width bytes


@settings(max_examples=40, deadline=None)
@given(widths=st.lists(st.integers(1, 16), min_size=2, max_size=10), target=st.integers(1, 600))
def test_packing_is_greedy_and_ordered(widths: list[int], target: int) -> None:
    with torch.device("meta"):
        net = nn.Sequential(nn.ModuleList(_Sized(w) for w in widths), nn.Linear(2, 2))
    plan = generic_partition(net, target_bytes=target)
    sizes = [16 * w for w in widths]
    assert [m for b in plan.blocks for m in b.modules] == [f"0.{i}" for i in range(len(widths))]
    i = 0
    for b in plan.blocks:
        n = len(b.modules)
        assert b.nbytes == sum(sizes[i : i + n])
        assert n == 1 or b.nbytes <= target
        if i + n < len(widths):  # greedy: the next layer would not have fitted
            assert b.nbytes + sizes[i + n] > target
        i += n


def test_largest_homogeneous_stack_wins() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.small = nn.ModuleList(nn.Linear(4, 4) for _ in range(6))
            self.big = nn.Sequential(*(nn.Linear(16, 16) for _ in range(2)))
            self.mixed = nn.ModuleList([nn.Linear(64, 64), nn.Conv1d(64, 64, 3)])

    plan = generic_partition(Net())
    assert [b.name for b in plan.blocks] == ["big.0", "big.1"]


@pytest.mark.parametrize(
    "model", [nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Linear(4, 4), nn.ModuleList([nn.ReLU(), nn.ReLU()])]
)
def test_no_stack_raises(model: nn.Module) -> None:
    name = type(model).__qualname__
    with pytest.raises(PartitionError, match=rf"no repeated layer stack in {name}.*blockrt.partitioners.register"):
        generic_partition(model)


def test_bad_arguments() -> None:
    model, _ = build_toy(n_layers=2)
    for bad in (0, -5):
        with pytest.raises(ValueError, match="target_bytes must be > 0"):
            partition(model, target_bytes=bad)
        with pytest.raises(ValueError, match="target_bytes must be > 0"):
            generic_partition(model, target_bytes=bad)
    with pytest.raises(TypeError, match="target_bytes"):
        partition(model, target_bytes=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="partitioner must be a callable"):
        partition(model, partitioner="generic")  # type: ignore[arg-type]


class _ToySub(ToyTransformer):
    pass


class _ToySubSub(_ToySub):
    pass


@pytest.fixture
def registered_sub():
    """A partitioner registered for _ToySub, removed afterwards."""

    @register(_ToySub)
    def one_block(model: nn.Module, *, target_bytes: int | None) -> Plan:
        plan = generic_partition(model, target_bytes=1 << 40)
        return Plan(plan.blocks, plan.pinned, plan.aliases, plan.model_class, "one_block")

    yield one_block
    unregister(_ToySub)


def test_registry_dispatch_by_mro(registered_sub) -> None:
    cfg = ToyConfig(vocab=64, dim=32, n_layers=3, n_heads=2, max_len=8)
    with torch.device("meta"):
        base, sub, subsub = ToyTransformer(cfg), _ToySub(cfg), _ToySubSub(cfg)
    assert lookup(_ToySubSub) is registered_sub
    assert partition(base).partitioner == "whole-model"  # the default for unregistered classes
    assert partition(sub).partitioner == "one_block"
    assert partition(subsub).partitioner == "one_block" and partition(subsub).model_class == "_ToySubSub"
    # forcing one overrides the registry
    assert partition(sub, partitioner=generic_partition).partitioner == "generic"
    # a second, different function for the same class is refused
    with pytest.raises(ValueError, match="already registered"):
        register(_ToySub)(generic_partition)
    # a partitioner must return a Plan
    with pytest.raises(TypeError, match="expected a blockrt.Plan"):
        partition(base, partitioner=lambda m, *, target_bytes: None)  # type: ignore[arg-type,return-value]


def test_plan_from_units_rejects_bad_units() -> None:
    from blockrt.partitioners.generic import plan_from_units

    model, _ = build_toy(n_layers=2)
    for units, msg in [
        ([("a", ("layers.9",))], "lacks"),
        ([("a", ("layers.0",)), ("b", ("layers.0",))], "listed twice"),
        ([("a", ("layers.0",)), ("b", ("layers.0.attn",))], "lies inside"),
        ([("a", ("",))], "whole model"),
    ]:
        with pytest.raises(PartitionError, match=msg):
            plan_from_units(model, units, target_bytes=None, partitioner="test")
