"""RFLOW sampler and LPL policies (pipelines/opensora/sampler.py, lpl.py) against the design spec §4.

- the schedule: the spec's 240p/51-frame table (fp32 t' to 3 decimals, the bf16 values exactly), the ratios and
  end values listed for other sizes;
- the loop: bit-exact against a transcription of Open-Sora v1.2's RFLOW.sample (per-sample [n] timestep tensors,
  bf16 noise, mask path), and on straight-line flows (v = x0 - eps) the 30-step Euler result and a leap at any
  step land on x0 — exactly on a dyadic schedule, within a derived fp32 rounding bound on the real one;
- CFG order, the mask path, LPL (fixed and dynamic, scripted cosine sequences), policy resets, bad input.
"""

from __future__ import annotations

import math

import pytest
import torch

from blockrt.pipelines.opensora.lpl import DynamicLeap, FixedLeap, LeapPolicy, NoLeap, authors_cosine, latent_cosine
from blockrt.pipelines.opensora.sampler import (
    SampleResult,
    SamplerConfig,
    initial_noise,
    model_timestep,
    sample,
    timestep_ratio,
    timesteps,
)

# Spec §4.2, 240p 9:16 (240x426), 51 frames, 30 steps.
SPEC_240P_T = [
    1000, 985.962, 971.352, 956.134, 940.271, 923.719, 906.433, 888.363, 869.454, 849.648, 828.877, 807.070,
    784.148, 760.023, 734.597, 707.763, 679.399, 649.372, 617.530, 583.704, 547.703, 509.310, 468.278, 424.325,
    377.129, 326.316, 271.454, 212.038, 147.479, 77.076,
]
SPEC_240P_BF16 = [
    1000, 984, 972, 956, 940, 924, 908, 888, 868, 848, 828, 808, 784, 760, 736, 708, 680, 648, 616, 584, 548, 510,
    468, 424, 378, 326, 272, 212, 147, 77,
]
SPEC_3DP = 5e-4 + 1e-6  # the table's precision: 3 decimals (half a unit), plus fp32 print noise
SPEC_2DP = 5e-3 + 1e-5
U32 = 2.0**-24  # fp32 unit roundoff
U64 = 2.0**-53


def _model_from_v(v: torch.Tensor, extra_channels: int = 4):
    """model_fn returning the same velocity for the cond and uncond halves (CFG = identity), plus NaN channels
    (Open-Sora's unused sigma channels) that must never be read."""

    def fn(z_in, t_in, i, x_mask):
        out = torch.cat([v, v], 0)
        return torch.cat([out, torch.full_like(out[:, :extra_channels], float("nan"))], 1)

    return fn


def _toy_model(z_in, t_in, i, x_mask):
    """Nonlinear, time- and row-dependent model; casts inputs to bf16 first like STDiT3.forward."""
    x = z_in.to(torch.bfloat16).float()
    t = model_timestep(t_in).float().view(-1, 1, 1, 1, 1) / 1000
    rows = torch.linspace(-1.0, 1.0, x.shape[0]).view(-1, 1, 1, 1, 1)
    v = torch.tanh(0.7 * x + rows) - t * x
    if x_mask is not None:  # like STDiT3: frames with x_mask False are treated differently, True is a no-op
        v = torch.where(x_mask[:, None, :, None, None], v, 0.5 * v)
    return torch.cat([v, torch.full_like(v, float("nan"))], 1)


