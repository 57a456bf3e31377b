"""The evicted placeholder (``blockrt/placeholder.py``): every real use raises a ``BlockrtError`` naming the weight,
its block and the fix (torch 2.13's CPU matmul with a plain ``meta`` operand returns garbage instead), while
``meta``-only work (planning a skeleton, ``state_dict``, ``nn.Parameter`` bookkeeping) still runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from blockrt.binding import Binder
from blockrt.errors import BlockrtError
from blockrt.placeholder import Evicted


def _evicted_linear() -> tuple[nn.Linear, nn.Parameter]:
    lin = nn.Linear(8, 4)
    weight = lin.weight
    Binder(lin)._swap("weight", Evicted((4, 8), torch.float32, "weight", "block 'b0'"))
    return lin, weight


@pytest.mark.parametrize("use", [
    lambda lin, x: lin(x),
    lambda lin, x: x @ lin.weight.t(),
    lambda lin, x: F.linear(x, lin.weight),
    lambda lin, x: lin.weight * torch.tensor(2.0),  # a CPU scalar tensor mixes with plain meta silently
    lambda lin, x: lin.weight.detach().copy_(torch.zeros(4, 8)),  # load_state_dict into an evicted model
])
def test_every_real_use_raises_naming_the_weight_block_and_fix(use):
    lin, _ = _evicted_linear()
    with pytest.raises(BlockrtError, match=r"'weight' \(block \"block 'b0'\"\).*evicted meta placeholder.*pin="):
        use(lin, torch.randn(2, 8))


def test_torch_itself_would_compute_garbage_with_a_plain_meta_weight():
    """Why the placeholder exists: this is the silent wrong output it turns into an error."""
    out = torch.randn(2, 8) @ torch.empty(8, 4, device="meta")
    assert out.device.type == "cpu" and out.shape == (2, 4)


def test_the_parameter_keeps_identity_and_metadata():
    lin, weight = _evicted_linear()
    assert lin.weight is weight and isinstance(weight, nn.Parameter) and weight.requires_grad
    assert weight.is_meta and weight.shape == (4, 8) and weight.dtype == torch.float32
    assert "Evicted('weight'" in repr(weight)
    Binder(lin)._swap("weight", torch.ones(4, 8))
    assert lin.weight is weight and type(weight) is nn.Parameter and torch.equal(lin(torch.zeros(1, 8)), lin.bias[None])


def test_meta_only_work_still_runs_and_stays_a_placeholder():
    lin, _ = _evicted_linear()
    out = lin.to("meta")(torch.randn(3, 8, device="meta"))
    assert out.is_meta and out.shape == (3, 4)
    sd = lin.state_dict()
    assert isinstance(sd["weight"], Evicted) and sd["weight"].key == "weight"
