"""Linear Proportional Leap (LPL): policies that end the RFLOW loop early with one jump to t = 0.

A leap at step ``i`` makes the normal model call at ``t'_i`` and then, instead of ``dt = (t'_i - t'_{i+1})/1000``,
takes ``dt = t'_i/1000``: ``z + sigma_i * v_i``, the rectified-flow clean-sample estimate (design spec §4.3/§4.5).
The sampler (``sampler.sample``) asks ``policy.should_leap(i, v, num_steps)`` once per step with the CFG-combined
velocity ``v`` ``(n, C, T, H, W)`` and stops after the update of the step where it answers True.

- ``NoLeap``: run every step.
- ``FixedLeap(k)``: the paper's static leap: k model calls, then ``z + sigma v`` with the k-th call's velocity
  (the paper's "16 of 30" is ``FixedLeap(16)``; the On-device Sora app's ``numLpltarget = 15`` is the same run).
- ``DynamicLeap``: the paper's rule (the authors' GPU code): cosine similarity of consecutive CFG velocities,
  best value tracked with a tolerance, leap when it has not improved for ``patience`` compared steps.

State lives on the policy object and is reset by ``reset()``, which ``sample`` calls at the start of every sample
(the authors keep ``prev_vel``/``best_cos``/patience on their scheduler across samples; see ``DynamicLeap``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

SIMILARITIES = ("latent", "authors")


@runtime_checkable
class LeapPolicy(Protocol):
    """What ``sampler.sample`` needs from an LPL policy.

    ``validate(num_steps)`` is optional: when a policy has it, ``sample`` calls it after ``reset()`` and before the
    first model call, so a bad setting fails before any compute.
    """

    leapt_at: int | None

    def reset(self) -> None:
        """Forget everything from the previous sample (``leapt_at`` back to None)."""

    def should_leap(self, step: int, v: torch.Tensor, num_steps: int) -> bool:
        """Called once per step (0-based ``step``) with the CFG velocity ``v`` ``(n, C, T, H, W)``; True = leap now."""


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def latent_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of ``a`` and ``b`` ``(n, ...)`` over everything but the batch dim: ``(n,)`` float64.

    Accumulated in float64 (float32 on MPS) so the value does not depend on the reduction order at the 1e-3
    tolerance scale; 0 when either side is all zeros.
    """
    dtype = torch.float32 if a.device.type == "mps" else torch.float64
    a, b = a.reshape(a.shape[0], -1).to(dtype), b.reshape(b.shape[0], -1).to(dtype)
    den = a.norm(dim=1) * b.norm(dim=1)
    return (a * b).sum(dim=1) / den.clamp_min(torch.finfo(dtype).tiny)


def authors_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The authors' metric: sample 0, channel 0, latent frame 0 — an ``(H, W)`` map — cosine along W per row,
    averaged over rows (``F.cosine_similarity(cur, prev, dim=1).mean()``), in the velocity's dtype. 0-dim."""
    return F.cosine_similarity(a[0, 0, 0], b[0, 0, 0], dim=1).mean()


@dataclass
class NoLeap:
    """Run all steps (the plain Open-Sora loop)."""

    leapt_at: int | None = field(default=None, init=False)

    def reset(self) -> None:
        self.leapt_at = None

    def validate(self, num_steps: int) -> None:
        pass

    def should_leap(self, step: int, v: torch.Tensor, num_steps: int) -> bool:
        return False


@dataclass
class FixedLeap:
    """``calls`` model calls, then one Euler leap to t = 0 with the last one's velocity: ``z + sigma v``.

    One convention everywhere (API, CLI ``--lpl``, benchmarks, README): the number counts model calls.
    ``FixedLeap(16)`` with 30 steps is the paper's 16/30 (the On-device Sora app's default run); its leap is at
    0-based step index ``leap_at = 15``. ``FixedLeap(num_steps)`` is the plain loop (its last step already uses
    ``dt = t'_{N-1}/1000``).
    """

    calls: int
    leapt_at: int | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if not _is_int(self.calls) or self.calls < 1:
            raise ValueError(
                f"FixedLeap.calls must be an int >= 1, the model calls before the leap (found {self.calls!r}); "
                "e.g. FixedLeap(16) makes 16 of 30 calls, the paper's setting"
            )

    @property
    def leap_at(self) -> int:
        """The 0-based step index of the leap: ``calls - 1``."""
        return self.calls - 1

    def reset(self) -> None:
        self.leapt_at = None

    def validate(self, num_steps: int) -> None:
        if self.calls > num_steps:
            raise ValueError(
                f"FixedLeap(calls={self.calls}) is outside the schedule: expected 1 <= calls <= num_steps = "
                f"{num_steps} (found calls {self.calls}); pass calls <= {num_steps}, or NoLeap() to run every step"
            )

    def should_leap(self, step: int, v: torch.Tensor, num_steps: int) -> bool:
        self.validate(num_steps)
        if step == self.leap_at:
            self.leapt_at = step
            return True
        return False