def _reference_rflow(model, z, ts, cfg_scale, mask=None, generator=None, leap_at=None):
    """Open-Sora v1.2 RFLOW.sample (opensora/schedulers/rf/__init__.py), transcribed: [n] fp32 timestep tensors,
    add_noise with its `timepoints` arithmetic, chunk(2, dim=1)[0] for the velocity, the On-device Sora leap."""
    n = z.shape[0]
    timesteps_ = [torch.tensor([float(t)] * n) for t in ts]
    if mask is not None:
        noise_added = torch.zeros_like(mask, dtype=torch.bool)
        noise_added = noise_added | (mask == 1)
    for i, t in enumerate(timesteps_):
        x_mask = None
        if mask is not None:
            mask_t = mask * 1000
            x0 = z.clone()
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)  # randn_like(x0)
            timepoints = 1 - t.float() / 1000
            timepoints = timepoints.unsqueeze(1).unsqueeze(1).unsqueeze(1).unsqueeze(1)
            timepoints = timepoints.repeat(1, *noise.shape[1:])
            x_noise = timepoints * x0 + (1 - timepoints) * noise
            mask_t_upper = mask_t >= t.unsqueeze(1)
            x_mask = mask_t_upper.repeat(2, 1)
            mask_add_noise = mask_t_upper & ~noise_added
            z = torch.where(mask_add_noise[:, None, :, None, None], x_noise, x0)
            noise_added = mask_t_upper
        z_in = torch.cat([z, z], 0)
        t = torch.cat([t, t], 0)
        pred = model(z_in, t, i, x_mask).chunk(2, dim=1)[0]
        pred_cond, pred_uncond = pred.chunk(2, dim=0)
        v_pred = pred_uncond + cfg_scale * (pred_cond - pred_uncond)
        dt = timesteps_[i] - timesteps_[i + 1] if i < len(timesteps_) - 1 else timesteps_[i]
        if i == leap_at:
            dt = timesteps_[i]
        dt = dt / 1000
        z = z + v_pred * dt[:, None, None, None, None]
        if mask is not None:
            z = torch.where(mask_t_upper[:, None, :, None, None], z, x0)
        if i == leap_at:
            return z
    return z


def _dyadic(shape, gen, lim=4.0):
    """Random values on the 2^-10 grid in [-lim, lim]: sums/differences/products by dyadic dt stay exact in fp32."""
    return (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 * lim - lim).mul(1024).round().div(1024).float()


# ---------------------------------------------------------------------------------------------------------------
# schedule


def test_schedule_240p_matches_spec_table():
    ts = timesteps(30, height=240, width=426, num_frames=51)
    assert ts.dtype == torch.float32 and ts.shape == (30,)
    assert timestep_ratio(240, 426, 51) == 2.421875  # bf16 arithmetic, not 2.4187
    assert torch.allclose(ts.double(), torch.tensor(SPEC_240P_T, dtype=torch.float64), rtol=0, atol=SPEC_3DP)
    assert model_timestep(ts).dtype == torch.bfloat16
    assert model_timestep(ts).float().tolist() == [float(x) for x in SPEC_240P_BF16]
    assert SamplerConfig().timesteps(height=240, width=426, num_frames=51).equal(ts)


@pytest.mark.parametrize(
    "h, w, frames, ratio, head, tail",
    [
        (480, 854, 51, 4.84375, [1000, 992.93, 985.47], [349.89, 257.05, 143.12]),
        (720, 1280, 102, 10.25, [1000, 996.65, 993.08], [532.47, 422.68, 261.15]),
        (360, 640, 102, 5.125, None, None),
        (240, 426, 1, 0.625, None, None),
    ],
)
def test_schedule_other_sizes(h, w, frames, ratio, head, tail):
    assert timestep_ratio(h, w, frames) == ratio
    ts = timesteps(30, height=h, width=w, num_frames=frames).double()
    assert ts[0] == 1000 and (ts[1:] < ts[:-1]).all()
    if head is not None:
        assert torch.allclose(ts[:3], torch.tensor(head, dtype=torch.float64), rtol=0, atol=SPEC_2DP)
        assert torch.allclose(ts[-3:], torch.tensor(tail, dtype=torch.float64), rtol=0, atol=SPEC_2DP)
    if ratio < 1:  # a single image is shifted toward less noise
        assert (ts[1:] < timesteps(30, height=h, width=w, num_frames=frames, transform=False)[1:]).all()


