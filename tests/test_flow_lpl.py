"""LPL on diffusers' flow-matching schedulers and pipelines (``pipelines/flow_lpl.py``).

- the mathematics, on the scheduler alone: on a straight-line flow (a constant velocity ``v = eps - x0``) the full
  schedule and a leap after any number of calls both land on ``x0`` — bit for bit on a dyadic schedule, within a
  derived fp32 rounding bound on the shifted schedules SD3, Flux, Wan and LTX-Video use;
- the policies: the fixed leap counts model calls; the dynamic leap is Open-Sora's ``DynamicLeap`` deciding on the
  velocities the scheduler is handed (same decision as the policy fed directly);
- tiny random SD3, Flux, Wan and LTX-Video pipelines (builders from ``benchmarks/flow_lpl.py``): the transformer
  is called k times (a forward hook counts; Wan runs CFG as two calls a step), the output is the Euler leap from
  the k-th latent computed by hand from what the transformer saw and returned, ``remove()`` gives back the
  plain pipeline bit for bit, and the leap works on a pipeline whose transformer blockrt streams;
- what is refused (CogVideoX's and UniPC schedulers, a second leap, too many calls) and when (before any call).
"""

from __future__ import annotations

import pytest
import torch

from benchmark_modules import load_benchmark

pytest.importorskip("diffusers")

from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402

from blockrt.pipelines.flow_lpl import DynamicLeap, leap, leap_scheduler  # noqa: E402

bench = load_benchmark("flow_lpl")

STEPS = 5  # pipeline runs: 5 steps, leap after 3 calls
CALLS = 3
U32 = 2.0**-24  # fp32 unit roundoff
CALLS_PER_STEP = {"sd3": 1, "flux": 1, "wan": 2, "ltx": 1}  # Wan runs cond and uncond as two calls

# scheduler configs as the pipelines ship them, with the `mu` their pipelines pass (None without dynamic shifting)
SCHEDULES = {
    "sd3": (dict(shift=3.0), None),
    "flux": (dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15), 0.8),
    "wan": (dict(shift=5.0), None),
    "ltx": (dict(use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05, shift_terminal=0.1), 1.2),
}


def _dyadic(shape, gen, lim=4.0):
    """Values on the 2^-10 grid in [-lim, lim]: sums and products by dyadic steps stay exact in fp32."""
    return (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 * lim - lim).mul(1024).round().div(1024).float()


def _straight_line(sched, eps, x0):
    """Drive ``sched`` over its schedule with the straight line's constant velocity ``eps - x0`` from ``eps``;
    stop at the leap. Returns (final sample, steps taken)."""
    v = eps - x0  # diffusers' sign: x_sigma = (1 - sigma) x0 + sigma eps, v = eps - x0
    x, steps = eps.clone(), 0
    for t in sched.timesteps:
        x = sched.step(v, t, x).prev_sample
        steps += 1
        if getattr(sched, "_leap", None) is not None and sched._leap.leapt_at is not None:
            break
    return x, steps


def _bound(eps, x0, steps):
    """Elementwise fp32 rounding bound for ``steps`` Euler steps ``x += dt v`` with the dt telescoping to -1: each
    step rounds dt (one subtraction), dt·v and the addition, so |x_N - x0| <= u(3|v| + steps·max|x|) to first order
    (max|x| <= max(|eps|, |x0|) on the line); doubled for the second-order terms and the sigmas' own rounding."""
    return 2 * U32 * (3 * (eps - x0).abs() + (steps + 2) * torch.maximum(eps.abs(), x0.abs()))


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_straight_line_full_schedule_and_every_leap_land_on_x0(name):
    config, mu = SCHEDULES[name]
    gen = torch.Generator().manual_seed(0)
    x0, eps = _dyadic((2, 4, 6, 6), gen), _dyadic((2, 4, 6, 6), gen)
    sched = FlowMatchEulerDiscreteScheduler(**config)
    sched.set_timesteps(30, mu=mu)
    assert float(sched.sigmas[0]) == 1.0 and float(sched.sigmas[-1]) == 0.0
    full, steps = _straight_line(sched, eps, x0)
    assert steps == 30 and ((full - x0).abs() <= _bound(eps, x0, 30)).all()
    for k in range(1, 31):
        lpl = leap_scheduler(FlowMatchEulerDiscreteScheduler(**config), k)
        lpl.set_timesteps(30, mu=mu)
        x, steps = _straight_line(lpl, eps, x0)
        assert steps == k and lpl._leap.leapt_at == k - 1
        assert ((x - x0).abs() <= _bound(eps, x0, k)).all(), (name, k, float((x - x0).abs().max()))
        assert ((x - full).abs() <= _bound(eps, x0, k) + _bound(eps, x0, 30)).all()


