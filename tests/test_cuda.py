"""CUDA: streaming onto the GPU (pinned staging, side-stream copies, events). Runs only where a GPU is."""

from __future__ import annotations

import pytest
import torch

import blockrt
from blockrt import RunConfig
from models import BUILDERS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
ATOL = 1e-5  # same kernels on the same data; a tolerance only in case of nondeterministic reductions


@pytest.mark.parametrize("depth", [0, 1, 2])
@pytest.mark.parametrize("name", ["toy", "t5_encoder"])
def test_cuda_parity(name, depth):
    model, inputs = BUILDERS[name]()
    with torch.no_grad():
        ref = model.to("cuda")(**{k: v.cuda() for k, v in inputs.items()})
        ref = ref if isinstance(ref, torch.Tensor) else ref.last_hidden_state
        ref = ref.clone()
    model = model.to("cpu")
    cuda_inputs = {k: v.cuda() for k, v in inputs.items()}
    with blockrt.run(model, budget="256MB", config=RunConfig(prefetch_depth=depth, device="cuda")) as rt:
        for _ in range(3):
            out = rt(**cuda_inputs)
            out = out if isinstance(out, torch.Tensor) else out.last_hidden_state
            torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
        assert rt.ledger.peak <= rt.budget
