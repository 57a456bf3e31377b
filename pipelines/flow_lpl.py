"""Linear Proportional Leap (LPL) for diffusers pipelines on a flow-matching Euler scheduler.

A rectified flow moves a sample along ``x_sigma = (1 - sigma) x0 + sigma eps``; the model predicts the velocity
``v = eps - x0`` (diffusers' sign) and ``FlowMatchEulerDiscreteScheduler.step`` takes ``x + (sigma_next - sigma) v``.
The leap (the On-device Sora paper's LPL) makes ``k`` model calls and then, instead of the rest of the schedule,
one Euler step from ``sigma_{k-1}`` straight to the schedule's end ``sigma_N`` (0) with the k-th call's velocity:
``x + (0 - sigma_{k-1}) v``, the flow's clean-sample estimate. On a straight-line flow (constant ``v``) it lands
exactly where the full schedule lands. One convention everywhere: ``calls=k`` counts model calls (denoising
steps; a step that runs the transformer twice for true CFG or skip-layer guidance is still one call), as
``FixedLeap(k)`` and ``--lpl k`` do for Open-Sora: the paper's 16 of 30 is ``calls=16``.

The policies are Open-Sora's (``blockrt.pipelines.opensora.lpl``): ``FixedLeap(k)``, and ``DynamicLeap``, the
paper's rule (leap when the cosine similarity of consecutive velocities stops improving), applied here to the
velocity the pipeline hands its scheduler (after CFG), whatever its shape (``(B, C, H, W)`` for SD3,
``(B, tokens, C)`` for Flux and LTX-Video's packed latents, ``(B, C, T, H, W)`` for Wan and HunyuanVideo).

How it hooks in, without touching the model: ``leap(pipe, calls=16)`` puts a copy of ``pipe.scheduler`` whose
class adds the leap (``leap_scheduler``) in its place. Its ``set_timesteps`` (called by the pipeline at the start
of every call) resets the policy; its ``step`` asks the policy after each model call and, on the leap, runs the
scheduler's own ``step`` with the next sigma replaced by the schedule's last one; then it sets the pipeline's
``interrupt`` switch, which diffusers' loops check before each model call, so no further call happens and the
pipeline decodes the leapt latent as usual. ``handle.remove()`` (or leaving ``with``) puts the original
scheduler back. It works on a plain pipeline and on one whose models blockrt streams: it only changes which
sigmas the scheduler steps to and when the loop stops.

Schedulers: ``FlowMatchEulerDiscreteScheduler`` (and its subclasses): SD3, Flux, Wan, LTX-Video, HunyuanVideo
ship it (Wan's published configs use ``UniPCMultistepScheduler`` with ``use_flow_sigmas`` instead: a multistep
solver on the same flow; to leap, give the pipeline ``FlowMatchEulerDiscreteScheduler(shift=flow_shift)``).
CogVideoX uses ``CogVideoXDDIMScheduler`` / ``CogVideoXDPMScheduler``: v-prediction on a variance-preserving
DDPM schedule, not a rectified flow; its one-shot jump would be DDIM's predicted ``x0``, not this leap, so
``leap`` refuses it. Any other scheduler is refused with what it is and what would work.

Example:
    >>> from blockrt.pipelines.flow_lpl import leap
    >>> with leap(pipe, calls=16) as lpl:              # or leap(pipe, "dynamic"), leap(pipe, DynamicLeap(start=10))
    ...     image = pipe(prompt, num_inference_steps=30).images[0]
    >>> lpl.calls, lpl.leapt_at                        # (16, 15): 16 transformer calls, the leap after the 16th
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Callable
from typing import Any

import torch

from blockrt.pipelines.opensora.lpl import DynamicLeap, FixedLeap, LeapPolicy, NoLeap

logger = logging.getLogger(__name__)

__all__ = ["FlowLeap", "DynamicLeap", "FixedLeap", "NoLeap", "leap", "leap_scheduler", "make_policy"]

_NOT_FLOW = {  # scheduler class -> why it takes no leap and what would
    "CogVideoXDDIMScheduler": "CogVideoX's DDIM scheduler predicts v on a variance-preserving DDPM schedule, not a "
                              "rectified flow; the leap does not apply (its one-shot jump is DDIM's predicted x0)",
    "CogVideoXDPMScheduler": "CogVideoX's DPM scheduler predicts v on a variance-preserving DDPM schedule, not a "
                             "rectified flow; the leap does not apply (its one-shot jump is DDIM's predicted x0)",
    "UniPCMultistepScheduler": "a multistep solver; when it runs a flow (use_flow_sigmas, Wan's published config) "
                               "give the pipeline FlowMatchEulerDiscreteScheduler(shift=pipe.scheduler.config."
                               "flow_shift) to leap",
}


def make_policy(calls: int | str | LeapPolicy) -> LeapPolicy:
    """``k`` -> ``FixedLeap(k)`` (k model calls, then the leap); ``"dynamic"`` -> ``DynamicLeap()``; a policy as is."""
    if isinstance(calls, str):
        if calls != "dynamic":
            raise ValueError(f"calls must be the model calls before the leap (an int >= 1), 'dynamic' or a leap "
                             f"policy (found {calls!r}); e.g. calls=16 makes 16 of 30 calls, the paper's setting")
        return DynamicLeap()
    if isinstance(calls, int) and not isinstance(calls, bool):
        return FixedLeap(calls)
    if isinstance(calls, LeapPolicy):
        return calls
    raise ValueError(f"calls must be an int >= 1 (model calls before the leap), 'dynamic' or a leap policy such as "
                     f"FixedLeap(16) / DynamicLeap() (found {type(calls).__name__} {calls!r})")


class _State:
    """The leap of one scheduler: its policy, the count of this sample's steps and where it leapt."""

    def __init__(self, policy: LeapPolicy, on_leap: Callable[[], None] | None) -> None:
        self.policy = policy
        self.on_leap = on_leap
        self.num_steps = 0  # len(scheduler.timesteps) of the current schedule
        self.calls = 0  # scheduler steps (= model calls) since set_timesteps
        self.leapt_at: int | None = None  # 0-based step index of the leap

    def begin(self, num_steps: int) -> None:
        self.num_steps, self.calls, self.leapt_at = num_steps, 0, None
        self.policy.reset()
        validate = getattr(self.policy, "validate", None)
        if validate is not None:
            validate(num_steps)  # FixedLeap(calls > steps) fails here, before any model call