@pytest.mark.parametrize("k", [None, 1, 2, 3, 4])
def test_straight_line_exact_on_a_dyadic_schedule(k):
    """sigmas 1, .75, .5, .25 (shift 1), values on the 2^-10 grid: every operation is exact, x0 bit for bit."""
    gen = torch.Generator().manual_seed(1)
    x0, eps = _dyadic((1, 16, 8), gen), _dyadic((1, 16, 8), gen)
    sched = FlowMatchEulerDiscreteScheduler(shift=1.0)
    if k is not None:
        sched = leap_scheduler(sched, k)
    sched.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25])
    x, steps = _straight_line(sched, eps, x0)
    assert steps == (4 if k is None else k)
    assert torch.equal(x, x0)


def test_fixed_leap_on_the_scheduler_counts_calls_and_resets_per_sample():
    gen = torch.Generator().manual_seed(2)
    original = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched = leap_scheduler(original, 4)
    assert isinstance(sched, FlowMatchEulerDiscreteScheduler) and type(original) is FlowMatchEulerDiscreteScheduler
    x = torch.randn(1, 4, 4, 4, generator=gen)
    for _ in range(2):  # set_timesteps starts a new sample: the count and the policy reset
        sched.set_timesteps(10)
        z = x.clone()
        for t in sched.timesteps[:4]:
            z = sched.step(torch.ones_like(z), t, z).prev_sample
        assert (sched._leap.calls, sched._leap.leapt_at, sched._leap.num_steps) == (4, 3, 10)
        assert sched.step_index == 4  # the leap is one step of the scheduler's own
        with pytest.raises(RuntimeError, match="after the LPL leap at step 3"):
            sched.step(torch.ones_like(z), sched.timesteps[4], z)
        # one Euler step from sigma_3 to 0 with the 4th velocity (ones): z_3 - sigma_3
        assert torch.allclose(z, x - float(sched.sigmas[0] - 0), atol=1e-6)
    with pytest.raises(ValueError, match="outside the schedule"):
        sched.set_timesteps(3)  # FixedLeap(4) in 3 steps: refused before any model call


def test_dynamic_leap_decides_as_open_soras_policy_on_the_same_velocities():
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(2, 8, 6, generator=gen)
    # velocities whose consecutive cosines rise, then stall: the rule leaps after `patience` stalled steps
    noise = [torch.randn(2, 8, 6, generator=gen) for _ in range(12)]
    scales = [1.0, 0.6, 0.3, 0.15, 0.08, 0.04, 0.02, 0.5, 0.5, 0.5, 0.5, 0.5]
    velocities = [base + s * n for s, n in zip(scales, noise)]
    reference = DynamicLeap(start=2, patience=2)
    reference.reset()
    want = next(i for i, v in enumerate(velocities) if reference.should_leap(i, v, len(velocities)))

    sched = leap_scheduler(FlowMatchEulerDiscreteScheduler(), DynamicLeap(start=2, patience=2))
    sched.set_timesteps(len(velocities))
    z = torch.zeros(2, 8, 6)
    for t, v in zip(sched.timesteps, velocities):
        z = sched.step(v, t, z).prev_sample
        if sched._leap.leapt_at is not None:
            break
    assert 2 <= want < len(velocities) - 1  # the script does leap, and early
    assert sched._leap.leapt_at == want and sched._leap.calls == want + 1
    assert sched._leap.policy.cos_sims == pytest.approx(reference.cos_sims[:want])


# -- pipelines -------------------------------------------------------------------------------------------------


