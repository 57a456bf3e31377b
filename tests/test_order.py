"""The prefetch follows the order blocks really run in, learned by ``blockrt/order.py``, for the loops the issue
names: classifier-free guidance (the denoiser twice per step inside one pipeline call), chunked VAE decoding (the
decoder once per slice), Flux's two stacks (dual-stream then single-stream) and T5's generate (the encoder once,
then the decoder per token).

What is asserted is what the runtime records, never timing: with retention off and one block of lookahead, a
block whose turn comes is either already requested by the prefetch (a hit) or requested on demand inside its own
acquire (a miss: the order predicted something else). A learned order misses only where a loop is entered or
left, a bounded number of times per pass whatever the number of steps; plan order taken as a cycle (what the
runtime assumed before) would miss at every turn of a loop, which each test also counts on the same run.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import blockrt
from blockrt.order import START
from test_generate import _generate, _same, _t5
from zoo_models import build

ROOMY = 10**10
STREAM = blockrt.RunConfig(prefetch_depth=1, retention=False)  # every turn of a block needs a read


class Spy:
    """Records, per pass, the blocks acquired in order and those requested on demand (misses)."""

    def __init__(self, rt) -> None:
        self.rt, res = rt, rt._residency
        self.turns: dict[int, list[int]] = {}
        self.misses: dict[int, list[int]] = {}
        acquire, request, inside = res.acquire, res._request, [None]

        def spied_acquire(i: int) -> None:
            self.turns.setdefault(res.tag, []).append(i)
            inside[0] = i
            try:
                acquire(i)
            finally:
                inside[0] = None

        def spied_request(j: int, slot, pass_idx: int) -> None:
            if inside[0] == j:  # requested inside its own acquire: the prefetch had not asked for it
                self.misses.setdefault(res.tag, []).append(j)
            request(j, slot, pass_idx)

        res.acquire, res._request = spied_acquire, spied_request

    def missed(self, p: int) -> int:
        return len(self.misses.get(p, []))

    def plan_order_misses(self, p: int) -> int:
        """What a cyclic plan-order guess (block i+1 after block i, block 0 after the last) misses on pass ``p``."""
        n, seq = len(self.rt.plan.blocks), self.turns[p]
        prev = self.turns.get(p - 1, [n - 1])[-1]
        misses = 0
        for i in seq:
            misses += i != (prev + 1) % n
            prev = i
        return misses


def run_passes(model, budget: int, call, passes: int, config=STREAM) -> tuple[object, Spy]:
    """``call(rt)`` ``passes`` times, every output equal to the plain model's; the runtime (closed) and its spy."""
    with torch.no_grad():
        ref = call(model)
    with blockrt.run(model, budget=budget, config=config) as rt:
        spy = Spy(rt)
        for _ in range(passes):
            out = call(rt)
            assert torch.equal(out, ref)
    return rt, spy


class _Stack(nn.Module):
    def __init__(self, n: int, dim: int = 64) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


class _CFGPipeline(nn.Module):
    """A text encoder run for the prompt and the negative prompt, then a denoiser twice per step (unconditional
    and conditional, as diffusers' pipelines do without batching), all inside one call."""

    def __init__(self) -> None:
        super().__init__()
        self.text_encoder, self.denoiser = _Stack(3), _Stack(4)

    def forward(self, prompt: torch.Tensor, negative: torch.Tensor, latents: torch.Tensor, steps: int) -> torch.Tensor:
        cond, uncond = self.text_encoder(prompt), self.text_encoder(negative)
        for _ in range(steps):
            eps_u, eps_c = self.denoiser(latents + uncond), self.denoiser(latents + cond)
            latents = latents - 0.1 * (eps_u + 7.5 * (eps_c - eps_u))
        return latents


@pytest.mark.parametrize("steps", [2, 5])
def test_cfg_two_denoiser_calls_per_step(steps):
    torch.manual_seed(0)
    model = _CFGPipeline().eval()
    x = [torch.randn(2, 64) for _ in range(3)]
    rt, spy = run_passes(model, ROOMY, lambda m: m(*x, steps), 4,
                         blockrt.RunConfig(prefetch_depth=1, retention=False, target_block_bytes=1))
    names = [b.name for b in rt.plan.blocks]
    assert len(names) == 7  # a layer a block
    for p in (2, 3):
        assert len(spy.turns[p]) == 2 * 3 + 2 * steps * 4
        # wrong only where a stack is entered from elsewhere than last time: the text encoder's second call
        # (its last layer led to the denoiser last time) and the denoiser's first (its last layer led to the
        # pass's end); whatever the number of steps
        assert spy.misses[p] == [names.index("text_encoder.layers.0"), names.index("denoiser.layers.0")]
        assert spy.plan_order_misses(p) >= 2 * steps  # every denoiser turn back, and the text encoder's
    order = rt._residency.order
    first = names.index("denoiser.layers.0")
    assert order.upcoming(first)[:3] == ((first + 1, False), (first + 2, False), (first + 3, False))
    assert order.successor(START) == names.index("text_encoder.layers.0")