def test_schedule_without_transform_and_discrete():
    ts = timesteps(30, height=240, width=426, num_frames=51, transform=False)
    assert ts.tolist() == torch.tensor([(1.0 - i / 30) * 1000 for i in range(30)], dtype=torch.float32).tolist()
    assert ts[1].item() == pytest.approx(966.6667, abs=1e-4)
    disc = timesteps(30, height=240, width=426, num_frames=51, transform=False, discrete=True)
    assert disc[1].item() == 967.0 and disc[-1].item() == 33.0


# ---------------------------------------------------------------------------------------------------------------
# loop: exactness


@pytest.mark.parametrize("leap_at", [None, 0, 17, 29])
@pytest.mark.parametrize("with_mask", [False, True])
def test_loop_bit_exact_vs_open_sora_transcription(leap_at, with_mask):
    gen = torch.Generator().manual_seed(7)
    z = initial_noise((2, 4, 5, 6, 7), gen)  # bf16, as Open-Sora
    ts = timesteps(30, height=240, width=426, num_frames=51)
    mask = torch.tensor([[0.0, 0.5, 1, 1, 1], [1, 1, 0.25, 1, 0]]) if with_mask else None
    state = gen.get_state()
    ref = _reference_rflow(_toy_model, z, ts, 7.0, mask=mask, generator=gen, leap_at=leap_at)
    gen.set_state(state)
    policy = None if leap_at is None else FixedLeap(leap_at + 1)
    res = sample(_toy_model, z, ts, cfg_scale=7.0, policy=policy, mask=mask, generator=gen)
    assert res.z.dtype == torch.float32 == ref.dtype
    assert torch.equal(res.z, ref)
    assert res.steps_run == (30 if leap_at is None else leap_at + 1)
    assert res.leapt_at == leap_at
    assert len(res.cos_sims) == res.steps_run - 1 and len(res.velocity_rms) == res.steps_run


def test_model_inputs_dtypes_and_timesteps():
    seen = []

    def fn(z_in, t_in, i, x_mask):
        seen.append((z_in.dtype, z_in.shape, t_in.clone(), i, x_mask))
        return _toy_model(z_in, t_in, i, x_mask)

    z = initial_noise((1, 4, 3, 4, 4), 42)
    ts = timesteps(30, height=240, width=426, num_frames=51)
    sample(fn, z, ts, cfg_scale=7.0)
    assert [s[3] for s in seen] == list(range(30))
    assert seen[0][0] == torch.bfloat16 and all(s[0] == torch.float32 for s in seen[1:])  # fp32 after step 1
    assert all(s[1] == (2, 4, 3, 4, 4) and s[4] is None for s in seen)
    t_in = torch.stack([s[2] for s in seen])  # (30, 2n)
    assert t_in.dtype == torch.float32 and torch.equal(t_in, ts[:, None].expand(30, 2))
    assert model_timestep(t_in[:, 0]).float().tolist() == [float(x) for x in SPEC_240P_BF16]


def _euler_bound(eps, x0, v, steps, u):
    """Elementwise rounding bound for `steps` Euler steps z += v·dt_i with Σdt = 1 (telescoping, t'_0 = 1000
    exactly): each step rounds v·dt (and dt itself: subtraction + division, 2 roundings) and the addition, so
    |z_N − x0| ≤ u(3|v| + steps·max|z|) to first order, max|z| ≤ max(|eps|, |x0|) on a straight line.
    Doubled for the second-order terms."""
    return 2 * u * (3 * v.abs() + steps * torch.maximum(eps.abs(), x0.abs()))