def _flow_base() -> type:
    try:
        from diffusers import FlowMatchEulerDiscreteScheduler
    except ImportError:
        raise ImportError("blockrt.pipelines.flow_lpl needs diffusers; fix: pip install 'blockrt[hf]'") from None
    return FlowMatchEulerDiscreteScheduler


def _check_scheduler(scheduler: Any) -> None:
    base = _flow_base()
    if getattr(scheduler, "_leap", None) is not None:
        raise ValueError(f"{type(scheduler).__name__} already leaps; remove() its leap before adding another")
    if not isinstance(scheduler, base):
        name = type(scheduler).__name__
        why = _NOT_FLOW.get(name, "not a flow-matching Euler scheduler")
        raise TypeError(f"LPL needs a FlowMatchEulerDiscreteScheduler (SD3, Flux, Wan, LTX-Video, HunyuanVideo); "
                        f"found {name}: {why}")


@functools.cache
def _leap_class(cls: type) -> type:
    """``cls`` with the leap in ``set_timesteps`` and ``step``; the signatures stay ``cls``'s (pipelines inspect
    them for ``sigmas``, ``mu``, ``generator``)."""
    base_set_timesteps, base_step = cls.set_timesteps, cls.step

    @functools.wraps(base_set_timesteps)
    def set_timesteps(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = base_set_timesteps(self, *args, **kwargs)
        self._leap.begin(len(self.timesteps))
        return out

    @functools.wraps(base_step)
    def step(self: Any, model_output: Any, timestep: Any, sample: Any, *args: Any, **kwargs: Any) -> Any:
        state: _State = self._leap
        if state.leapt_at is not None:
            raise RuntimeError(
                f"scheduler.step called after the LPL leap at step {state.leapt_at} (the sample is already at the "
                "schedule's end): stop the loop when the leap happens (diffusers pipelines stop through their "
                "`interrupt` switch; a loop of your own checks `scheduler._leap.leapt_at`)")
        if self.step_index is None:
            self._init_step_index(timestep)
        index = state.calls
        state.calls += 1
        if not state.policy.should_leap(index, model_output, state.num_steps):
            return base_step(self, model_output, timestep, sample, *args, **kwargs)
        full = self.sigmas  # (N + 1,): the schedule and its terminal sigma
        i = self.step_index
        self.sigmas = torch.cat([full[: i + 1], full[-1:]])  # the next sigma is the last: one Euler step to the end
        try:
            out = base_step(self, model_output, timestep, sample, *args, **kwargs)
        finally:
            self.sigmas = full
        state.leapt_at = index
        logger.debug("LPL: leap after model call %d of %d (sigma %.4f -> %.4f)", index + 1, state.num_steps,
                     float(full[i]), float(full[-1]))
        if state.on_leap is not None:
            state.on_leap()
        return out

    doc = f"{cls.__name__} with the Linear Proportional Leap (blockrt.pipelines.flow_lpl)."
    return type(f"Leap{cls.__name__}", (cls,), {"set_timesteps": set_timesteps, "step": step,
                                                 "__module__": __name__, "__doc__": doc})


def leap_scheduler(scheduler: Any, calls: int | str | LeapPolicy,
                   on_leap: Callable[[], None] | None = None) -> Any:
    """A copy of ``scheduler`` (a ``FlowMatchEulerDiscreteScheduler``) that leaps; the original is not changed.

    The copy shares the original's config and state and behaves exactly like it, except that after the step where
    the policy answers True it has stepped to the schedule's last sigma (0) and ``on_leap()`` has been called; a
    further ``step`` before the next ``set_timesteps`` raises. ``copy._leap`` holds ``calls`` (steps this sample),
    ``leapt_at`` (the 0-based step of the leap or None), ``num_steps`` and ``policy``.

    Example (a loop of your own):
        >>> sched = leap_scheduler(pipe.scheduler, calls=8)
        >>> sched.set_timesteps(30)
        >>> for t in sched.timesteps:
        ...     x = sched.step(model(x, t), t, x).prev_sample
        ...     if sched._leap.leapt_at is not None:
        ...         break
    """
    _check_scheduler(scheduler)
    policy = make_policy(calls)
    cls = _leap_class(type(scheduler))
    copy = object.__new__(cls)
    copy.__dict__.update(vars(scheduler))
    copy._leap = _State(policy, on_leap)
    return copy


class FlowLeap:
    """The leap installed on a diffusers pipeline by :func:`leap`; ``remove()`` (or ``with``) takes it away.

    Attributes (of the last pipeline call):
        calls: model calls made (denoising steps run), ``k`` for ``calls=k``.
        leapt_at: 0-based step index of the leap (``k - 1``), or None when the policy never leapt.
        num_steps: the length of the schedule the pipeline set.
        policy: the leap policy (``FixedLeap``, ``DynamicLeap``, ...; its ``cos_sims`` after a dynamic run).
    """

    def __init__(self, pipe: Any, policy: LeapPolicy) -> None:
        if not hasattr(type(pipe), "interrupt") or not hasattr(pipe, "scheduler"):
            raise TypeError(f"{type(pipe).__name__} is not a diffusers pipeline with a scheduler and an `interrupt` "
                            "switch (what stops its loop after the leap); for a loop of your own use leap_scheduler()")
        self._pipe = pipe
        self.original = pipe.scheduler
        ref = weakref.ref(pipe)  # the scheduler lives on the pipeline: no cycle through the callback

        def stop() -> None:
            p = ref()
            if p is not None:
                p._interrupt = True  # what diffusers' callback_on_step_end documentation sets to stop the loop

        self.scheduler = leap_scheduler(self.original, policy, on_leap=stop)
        self.policy = policy
        pipe.scheduler = self.scheduler

    @property
    def _state(self) -> _State:
        return self.scheduler._leap

    @property
    def calls(self) -> int:
        return self._state.calls

    @property
    def leapt_at(self) -> int | None:
        return self._state.leapt_at

    @property
    def num_steps(self) -> int:
        return self._state.num_steps

    @property
    def active(self) -> bool:
        """True while the pipeline runs on the leaping scheduler."""
        return self._pipe is not None and self._pipe.scheduler is self.scheduler

    def remove(self) -> None:
        """Put the pipeline's own scheduler back (idempotent); a scheduler set by the user since is left alone."""
        if self.active:
            self._pipe.scheduler = self.original
        self._pipe = None

    def __enter__(self) -> "FlowLeap":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (f"FlowLeap({self.policy!r}, calls={self.calls}, leapt_at={self.leapt_at}, "
                f"num_steps={self.num_steps}, active={self.active})")


def leap(pipe: Any, calls: int | str | LeapPolicy) -> FlowLeap:
    """Make a diffusers flow-matching pipeline stop after ``calls`` model calls and leap to sigma = 0.

    Args:
        pipe: a diffusers pipeline whose ``scheduler`` is a ``FlowMatchEulerDiscreteScheduler`` (SD3, Flux, Wan,
            LTX-Video, HunyuanVideo), plain or with its models streamed by blockrt.
        calls: ``k`` (an int >= 1): k model calls, then one Euler step to the schedule's end with the k-th call's
            velocity (the paper's 16 of 30 is ``16``); ``"dynamic"``: the paper's dynamic rule (``DynamicLeap()``);
            or a policy object (``DynamicLeap(start=10)``, ``FixedLeap(8)``, ``NoLeap()``).

    Returns:
        A :class:`FlowLeap` handle: ``calls``/``leapt_at`` of the last pipeline call, ``remove()``, ``with``.

    Raises:
        TypeError: the scheduler is not a flow-matching Euler scheduler (CogVideoX's, UniPC, ...), or ``pipe`` has
            no ``interrupt`` switch.
        ValueError: a bad ``calls``; at the pipeline call, ``calls`` above ``num_inference_steps``.
    """
    return FlowLeap(pipe, make_policy(calls))
