"""``blockrt.offload``: every model of a tiny random diffusers pipeline (SD3, Flux, Wan, LTX-Video, CogVideoX)
streamed under one budget; images and videos ``torch.equal`` to the plain pipeline's, peak ledger and RSS growth
under the budget, and after ``remove()`` the pipeline runs as before on its own weights."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import blockrt  # noqa: E402
from blockrt import RunConfig  # noqa: E402
from blockrt.memory import RssSampler  # noqa: E402
from tiny_pipelines import BUILDERS, output  # noqa: E402

BUDGET = 2_000_000  # bytes; the tiny pipelines' models are 0.6-1.2 MB together, the largest 0.6 MB
# the video VAE decoders run Conv3d through torch's CPU slow_conv3d, whose im2col columns are part of the
# measured working set: LTX needs 9.4 MB (7.9 MB of columns in its last up block), CogVideoX 2.3 MB
BUDGETS = {"ltx": 10_000_000, "cogvideox": 3_000_000}
RSS_SLACK = 64 << 20  # memory outside any ledger (allocator, thread stacks), as tests/test_retention.py allows


def _tensors(pipe) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": t for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)
            for k, t in [*m.named_parameters(), *m.named_buffers()]}


# two in the default run (about 15 s each on 2 shared cores), all five with -m slow
DEFAULT = ("flux", "ltx")


@pytest.mark.parametrize("name", [n if n in DEFAULT else pytest.param(n, marks=pytest.mark.slow) for n in sorted(BUILDERS)])
def test_offload_equals_plain_pipeline(name: str) -> None:
    pipe, kwargs = BUILDERS[name]()
    pipe.set_progress_bar_config(disable=True)
    want = output(pipe(**kwargs()))
    before = _tensors(pipe)
    values = {k: t.detach().clone() for k, t in before.items()}
    budget = BUDGETS.get(name, BUDGET)
    off = blockrt.offload(pipe, budget=budget, config=RunConfig(exact_rss=True))
    try:
        streamed = [k for k, t in _tensors(pipe).items() if t.is_meta]
        assert len(streamed) > 0.9 * len(before)  # the models hold (almost) nothing between calls
        with RssSampler() as rss:
            got = output(pipe(**kwargs()))
        assert torch.equal(got, want)
        report = off.report()
        ran = {s for s, r in report.items() if r["activations"]}
        assert "transformer" in ran and "vae.decoder" in ran and any(s.startswith("text_encoder") for s in ran)
        assert all(r["passes"] >= 1 for s, r in report.items() if s in ran)
        assert off.peak_ledger_bytes <= budget
        assert rss.peak_anon_delta <= budget + RSS_SLACK
        assert torch.equal(output(pipe(**kwargs())), want)  # a second call: every stage opens again
        off.release()  # the last stage's runtime closes: the models hold nothing again
        assert off.active is None and all(t.is_meta for k, t in _tensors(pipe).items() if k in streamed)
    finally:
        off.remove()
    after = _tensors(pipe)
    assert all(after[k] is before[k] and torch.equal(after[k], values[k]) for k in before)  # the same objects, values
    assert not any(hasattr(m, "_hf_hook") for m in pipe.components.values())
    assert torch.equal(output(pipe(**kwargs())), want)


def test_offload_refuses_a_budget_a_stage_cannot_fit() -> None:
    pipe, _ = BUILDERS["flux"]()
    before = {k: t.detach().clone() for k, t in _tensors(pipe).items()}
    with pytest.raises(blockrt.BudgetError, match="stage .text_encoder.: budget"):
        blockrt.offload(pipe, budget=100_000)
    after = _tensors(pipe)  # a failed set-up gives everything back
    assert all(not after[k].is_meta and torch.equal(after[k], v) for k, v in before.items())