@pytest.mark.parametrize("leap_at", [None, *range(30)])
def test_straight_line_flow_lands_on_x0(leap_at):
    gen = torch.Generator().manual_seed(0)
    shape = (1, 4, 3, 5, 6)
    x0, eps = _dyadic(shape, gen), _dyadic(shape, gen)
    v = x0 - eps  # exact (both on the 2^-10 grid)
    ts = timesteps(30, height=240, width=426, num_frames=51)
    policy = None if leap_at is None else FixedLeap(leap_at + 1)
    res = sample(_model_from_v(v), eps.clone(), ts, cfg_scale=7.0, policy=policy)
    steps = 30 if leap_at is None else leap_at + 1
    assert res.steps_run == steps
    assert ((res.z - x0).abs() <= _euler_bound(eps, x0, v, steps, U32)).all()
    # the same in float64: the algorithm, not the rounding, lands on x0
    res64 = sample(_model_from_v(v.double()), eps.double(), ts.double(), cfg_scale=7.0,
                   policy=None if leap_at is None else FixedLeap(leap_at + 1))
    assert ((res64.z - x0.double()).abs() <= _euler_bound(eps, x0, v, steps, U64).double()).all()


@pytest.mark.parametrize("leap_at", [None, 0, 1, 2, 3])
def test_straight_line_flow_exact_on_dyadic_schedule(leap_at):
    """With dt = 0.25 steps and values on the 2^-10 grid every operation is exact in fp32: x0 bit for bit."""
    gen = torch.Generator().manual_seed(1)
    x0, eps = _dyadic((2, 4, 3, 5, 6), gen), _dyadic((2, 4, 3, 5, 6), gen)
    ts = torch.tensor([1000.0, 750.0, 500.0, 250.0])
    res = sample(_model_from_v(x0 - eps), eps.clone(), ts, cfg_scale=7.0,
                 policy=None if leap_at is None else FixedLeap(leap_at + 1))
    assert torch.equal(res.z, x0)


# ---------------------------------------------------------------------------------------------------------------
# CFG and mask


def test_cfg_combines_cond_rows_first():
    n, C = 2, 4
    shape = (n, C, 2, 3, 3)

    def fn(z_in, t_in, i, x_mask):
        out = torch.empty(2 * n, 2 * C, *shape[2:])
        for j in range(n):
            out[j, :C] = j + 1.0  # cond rows: 1, 2
            out[n + j, :C] = 10.0 * (j + 1)  # uncond rows: 10, 20
        out[:, C:] = float("nan")  # sigma channels, never read
        return out

    res = sample(fn, torch.zeros(shape), torch.tensor([1000.0]), cfg_scale=7.0)  # one step, dt = 1: z = v
    # v = v_u + s (v_c - v_u): 10 + 7(1 - 10) = -53, 20 + 7(2 - 20) = -106 (swapped halves would give 64, 128)
    assert torch.equal(res.z[0], torch.full(shape[1:], -53.0)) and torch.equal(res.z[1], torch.full(shape[1:], -106.0))


def test_mask_zero_frames_stay_exactly_the_reference():
    gen = torch.Generator().manual_seed(3)
    z = initial_noise((1, 4, 5, 6, 7), gen)
    reference = torch.randn((1, 4, 2, 6, 7), generator=gen).to(torch.bfloat16)
    z[:, :, :2] = reference  # conditioning latent frames (e.g. a VAE-encoded first image)
    mask = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0]])
    seen = []

    def fn(z_in, t_in, i, x_mask):
        seen.append(x_mask.clone())
        assert torch.equal(z_in[:, :, :2].float(), reference.float().expand(2, -1, -1, -1, -1))
        return _toy_model(z_in, t_in, i, x_mask)

    ts = timesteps(30, height=240, width=426, num_frames=51)
    res = sample(fn, z, ts, cfg_scale=7.0, mask=mask, generator=gen, policy=FixedLeap(21))
    assert torch.equal(res.z[:, :, :2], reference.float())
    assert not torch.equal(res.z[:, :, 2:], z[:, :, 2:].float())
    assert all(torch.equal(m, torch.tensor([[False, False, True, True, True]] * 2)) for m in seen)


