"""Open-Sora v1.2's rectified-flow sampler (RFLOW), exact to the original's arithmetic, with LPL leaps.

Design spec §4: ``timesteps`` builds the 30-step schedule with the resolution/length timestep transform (``ratio``
computed in bf16 as the original does, the schedule itself fp32); ``sample`` runs the Euler loop with classifier-free
guidance (cond rows first), the per-frame mask/conditioning path of §4.4 and an optional ``LeapPolicy`` (§4.5).
The model is reached through ``model_fn(z_in, t_in, step, x_mask)``, so the same loop drives the plain STDiT3, a
blockrt-streamed one or a test function.

Dtypes, as in the original: the initial noise is bf16; ``z_in = cat([z, z])`` enters the model in the latent
state's dtype (bf16 at step 0, fp32 afterwards: ``bf16 + fp32`` promotes) and ``t_in`` as fp32. STDiT3.forward
casts both to its weights' dtype, which is where the model "sees t' in bf16" (``model_timestep`` shows the values).
The velocity is fp32 and the returned latent is fp32.

Example:
    >>> cfg = SamplerConfig()
    >>> ts = timesteps(cfg.num_steps, height=240, width=426, num_frames=51)
    >>> g = torch.Generator("cuda").manual_seed(42)
    >>> z = initial_noise((1, 4, 15, 30, 53), g, device="cuda")
    >>> def model_fn(z_in, t_in, step, x_mask):
    ...     return stdit(z_in, t_in, y, mask=tokens_mask, x_mask=x_mask, fps=fps, height=h, width=w)
    >>> res = sample(model_fn, z, ts, cfg_scale=cfg.cfg_scale, policy=DynamicLeap(), generator=g)
    >>> res.z.shape, res.steps_run, res.leapt_at
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from blockrt.pipelines.opensora.lpl import LeapPolicy, NoLeap, latent_cosine

logger = logging.getLogger(__name__)

# Open-Sora v1.2's timestep_transform constants (rectified_flow.py defaults).
BASE_RESOLUTION = 512 * 512
BASE_NUM_FRAMES = 1
TRANSFORM_SCALE = 1.0
FRAMES_PER_CHUNK = 17  # VAE micro-frame size: 17 video frames -> 5 latent frames
LATENTS_PER_CHUNK = 5

ModelFn = Callable[[torch.Tensor, torch.Tensor, int, "torch.Tensor | None"], torch.Tensor]


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_steps(num_steps: object) -> None:
    if not _is_int(num_steps) or num_steps < 1:  # type: ignore[operator]
        raise ValueError(f"num_steps must be an int >= 1 (found {num_steps!r}); Open-Sora v1.2 uses 30")


def _check_num_timesteps(num_timesteps: object) -> None:
    if not _is_int(num_timesteps) or num_timesteps < 1:  # type: ignore[operator]
        raise ValueError(f"num_timesteps must be an int >= 1 (found {num_timesteps!r}); Open-Sora uses 1000")


def _check_cfg_scale(cfg_scale: object) -> float:
    if not _is_real(cfg_scale) or not math.isfinite(cfg_scale):  # type: ignore[arg-type]
        raise ValueError(
            f"cfg_scale must be a finite number (found {cfg_scale!r}); Open-Sora v1.2 uses 7.0 (1.0 = no guidance)"
        )
    return float(cfg_scale)  # type: ignore[arg-type]


@dataclass(frozen=True)
class SamplerConfig:
    """RFLOW settings; the defaults are Open-Sora v1.2's inference config (spec §4.1)."""

    num_steps: int = 30
    cfg_scale: float = 7.0
    use_timestep_transform: bool = True
    num_timesteps: int = 1000

    def __post_init__(self) -> None:
        _check_steps(self.num_steps)
        _check_cfg_scale(self.cfg_scale)
        _check_num_timesteps(self.num_timesteps)
        if not isinstance(self.use_timestep_transform, bool):
            raise ValueError(f"use_timestep_transform must be a bool (found {self.use_timestep_transform!r})")

    def timesteps(self, *, height: int, width: int, num_frames: int) -> torch.Tensor:
        """``timesteps(...)`` with this config's steps, transform switch and ``num_timesteps``."""
        return timesteps(
            self.num_steps, height=height, width=width, num_frames=num_frames,
            transform=self.use_timestep_transform, num_timesteps=self.num_timesteps,
        )