@dataclass
class DynamicLeap:
    """The paper's dynamic LPL rule: leap once consecutive CFG velocities stop becoming more similar.

    At every step with a previous velocity the policy computes ``cos`` between this step's and the previous step's
    CFG velocity (recorded in ``cos_sims``, index j = step j+1 vs step j). From the ``start``-th model call on
    (step index ``start - 1``) it applies the rule: if ``cos > best + tol`` then ``best = cos`` and the patience
    counter is refilled to ``patience``, otherwise the counter drops by one; when it reaches 0 (and at least
    ``min_steps`` model calls have been made) the policy answers True and the sampler leaps at this step. With
    the defaults and a 30-step schedule the earliest leap is step index 17 (the 18th model call): best set at
    index 14, no improvement at 15, 16, 17 — exactly the authors' ``minimum_steps = 14`` / tolerance 1e-3 /
    patience 3.

    Args:
        start: 1-based model call at which comparisons begin (default 15 = step index 14, the authors' value).
        tol: improvement threshold (default 1e-3).
        patience: compared steps without improvement before leaping (default 3).
        min_steps: no leap before this many model calls (default 0: the rule alone decides). A leap the rule
            asks for earlier is held until call ``min_steps`` (and dropped if the similarity improves meanwhile).
        similarity: ``"latent"`` (default): cosine over the whole latent ``(C, T, H, W)`` of each sample; with
            several samples in the batch the smallest of their cosines drives the rule (one loop serves the
            batch, so the least-converged sample decides). ``"authors"``: the authors' exact metric and rule —
            sample 0, channel 0, latent frame 0, cosine along W per row averaged over rows, with ``best``
            starting at 0 (theirs) instead of -inf.

    Where the authors' code (``Modded_Open_Sora/opensora/schedulers/rf/__init__.py``) is wrong and this class
    differs by default:
        - its state (``prev_vel``, ``best_cos``, patience) lives on the scheduler and is reset only after a
          leap, so a sample that never leaps leaves a stale ``best_cos``/patience for the next one; here
          ``reset()`` runs at the start of every sample;
        - its metric looks at one ``(H, W)`` slice of sample 0 only (1/(C·T) of the latent, other prompts in
          the batch ignored) and averages row-wise cosines, which weighs a near-zero row like a strong one;
          ``"latent"`` uses the whole latent of every sample;
        - ``best_cos`` starts at 0, so a negative first cosine counts as "no improvement" (kept in
          ``"authors"`` mode, -inf in ``"latent"`` mode).
    """

    start: int = 15
    tol: float = 1e-3
    patience: int = 3
    min_steps: int = 0
    similarity: str = "latent"

    leapt_at: int | None = field(default=None, init=False)
    cos_sims: list[float] = field(default_factory=list, init=False)
    # (step, cos, best after the step, patience left) for every step the rule was applied to
    history: list[tuple[int, float, float, int]] = field(default_factory=list, init=False, repr=False)
    _prev: torch.Tensor | None = field(default=None, init=False, repr=False)
    _best: float = field(default=-math.inf, init=False, repr=False)
    _left: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if not _is_int(self.start) or self.start < 1:
            raise ValueError(
                f"DynamicLeap.start must be an int >= 1, the 1-based model call where comparisons begin "
                f"(found {self.start!r}); the authors use 15 (step index 14)"
            )
        if isinstance(self.tol, bool) or not isinstance(self.tol, (int, float)) or not (0 <= self.tol < math.inf):
            raise ValueError(f"DynamicLeap.tol must be a finite number >= 0 (found {self.tol!r}); the authors use 1e-3")
        if not _is_int(self.patience) or self.patience < 1:
            raise ValueError(f"DynamicLeap.patience must be an int >= 1 (found {self.patience!r}); the authors use 3")
        if not _is_int(self.min_steps) or self.min_steps < 0:
            raise ValueError(
                f"DynamicLeap.min_steps must be an int >= 0, a number of model calls (found {self.min_steps!r}); "
                "use 0 to let the rule alone decide"
            )
        if self.similarity not in SIMILARITIES:
            raise ValueError(
                f"DynamicLeap.similarity must be one of {SIMILARITIES} (found {self.similarity!r}); 'latent' is the "
                "whole-latent cosine, 'authors' their channel-0/frame-0 row-wise cosine"
            )
        self.reset()

    def reset(self) -> None:
        self.leapt_at = None
        self.cos_sims = []
        self.history = []
        self._prev = None
        self._best = 0.0 if self.similarity == "authors" else -math.inf
        self._left = self.patience

    def validate(self, num_steps: int) -> None:
        if self.start + self.patience > num_steps:
            logger.info(
                "DynamicLeap(start=%d, patience=%d) cannot leap within %d steps: the earliest leap is model call %d",
                self.start, self.patience, num_steps, self.start + self.patience,
            )

    def _cosine(self, v: torch.Tensor, prev: torch.Tensor) -> float:
        if self.similarity == "authors":
            return float(authors_cosine(v, prev))
        return float(latent_cosine(v, prev).min())

    def should_leap(self, step: int, v: torch.Tensor, num_steps: int) -> bool:
        v = v.detach()
        leap = False
        if self._prev is not None:
            if self._prev.shape != v.shape:
                raise ValueError(
                    f"DynamicLeap got a velocity of shape {tuple(v.shape)} after {tuple(self._prev.shape)}: expected "
                    "one sample's steps in order; call reset() between samples (sample() does)"
                )
            cos = self._cosine(v, self._prev)
            self.cos_sims.append(cos)
            if step >= self.start - 1:
                if cos > self._best + self.tol:
                    self._best, self._left = cos, self.patience
                else:
                    self._left -= 1
                self.history.append((step, cos, self._best, self._left))
                leap = self._left <= 0 and step + 1 >= self.min_steps
        self._prev = v
        if leap:
            self.leapt_at = step
            logger.debug("DynamicLeap: leap at step %d of %d (best cos %.6f)", step, num_steps, self._best)
        return leap