def test_chunked_vae_decoding_the_decoder_once_per_slice():
    model, _ = build("vae_decode")
    model.vae.enable_slicing()  # decode() runs the decoder once per latent in the batch
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    rt, spy = run_passes(model, ROOMY, lambda m: m(z), 4)
    decoder = [i for i, b in enumerate(rt.plan.blocks) if b.name.startswith("vae.decoder.")]
    for p in (1, 2, 3):
        assert sorted(spy.turns[p]) == sorted(decoder * 3)  # three slices, the encoder never
        assert spy.missed(p) == 0, spy.misses[p]  # the last up block leads back to conv_in, then out
        assert spy.plan_order_misses(p) >= 3 * 2  # its mid block is registered after its up blocks
    encoder = {b.name for b in rt.plan.blocks if b.name.startswith("vae.encoder.")}
    guessed = {e.pass_idx for e in rt.profile.events if e.kind == "load" and e.block in encoder}
    assert guessed <= {0, 1}  # plan order's guesses before the first pass taught the order; never after


def test_flux_dual_then_single_stream_stacks():
    model, kwargs = build("flux")
    rt, spy = run_passes(model, ROOMY, lambda m: m(**kwargs).sample, 4)
    names = [b.name for b in rt.plan.blocks]
    dual = [i for i, n in enumerate(names) if n.startswith("transformer_blocks.")]
    single = [i for i, n in enumerate(names) if n.startswith("single_transformer_blocks.")]
    for p in (1, 2, 3):
        turns = spy.turns[p]
        assert turns.index(single[0]) == turns.index(dual[-1]) + 1  # the two stacks, in that order
        # every turn was prefetched. Block 0 packs x_embedder and time_text_embed, registered in one order and run
        # in the other: the block is released after the module that returned last in its previous pass
        # (Order.ends_block), not after x_embedder, so it is entered once a pass
        assert spy.missed(p) == 0 and turns[0] == 0 and turns[1] != 0, (spy.misses.get(p), turns[:3])
        loads = [e.block for e in rt.profile.events if e.kind == "load" and e.pass_idx == p]
        assert all(loads.count(names[i]) == 1 for i in dual + single)  # each stack block read once a pass
        assert loads.count(names[0]) <= 1  # block 0: at most once (retained here under the roomy budget)


def test_t5_generate_encoder_once_then_decoder_per_token():
    ids = torch.randint(1, 256, (2, 6), generator=torch.Generator().manual_seed(1))
    ref = _generate(_t5(), ids)
    model = _t5()
    with blockrt.run(model, budget=ROOMY, config=STREAM) as rt:
        spy = Spy(rt)
        for _ in range(2):
            assert _same(_generate(model, ids), ref)
    names = [b.name for b in rt.plan.blocks]
    encoder = {i for i, n in enumerate(names) if n.startswith("encoder.")}
    with_encoder = sorted(p for p, turns in spy.turns.items() if encoder & set(turns))
    assert with_encoder == [0, 8]  # called through get_encoder() before each generate's first decoder pass
    for p, turns in spy.turns.items():
        if p in with_encoder or p - 1 in with_encoder:
            continue  # the first decoder-only pass learns where a pass starts now
        assert spy.missed(p) == 0, (p, spy.misses[p])  # the decoder's last block leads to its first
        assert spy.plan_order_misses(p) == 1  # plan order would guess the encoder's first block there
    loaded_encoder = {e.pass_idx for e in rt.profile.events if e.kind == "load" and e.block in
                      {names[i] for i in encoder}}
    # the encoder is read when it runs; the pass after it its first block is guessed once more (the decoder's last
    # block led to the encoder the last time it ran: the exit of a loop is learned one turn late), never after
    assert loaded_encoder == {0, 1, 8, 9}