def _ratio_bf16(height: int, width: int, num_frames: int) -> torch.Tensor:
    """Open-Sora's ``ratio`` as the original computes it: on bf16 tensors ``[1]`` (height/width/num_frames come from
    ``prepare_multi_resolution_info`` in the model dtype), so 240x426 -> 102400 px, sqrt(15) -> 3.875."""
    for name, val in (("height", height), ("width", width), ("num_frames", num_frames)):
        if not _is_int(val) or val < 1:
            raise ValueError(f"{name} must be an int >= 1 in pixels/frames (found {val!r}); e.g. 240, 426, 51")
    if num_frames != 1 and num_frames < FRAMES_PER_CHUNK:
        raise ValueError(
            f"num_frames must be 1 (an image) or >= {FRAMES_PER_CHUNK} for Open-Sora's timestep transform "
            f"(found {num_frames}: num_frames // {FRAMES_PER_CHUNK} = 0 gives ratio 0 and a degenerate schedule); "
            f"use 1, 17, 34, 51, ... or transform=False"
        )
    bf16 = torch.bfloat16
    h, w, f = (torch.tensor([float(x)], dtype=bf16) for x in (height, width, num_frames))
    ratio_space = (h * w / BASE_RESOLUTION).sqrt()
    frames = torch.ones_like(f) if num_frames == 1 else f // FRAMES_PER_CHUNK * LATENTS_PER_CHUNK
    ratio_time = (frames / BASE_NUM_FRAMES).sqrt()
    return ratio_space * ratio_time * TRANSFORM_SCALE  # bf16 [1]


def timestep_ratio(height: int, width: int, num_frames: int) -> float:
    """The timestep-transform ``ratio`` for a video size, with the original's bf16 rounding
    (240x426, 51 frames -> 2.421875; 480x854/51 -> 4.84375; 720x1280/102 -> 10.25; 240x426 image -> 0.625)."""
    return float(_ratio_bf16(height, width, num_frames))


def timesteps(
    num_steps: int,
    *,
    height: int,
    width: int,
    num_frames: int,
    transform: bool = True,
    num_timesteps: int = 1000,
    discrete: bool = False,
) -> torch.Tensor:
    """Open-Sora v1.2's RFLOW schedule ``t'_0 > ... > t'_{N-1}`` (fp32 ``[num_steps]``, CPU; spec §4.2).

    ``t_i = (1 - i/N)·num_timesteps`` (computed in Python floats, stored fp32; 0 is never evaluated). With
    ``transform``: ``s = t/num_timesteps``, ``t' = num_timesteps·ratio·s / (1 + (ratio - 1)·s)`` where ``ratio``
    (``timestep_ratio``) is a bf16 value and the products promote to fp32, exactly as the original. The model is fed
    ``t'`` in its own dtype (bf16: ``model_timestep``); ``dt`` uses these fp32 values.

    Args:
        num_steps: sampling steps (>= 1; Open-Sora uses 30).
        height, width: video size in pixels (e.g. 240, 426); num_frames: video frames (1 = image, else >= 17).
        transform: apply the resolution/length shift (Open-Sora v1.2: True).
        num_timesteps: the training time scale (1000).
        discrete: round ``t_i`` to integers before the transform (the On-device Sora fork's default
            ``use_discrete_timesteps=True``; Open-Sora v1.2 uses False).
    """
    _check_steps(num_steps)
    _check_num_timesteps(num_timesteps)
    ts = [(1.0 - i / num_steps) * num_timesteps for i in range(num_steps)]
    if discrete:
        ts = [float(round(t)) for t in ts]
    t = torch.tensor(ts, dtype=torch.float32)
    if not transform:
        for name, val in (("height", height), ("width", width), ("num_frames", num_frames)):
            if not _is_int(val) or val < 1:
                raise ValueError(f"{name} must be an int >= 1 (found {val!r})")
        return t
    ratio = _ratio_bf16(height, width, num_frames)  # bf16 [1]; bf16 [1] x fp32 [N] -> fp32, as in the original
    s = t / num_timesteps
    return ratio * s / (1 + (ratio - 1) * s) * num_timesteps