def test_all_ones_mask_equals_no_mask():
    """Spec §4.4: Open-Sora's T2V goes through the mask branch with an all-ones mask; numerically a no-op."""
    z = initial_noise((1, 4, 3, 4, 5), 11)
    ts = timesteps(30, height=240, width=426, num_frames=51)
    plain = sample(_toy_model, z, ts, cfg_scale=7.0)
    masked = sample(_toy_model, z, ts, cfg_scale=7.0, mask=torch.ones(1, 3), generator=torch.Generator().manual_seed(0))
    assert torch.equal(plain.z, masked.z)


def test_deterministic_for_a_seed():
    def run():
        g = torch.Generator().manual_seed(5)
        z = initial_noise((1, 4, 5, 4, 4), g)
        return sample(_toy_model, z, timesteps(30, height=240, width=426, num_frames=51), cfg_scale=7.0,
                      mask=torch.tensor([[0.0, 0.3, 1, 1, 1]]), generator=g, policy=DynamicLeap())

    a, b = run(), run()
    assert torch.equal(a.z, b.z) and a.steps_run == b.steps_run and a.cos_sims == b.cos_sims


def test_initial_noise_reproduces_seeded_randn_bf16():
    shape = (1, 4, 15, 30, 53)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(42)
        expected = torch.randn(shape, dtype=torch.bfloat16)
    z = initial_noise(shape, 42)
    assert z.dtype == torch.bfloat16 and torch.equal(z, expected)
    g = torch.Generator().manual_seed(42)
    assert torch.equal(initial_noise(shape, g), expected)
    assert not torch.equal(initial_noise(shape, g), expected)  # the generator's stream continues


def test_progress_reports_every_step():
    calls = []
    ts = timesteps(30, height=240, width=426, num_frames=51)
    sample(_toy_model, initial_noise((1, 4, 2, 2, 2), 0), ts, cfg_scale=7.0, policy=FixedLeap(10),
           progress=lambda done, total: calls.append((done, total)))
    assert calls == [(k, 30) for k in range(1, 11)]


# ---------------------------------------------------------------------------------------------------------------
# dynamic LPL

W = 6
A_ROW = torch.ones(W, dtype=torch.float64) / math.sqrt(W)
B_ROW = torch.tensor([(-1.0) ** k for k in range(W)], dtype=torch.float64) / math.sqrt(W)  # orthogonal to A_ROW


def _rotating(cos_seq: list[float]) -> list[torch.Tensor]:
    """Unit row patterns whose consecutive cosines are cos_seq (entry j: pattern j+1 vs j): rotate in the (a, b)
    plane by arccos(c) each step."""
    phi, rows = 0.0, [A_ROW.clone()]
    for c in cos_seq:
        phi += math.acos(c)
        rows.append(math.cos(phi) * A_ROW + math.sin(phi) * B_ROW)
    return rows


def _scripted_model(velocities: list[torch.Tensor]):
    def fn(z_in, t_in, i, x_mask):
        v = velocities[i]
        return torch.cat([v, v], 0)

    return fn


# the rule from index 14 on: best 0.90, 0.95; 0.9505 (< best + 1e-3: 2 left); 0.96 (best, 3 left); 0.9601 (2);
# 0.955 (1); 0.9605 (< 0.961: 0) -> leap at step 20, 21 model calls
SCRIPTED = [0.5] * 13 + [0.90, 0.95, 0.9505, 0.96, 0.9601, 0.955, 0.9605] + [0.97] * 9  # 29 cosines, steps 1..29
SCRIPTED_LEAP = 20


def _scripted_velocities(shape=(1, 4, 2, 3, W)):
    return [r.float().expand(shape).clone() for r in _rotating(SCRIPTED)]