class _Capture:
    """Every transformer call's latent input and output (a removable forward hook)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._h = module.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, out):
        self.calls.append((kwargs["hidden_states"].clone(), out[0].clone()))

    def remove(self) -> None:
        self._h.remove()


def _velocity(name: str, calls: list[tuple[torch.Tensor, torch.Tensor]], step: int, g: float):
    """The latent and the (CFG-combined) velocity of denoising step ``step``, as each pipeline combines them."""
    if name == "wan":  # cond call, then uncond call
        (latent, cond), (_, uncond) = calls[2 * step], calls[2 * step + 1]
        return latent, uncond + g * (cond - uncond)
    latent_in, out = calls[step]
    if name == "flux":  # guidance-distilled: no CFG batch
        return latent_in, out
    out = out.float() if name == "ltx" else out
    uncond, text = out.chunk(2)  # (2B, ...): uncond rows first
    return latent_in.chunk(2)[0], uncond + g * (text - uncond)


@pytest.fixture(scope="module")
def built():
    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = bench.BUILDERS[name]("tiny")
        return cache[name]

    return get


@pytest.mark.parametrize("name", ["sd3", "flux", "wan", "ltx"])
def test_pipeline_leap_makes_k_calls_and_lands_on_the_hand_computed_leap(name, built):
    b = built(name)
    plain, calls, _ = bench.run_once(b, STEPS)
    assert calls == STEPS * CALLS_PER_STEP[name]
    original = b.pipe.scheduler
    with leap(b.pipe, CALLS) as lpl:
        cap = _Capture(b.transformer)
        try:
            out, calls, _ = bench.run_once(b, STEPS)
        finally:
            cap.remove()
        sigmas = b.pipe.scheduler.sigmas
    assert calls == len(cap.calls) == CALLS * CALLS_PER_STEP[name]
    assert (lpl.calls, lpl.leapt_at, lpl.num_steps) == (CALLS, CALLS - 1, STEPS)
    latent, v = _velocity(name, cap.calls, CALLS - 1, b.kwargs["guidance_scale"])
    expected = latent + (sigmas[-1] - sigmas[CALLS - 1]) * v  # one Euler step from sigma_{k-1} to 0
    assert float(sigmas[-1]) == 0.0 and out.shape == expected.shape
    assert torch.equal(out, expected)
    assert not torch.equal(out, plain)
    # removed: the pipeline's own scheduler is back and the plain run is reproduced bit for bit
    assert b.pipe.scheduler is original and not lpl.active
    again, calls, _ = bench.run_once(b, STEPS)
    assert calls == STEPS * CALLS_PER_STEP[name] and torch.equal(again, plain)


def test_leap_at_the_last_call_is_the_plain_run_and_dynamic_matches_fixed(built):
    b = built("flux")
    plain, _, _ = bench.run_once(b, STEPS)
    with leap(b.pipe, STEPS) as lpl:
        out, calls, _ = bench.run_once(b, STEPS)
    assert calls == STEPS and lpl.leapt_at == STEPS - 1 and torch.equal(out, plain)
    with leap(b.pipe, CALLS):
        fixed, _, _ = bench.run_once(b, STEPS)
    # tol 1.0 can never be beaten: best is set at the first comparison (call 2), the next call exhausts patience 1
    with leap(b.pipe, DynamicLeap(start=2, patience=1, tol=1.0)) as lpl:
        dynamic, calls, _ = bench.run_once(b, STEPS)
        dynamic2, calls2, _ = bench.run_once(b, STEPS)  # the policy resets for every pipeline call
    assert (calls, calls2, lpl.leapt_at) == (CALLS, CALLS, CALLS - 1) and len(lpl.policy.cos_sims) == CALLS - 1
    assert torch.equal(dynamic, fixed) and torch.equal(dynamic2, fixed)


def test_leap_with_the_transformer_streamed_by_blockrt(built, monkeypatch):
    import blockrt

    b = built("sd3")
    with leap(b.pipe, CALLS):
        want, _, _ = bench.run_once(b, STEPS)
    # the transformer's parameters are meta placeholders between loads: diffusers would infer its execution device
    # from them, so pin it to the CPU here (blockrt.offload does this for a whole pipeline)
    monkeypatch.setattr(type(b.pipe), "_execution_device", property(lambda self: torch.device("cpu")))
    with blockrt.run(b.transformer, budget="8MB") as rt, leap(b.pipe, CALLS) as lpl:
        got, calls, _ = bench.run_once(b, STEPS)
        summary = rt.profile.summary()
    assert calls == CALLS and lpl.calls == CALLS and summary.passes == CALLS
    assert summary.peak_ledger_bytes <= 8_000_000
    assert torch.equal(got, want)


def test_refused_schedulers_pipelines_and_settings(built):
    from diffusers import CogVideoXDDIMScheduler, UniPCMultistepScheduler

    with pytest.raises(TypeError, match="CogVideoXDDIMScheduler.*variance-preserving"):
        leap_scheduler(CogVideoXDDIMScheduler(), 8)
    with pytest.raises(TypeError, match=r"UniPCMultistepScheduler.*FlowMatchEulerDiscreteScheduler\(shift="):
        leap_scheduler(UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction"), 8)
    with pytest.raises(TypeError, match="interrupt"):
        leap(torch.nn.Linear(2, 2), 8)
    for bad in (0, -1, True, 2.5, "fast", None):
        with pytest.raises(ValueError):
            leap_scheduler(FlowMatchEulerDiscreteScheduler(), bad)
    b = built("flux")
    original = b.pipe.scheduler
    with leap(b.pipe, STEPS + 1):
        with pytest.raises(ValueError, match="already leaps"):
            leap(b.pipe, 2)
        cap = _Capture(b.transformer)
        try:
            with pytest.raises(ValueError, match="outside the schedule"):
                bench.run_once(b, STEPS)
        finally:
            cap.remove()
        assert cap.calls == []  # refused before the first model call
    assert b.pipe.scheduler is original


def test_benchmark_prints_calls_for_each_mode(capsys):
    assert bench.main(["--size", "tiny", "--steps", "4", "--calls", "2", "--pipelines", "flux", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[1]: line.split() for line in out.splitlines() if line.startswith("flux ")}
    assert rows["full"][2:4] == ["4", "4"] and rows["LPL"][3:5] == ["2", "2"]  # model calls and forwards