def model_timestep(t: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The timestep values the model actually sees: ``t`` cast to the model dtype (bf16 for Open-Sora v1.2:
    985.962 -> 984). ``STDiT3.forward`` performs this cast itself; ``sample`` passes fp32 ``t_in``, as the original."""
    return t.to(dtype)


def initial_noise(
    shape: tuple[int, ...] | torch.Size,
    seed: int | torch.Generator,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The initial latent noise as Open-Sora draws it: ``torch.randn(shape, dtype=bf16)`` as the first draw after
    seeding (spec §4.4).

    ``seed`` is an int (a fresh generator on ``device`` seeded with it: the same stream as ``torch.manual_seed(seed)``
    then the first draw, without touching the global RNG) or a ``torch.Generator`` to draw from; pass that same
    generator to ``sample(generator=...)`` and the mask path's per-step noise continues the stream exactly like the
    original's global RNG. Reproducing a published sample bit-for-bit also needs the same device type (CPU and
    CUDA generators differ).
    """
    if isinstance(seed, torch.Generator):
        gen = seed
        device = gen.device if device is None else torch.device(device)
    else:
        if not _is_int(seed):
            raise ValueError(f"seed must be an int or a torch.Generator (found {seed!r}); Open-Sora's config uses 42")
        device = torch.device("cpu" if device is None else device)
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
    return torch.randn(tuple(shape), generator=gen, dtype=dtype, device=device)


@dataclass
class SampleResult:
    """What ``sample`` returns.

    Attributes:
        z: the final latent ``(n, C, T, H, W)`` fp32 (decode with ``vae.decode(z.to(bf16), num_frames)``).
        steps_run: model calls made (each on the 2n CFG batch).
        leapt_at: 0-based step index of the LPL leap, or None when the policy never asked for one (a leap at the
            last index ``len(ts) - 1`` is numerically the plain last step; it is still reported).
        cos_sims: whole-latent cosine similarity of consecutive CFG velocities (entry j: step j+1 vs step j;
            with several samples the smallest over the batch); ``steps_run - 1`` entries.
        velocity_rms: root-mean-square of the CFG velocity at each step.
    """

    z: torch.Tensor
    steps_run: int
    leapt_at: int | None
    cos_sims: list[float] = field(default_factory=list)
    velocity_rms: list[float] = field(default_factory=list)


def _check_inputs(z: torch.Tensor, ts: torch.Tensor, mask: torch.Tensor | None, num_timesteps: int) -> None:
    if not isinstance(z, torch.Tensor) or z.ndim != 5 or not z.is_floating_point():
        found = f"{tuple(z.shape)} {z.dtype}" if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"z must be a floating latent (n, C, T, H, W) (found {found}); see initial_noise()")
    if not isinstance(ts, torch.Tensor) or ts.ndim != 1 or ts.numel() < 1 or not ts.is_floating_point():
        found = f"{tuple(ts.shape)} {ts.dtype}" if isinstance(ts, torch.Tensor) else type(ts).__name__
        raise ValueError(
            f"ts must be a 1-D floating tensor of >= 1 timesteps (found {found}); build it with timesteps()"
        )
    tl = ts.detach().double().cpu()
    if not torch.isfinite(tl).all() or (tl <= 0).any() or (tl > num_timesteps).any() or (tl[1:] >= tl[:-1]).any():
        raise ValueError(
            f"ts must be strictly decreasing values in (0, {num_timesteps}] (found {tl.tolist()}); build it with "
            "timesteps()"
        )
    if mask is not None:
        n, T = z.shape[0], z.shape[2]
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (n, T):
            found = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(
                f"mask must be (n, T) = ({n}, {T}), one value per sample and latent frame (found {found}); "
                "1 = generate, 0 = keep the frame of z fixed, in between = re-noise partially (edit_ratio)"
            )
        m = mask.detach().double().cpu()
        if not torch.isfinite(m).all() or (m < 0).any() or (m > 1).any():
            raise ValueError(f"mask values must lie in [0, 1] (found {m.tolist()})")


def _add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, num_timesteps: int) -> torch.Tensor:
    """``RFlowScheduler.add_noise`` with its exact arithmetic: ``tp·x0 + (1 - tp)·noise`` with
    ``tp = 1 - t/num_timesteps`` in fp32 (so a bf16 x0 comes out fp32)."""
    tp = (1 - t.float() / num_timesteps).reshape(-1, 1, 1, 1, 1)  # [1,1,1,1,1], dim'd so it promotes like [n,...]
    return tp * x0 + (1 - tp) * noise