@pytest.mark.parametrize("similarity", ["latent", "authors"])
def test_dynamic_leap_follows_the_rule(similarity):
    vs = _scripted_velocities()
    policy = DynamicLeap(similarity=similarity)
    res = sample(_scripted_model(vs), torch.zeros_like(vs[0]), timesteps(30, height=240, width=426, num_frames=51),
                 cfg_scale=7.0, policy=policy)
    assert res.leapt_at == SCRIPTED_LEAP == policy.leapt_at and res.steps_run == SCRIPTED_LEAP + 1
    assert policy.cos_sims == pytest.approx(SCRIPTED[:SCRIPTED_LEAP], abs=1e-6)
    assert res.cos_sims == pytest.approx(SCRIPTED[:SCRIPTED_LEAP], abs=1e-6)
    assert [h[0] for h in policy.history] == list(range(14, 21))
    assert [h[3] for h in policy.history] == [3, 3, 2, 3, 2, 1, 0]


def test_dynamic_leap_earliest_and_min_steps():
    """Constant velocity (cos 1): best at index 14, no improvement at 15, 16, 17 -> leap at 17 (18th call)."""
    v = torch.randn(1, 4, 2, 3, 4, generator=torch.Generator().manual_seed(0))
    ts = timesteps(30, height=240, width=426, num_frames=51)
    assert sample(_model_from_v(v), torch.zeros_like(v), ts, cfg_scale=7.0, policy=DynamicLeap()).leapt_at == 17
    held = sample(_model_from_v(v), torch.zeros_like(v), ts, cfg_scale=7.0, policy=DynamicLeap(min_steps=25))
    assert held.leapt_at == 24 and held.steps_run == 25
    late = sample(_model_from_v(v), torch.zeros_like(v), ts, cfg_scale=7.0, policy=DynamicLeap(start=20, patience=5))
    assert late.leapt_at == 24
    never = sample(_model_from_v(v), torch.zeros_like(v), ts, cfg_scale=7.0, policy=DynamicLeap(start=28))
    assert never.leapt_at is None and never.steps_run == 30


def test_latent_and_authors_similarity_differ():
    """Sample 0's channel-0/frame-0 slice is static (the authors' metric sees cos 1 and leaps at 17), while the rest
    of the latent, and all of sample 1, keep converging (+0.02 per step): the whole-latent rule never leaps."""
    improving = _rotating([min(0.1 + 0.02 * k, 0.99) for k in range(29)])
    static = A_ROW
    vs = []
    for i in range(30):
        v = improving[i].float().expand(2, 4, 2, 3, W).clone()
        v[0, 0, 0] = static.float()
        vs.append(v)
    ts = timesteps(30, height=240, width=426, num_frames=51)
    authors = sample(_scripted_model(vs), torch.zeros_like(vs[0]), ts, cfg_scale=7.0,
                     policy=DynamicLeap(similarity="authors"))
    latent = sample(_scripted_model(vs), torch.zeros_like(vs[0]), ts, cfg_scale=7.0, policy=DynamicLeap())
    assert authors.leapt_at == 17
    assert latent.leapt_at is None and latent.steps_run == 30
    assert float(authors_cosine(vs[15], vs[14])) == pytest.approx(1.0, abs=1e-6)
    assert latent_cosine(vs[15], vs[14]).shape == (2,)


def test_policy_state_resets_between_samples():
    vs = _scripted_velocities()
    ts = timesteps(30, height=240, width=426, num_frames=51)
    policy = DynamicLeap()
    # stale state from another run: a high best and an exhausted counter would leap at once without reset()
    for k, v in enumerate(_scripted_velocities()[:20]):
        policy.should_leap(k + 10, v * 0 + vs[0], 30)
    assert policy._best > 0.99
    first = sample(_scripted_model(vs), torch.zeros_like(vs[0]), ts, cfg_scale=7.0, policy=policy)
    first_cos = list(policy.cos_sims)
    second = sample(_scripted_model(vs), torch.zeros_like(vs[0]), ts, cfg_scale=7.0, policy=policy)
    assert first.leapt_at == second.leapt_at == SCRIPTED_LEAP
    assert policy.cos_sims == first_cos and torch.equal(first.z, second.z)
    fixed = FixedLeap(4)
    sample(_scripted_model(vs), torch.zeros_like(vs[0]), ts, cfg_scale=7.0, policy=fixed)
    assert fixed.leapt_at == 3
    fixed.reset()
    assert fixed.leapt_at is None


def test_policies_satisfy_protocol():
    for p in (NoLeap(), FixedLeap(4), DynamicLeap()):
        assert isinstance(p, LeapPolicy)
    assert SampleResult(z=torch.zeros(1), steps_run=1, leapt_at=None).cos_sims == []


# ---------------------------------------------------------------------------------------------------------------
# bad input


def _assert_clear(exc: pytest.ExceptionInfo, *words: str) -> None:
    msg = str(exc.value)
    assert "found" in msg, msg
    for w in words:
        assert w in msg, msg


def test_bad_steps():
    with pytest.raises(ValueError) as e:
        SamplerConfig(num_steps=0)
    _assert_clear(e, "num_steps", ">= 1", "30")
    with pytest.raises(ValueError) as e:
        timesteps(0, height=240, width=426, num_frames=51)
    _assert_clear(e, "num_steps")
    with pytest.raises(ValueError) as e:
        SamplerConfig(num_steps=2.5)  # type: ignore[arg-type]
    _assert_clear(e, "num_steps")


def test_bad_leap_at_fails_before_any_model_call():
    calls = []

    def fn(z_in, t_in, i, x_mask):
        calls.append(i)
        return _toy_model(z_in, t_in, i, x_mask)

    ts = timesteps(30, height=240, width=426, num_frames=51)
    with pytest.raises(ValueError) as e:
        sample(fn, initial_noise((1, 4, 2, 2, 2), 0), ts, cfg_scale=7.0, policy=FixedLeap(31))
    _assert_clear(e, "calls", "1 <= calls <= num_steps = 30", "calls <= 30")
    assert calls == []
    with pytest.raises(ValueError) as e:
        FixedLeap(0)
    _assert_clear(e, "calls", ">= 1")


def test_bad_cfg_scale():
    with pytest.raises(ValueError) as e:
        SamplerConfig(cfg_scale=float("nan"))
    _assert_clear(e, "cfg_scale", "finite", "7.0")
    with pytest.raises(ValueError) as e:
        sample(_toy_model, initial_noise((1, 4, 2, 2, 2), 0), torch.tensor([1000.0]), cfg_scale=float("nan"))
    _assert_clear(e, "cfg_scale")


def test_other_bad_inputs():
    z = initial_noise((1, 4, 3, 2, 2), 0)
    ts = timesteps(30, height=240, width=426, num_frames=51)
    with pytest.raises(ValueError) as e:
        timesteps(30, height=240, width=426, num_frames=16)
    _assert_clear(e, "num_frames", "17")
    with pytest.raises(ValueError) as e:
        sample(_toy_model, z, ts.flip(0), cfg_scale=7.0)
    _assert_clear(e, "strictly decreasing")
    with pytest.raises(ValueError) as e:
        sample(_toy_model, z, ts, cfg_scale=7.0, mask=torch.ones(1, 5))
    _assert_clear(e, "mask", "(1, 3)")
    with pytest.raises(ValueError) as e:
        sample(lambda z_in, t_in, i, x_mask: z_in[:1], z, ts, cfg_scale=7.0)
    _assert_clear(e, "model_fn", "cond rows first")
    with pytest.raises(ValueError) as e:
        sample(_toy_model, z[0], ts, cfg_scale=7.0)
    _assert_clear(e, "(n, C, T, H, W)")
    with pytest.raises(ValueError) as e:
        DynamicLeap(similarity="cosine")
    _assert_clear(e, "latent", "authors")
    with pytest.raises(ValueError) as e:
        DynamicLeap(patience=0)
    _assert_clear(e, "patience")