@torch.no_grad()
def sample(
    model_fn: ModelFn,
    z: torch.Tensor,
    ts: torch.Tensor,
    *,
    cfg_scale: float,
    policy: LeapPolicy | None = None,
    mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    progress: Callable[[int, int], None] | None = None,
    num_timesteps: int = 1000,
) -> SampleResult:
    """Run the RFLOW loop (spec §4.3–§4.5) from noise ``z`` over the schedule ``ts``.

    Per step i: (mask path) restore/re-noise frames; ``out = model_fn(cat([z, z]), cat([t'_i]*2n), i, x_mask)``;
    ``v_c, v_u = out[:, :C].chunk(2)`` (cond rows first); ``v = v_u + cfg_scale·(v_c - v_u)``; if the policy
    leaps or i is last, ``dt = t'_i/1000`` else ``(t'_i - t'_{i+1})/1000``; ``z = z + v·dt``; (mask path)
    ``z = where(active, z, x0)``; stop after a leap.

    Args:
        model_fn: ``(z_in (2n,C,T,H,W), t_in (2n,) fp32, step, x_mask (2n,T) bool | None) -> (2n, >=C, T, H, W)``;
            rows ``:n`` must use the prompts, rows ``n:`` the null caption. ``x_mask`` is None when ``mask`` is.
        z: initial latent ``(n, C, T, H, W)`` (bf16 noise from ``initial_noise``; conditioning frames written in).
        ts: the schedule from ``timesteps`` (strictly decreasing, in (0, num_timesteps]).
        cfg_scale: classifier-free guidance scale (7.0).
        policy: LPL policy (None = ``NoLeap()``); ``reset()`` (and ``validate(len(ts))`` when it has one) is called
            first, so one policy object can serve many samples.
        mask: ``(n, T)`` per latent frame: 1 generate, 0 keep fixed, in between re-noise at ``t <= mask·1000``
            (Open-Sora's ``apply_mask_strategy`` output); None for plain text-to-video.
        generator: RNG for the mask path's per-step noise (the global RNG when None, as the original).
        progress: called as ``progress(steps_done, len(ts))`` after every step.
        num_timesteps: the time scale of ``ts`` (1000).

    Returns:
        ``SampleResult`` with the fp32 latent, the model-call count, the leap step and per-step statistics.
    """
    cfg_scale = _check_cfg_scale(cfg_scale)
    _check_num_timesteps(num_timesteps)
    _check_inputs(z, ts, mask, num_timesteps)
    policy = NoLeap() if policy is None else policy
    num_steps = ts.numel()
    policy.reset()
    validate = getattr(policy, "validate", None)
    if validate is not None:
        validate(num_steps)

    n, C, T = z.shape[:3]
    ts = ts.to(z.device)
    if mask is not None:
        mask = mask.to(z.device)
        if not mask.is_floating_point():
            mask = mask.float()
        noise_added = mask == 1  # (n, T): frames that start as noise
    prev_v: torch.Tensor | None = None
    cos_sims: list[float] = []
    velocity_rms: list[float] = []
    leapt_at: int | None = None
    steps_run = 0

    for i in range(num_steps):
        t = ts[i].reshape(1)  # (1,) like the original's (n,) per-sample timestep
        x_mask = None
        if mask is not None:
            x0 = z.clone()
            x_noise = _add_noise(x0, torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device),
                                 t, num_timesteps)
            active = mask * num_timesteps >= t.unsqueeze(1)  # (n, T): frames being generated at this t
            x_mask = active.repeat(2, 1)  # (2n, T)
            z = torch.where((active & ~noise_added)[:, None, :, None, None], x_noise, x0)  # newly active -> noised
            noise_added = active

        z_in = torch.cat([z, z], 0)  # (2n, C, T, H, W)
        t_in = t.repeat(2 * n)  # (2n,) fp32
        out = model_fn(z_in, t_in, i, x_mask)
        if (not isinstance(out, torch.Tensor) or out.ndim != 5 or out.shape[0] != 2 * n or out.shape[1] < C
                or out.shape[2:] != z.shape[2:]):
            found = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"model_fn must return (2n, >= C, T, H, W) = ({2 * n}, >= {C}, {', '.join(map(str, z.shape[2:]))}) "
                f"(found {found}) at step {i}; the first C channels are the velocity, cond rows first"
            )
        v_cond, v_uncond = out[:, :C].chunk(2, dim=0)
        v = v_uncond + cfg_scale * (v_cond - v_uncond)  # (n, C, T, H, W)

        if prev_v is not None:
            cos_sims.append(float(latent_cosine(v, prev_v).min()))
        velocity_rms.append(float(v.detach().double().pow(2).mean().sqrt()))
        prev_v = v

        leap = bool(policy.should_leap(i, v, num_steps))
        dt = ts[i] if (leap or i == num_steps - 1) else ts[i] - ts[i + 1]
        dt = (dt / num_timesteps).reshape(1, 1, 1, 1, 1)  # dim'd: bf16 z + fp32 -> fp32, as the original's [n,...]
        z = z + v * dt
        if mask is not None:
            z = torch.where(active[:, None, :, None, None], z, x0)  # conditioning frames restored
        steps_run = i + 1
        if progress is not None:
            progress(steps_run, num_steps)
        if leap:
            leapt_at = i
            logger.debug("LPL leap at step %d of %d (sigma %.4f)", i, num_steps, float(ts[i]) / num_timesteps)
            break

    return SampleResult(z=z, steps_run=steps_run, leapt_at=leapt_at, cos_sims=cos_sims, velocity_rms=velocity_rms)
