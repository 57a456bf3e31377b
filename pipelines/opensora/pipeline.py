"""``OpenSoraPipeline``: text -> video with Open-Sora v1.2, every model streamed by blockrt under ONE budget.

The stages run one after another, each holding the whole budget while it runs and releasing it after:

1. T5 encodes the prompt (streamed block by block, then closed and dropped);
2. STDiT3 denoises for ``steps`` steps (CFG batch of 2), streamed with retention across steps, with the
   paper's Linear Proportional Leap (``lpl``) and Temporal Dimension Token Merging (``merge_steps``);
3. the VAE decodes: the temporal decoder chunk by chunk (5 latents -> 17 frames), then the spatial decoder
   micro-batch by micro-batch, each decoder streamed part by part straight out of the VAE checkpoint.

Weights come from a local directory holding ``t5-v1_1-xxl/``, ``OpenSora-STDiT-v3/``, ``OpenSora-VAE-v1.2/``
(see ``loading.py``). ``GenerateConfig`` validates everything before any heavy work starts.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

import blockrt
from blockrt import RunConfig
from blockrt.device import resolve_budget
from blockrt.memory import RssSampler
from blockrt.profile import Profile
from blockrt.sources import CheckpointSource
from blockrt.pipelines.opensora import loading
from blockrt.pipelines.opensora.conditioning import model_inputs
from blockrt.pipelines.opensora.lpl import DynamicLeap, FixedLeap, LeapPolicy, NoLeap
from blockrt.pipelines.opensora.prompt import preprocess
from blockrt.pipelines.opensora.resolution import latent_size, num_frames, resolve
from blockrt.pipelines.opensora.sampler import initial_noise, sample, timesteps
from blockrt.pipelines.opensora.tdtm import check_variant
from blockrt.pipelines.opensora.video import save_video

MERGE_WHEN = ("first", "last")  # which steps TDTM merges: the first merge_steps (the paper) or the last
DIRS = {"t5": "t5-v1_1-xxl", "stdit3": "OpenSora-STDiT-v3", "vae": "OpenSora-VAE-v1.2"}
STAGE_LABELS = {"t5": "T5", "stdit3": "STDiT3", "vae_temporal": "VAE temporal", "vae_spatial": "VAE spatial"}


@dataclass(frozen=True)
class GenerateConfig:
    """One generation; validated here, before any model is touched.

    Args:
        prompt: the text (cleaned and suffixed with " aesthetic score: 6.5." as Open-Sora does).
        resolution, aspect: a preset (``"144p"``, ``"240p"``, ..., ``"256x256"``) and an aspect ratio ("3:4").
        frames: video frames (17 -> 5 latent frames, 68 -> 20).
        steps, cfg_scale, seed: the rectified-flow sampler's settings (30, 7.0, 42 in Open-Sora).
        lpl: None (all steps), an int k: k model calls, then one leap to t = 0 (``FixedLeap(k)``; the paper's
            16 of 30 is ``lpl=16``), or ``"dynamic"``.
        merge_steps: TDTM for ``merge_steps`` steps (0 = off): the first ones (the paper), or see ``merge_when``.
        merge_positions: TDTM's RoPE positions of the merged frames: ``"index"`` 0..T'-1 (the paper's) or
            ``"centre"`` (each pair at ``2g + 0.5``, the temporal distances the model was trained with).
        merge_blocks: which blocks merge: ``"all"`` (the paper's), ``"spatial"`` or ``"temporal"``.
        merge_when: ``"first"``: the first ``merge_steps`` steps (the paper's); ``"last"``: the last
            ``merge_steps`` steps of the ``steps`` schedule (an LPL leap may end the run before them).
        fps: frames per second of the written video and the fps conditioning (a single frame is conditioned on
            120, as Open-Sora v1.2 does for images).
    """

    prompt: str
    resolution: str = "144p"
    aspect: str = "3:4"
    frames: int = 17
    steps: int = 30
    cfg_scale: float = 7.0
    seed: int = 42
    lpl: int | str | None = None
    merge_steps: int = 0
    fps: int = 24
    merge_positions: str = "index"
    merge_blocks: str = "all"
    merge_when: str = "first"

    def __post_init__(self) -> None:
        preprocess(self.prompt)  # an empty prompt fails here
        resolve(self.resolution, self.aspect)  # an unknown resolution fails here, listing the known ones
        num_frames(self.frames)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an int >= 1 (Open-Sora uses 30); got {self.steps!r}")
        if self.lpl is not None and self.lpl != "dynamic":
            if isinstance(self.lpl, bool) or not isinstance(self.lpl, int) or not 1 <= self.lpl <= self.steps:
                raise ValueError(f"lpl must be None, 'dynamic' or the model calls before the leap, in [1, steps="
                                 f"{self.steps}]; got {self.lpl!r} (the paper: 16 of 30 calls)")
        if isinstance(self.merge_steps, bool) or not isinstance(self.merge_steps, int) or \
                not 0 <= self.merge_steps <= self.steps:
            raise ValueError(f"merge_steps must be an int in [0, steps={self.steps}]; got {self.merge_steps!r}")
        check_variant(self.merge_positions, self.merge_blocks)
        if self.merge_when not in MERGE_WHEN:
            raise ValueError(f"merge_when must be one of {MERGE_WHEN} (the paper: 'first'); got {self.merge_when!r}")

    def merges(self, step: int) -> bool:
        """Whether TDTM merges frames at ``step`` (0-based) of the ``steps`` schedule."""
        if self.merge_when == "first":
            return step < self.merge_steps
        return step >= self.steps - self.merge_steps

    def merge_args(self, step: int) -> dict[str, Any]:
        """STDiT3's TDTM keyword arguments at ``step``: ``merge_frames``, ``merge_positions``, ``merge_blocks``."""
        return {"merge_frames": self.merges(step), "merge_positions": self.merge_positions,
                "merge_blocks": self.merge_blocks}

    def policy(self) -> LeapPolicy:
        if self.lpl is None:
            return NoLeap()
        return DynamicLeap() if self.lpl == "dynamic" else FixedLeap(self.lpl)


@dataclass
class GenerateResult:
    """The video ``[3, N, H, W]`` in [-1, 1], where it was written, and what the run measured."""

    video: torch.Tensor
    path: Path | None
    profile: Profile
    stages: dict[str, Any] = field(default_factory=dict)  # per stage: summary, peak ledger, ...
    steps_run: int = 0
    leapt_at: int | None = None


class OpenSoraPipeline:
    """Open-Sora v1.2 text-to-video under one memory budget.

    Args:
        weights: directory with ``t5-v1_1-xxl/``, ``OpenSora-STDiT-v3/``, ``OpenSora-VAE-v1.2/``.
        budget: the one budget every stage runs under (``"3.3GB"``, ``"iphone15pro"``, bytes).
        config: blockrt knobs (prefetch depth, throttling, ...) applied to every stage; its ``store_path``, if
            set, is a folder holding each stage's converted store (``<component>-<part>``; for ``storage_dtype``).

    Example:
        >>> pipe = OpenSoraPipeline("weights/", budget="3.3GB")
        >>> result = pipe.generate(GenerateConfig("a red circle moving left"), out="video.mp4")
    """

    def __init__(self, weights: str | Path, budget: int | str = "3.3GB", config: RunConfig | None = None, *,
                 stream: bool = True) -> None:
        self.root = Path(weights)
        missing = [d for d in DIRS.values() if not (self.root / d).is_dir()]
        if missing:
            raise FileNotFoundError(f"{self.root} should hold {sorted(DIRS.values())}; missing {missing}; "
                                    "fix: point weights= at the directory of the three downloads")
        self.budget, _ = resolve_budget(budget)
        self.budget_spec = budget
        self.config = config or RunConfig()
        self.stream = stream  # False: every model loaded whole (the reference the streamed run must equal)

    def generate(self, cfg: GenerateConfig, out: str | Path | None = None,
                 progress: Callable[[str, int, int], None] | None = None) -> GenerateResult:
        """Run T5 -> STDiT3 -> VAE; write an mp4 to ``out`` if given.

        ``progress(stage, done, total)`` is called as each stage advances: ``"T5 encode"``, ``"denoising"``
        (per model call; an LPL leap ends it early), ``"VAE decode"`` (per temporal chunk, then the spatial pass).
        """
        report = progress or (lambda stage, done, total: None)
        _import_models()  # library code pages and module objects are not the run's memory: load them first
        whole = Profile(budget=self.budget)
        rss = RssSampler(whole).start()
        try:
            stages: dict[str, Any] = {}
            y, mask = self._encode(cfg, whole, stages, report)
            z, steps_run, leapt_at = self._denoise(cfg, y, mask, whole, stages, report)
            del y, mask
            video = self._decode(cfg, z, whole, stages, report)
        finally:
            rss.stop()
        path = None
        if out is not None:
            path = Path(out)
            save_video(path, video, fps=cfg.fps)
        return GenerateResult(video, path, whole, stages, steps_run, leapt_at)

    # -- stages -------------------------------------------------------------------------------------------

    def _run(self, model: torch.nn.Module, weights: Path, **extra: Any) -> Any:
        if not self.stream:
            return _Whole(model, weights, extra.get("weights_prefix", ""))
        if self.config.store_path is not None:  # one converted store per stage, side by side
            part = extra.get("weights_prefix", "").rstrip(".") or "model"
            extra["store_path"] = Path(self.config.store_path) / f"{Path(weights).parent.name}-{part}"
        conf = RunConfig(**{**self.config.__dict__, **extra})
        return blockrt.run(model, budget=self.budget_spec, weights=weights, config=conf)

    def _finish(self, name: str, rt: Any, whole: Profile, stages: dict[str, Any]) -> None:
        if not isinstance(rt, blockrt.Runtime):
            return
        s = rt.profile.summary()
        end = whole.now()  # stage_s: since the previous stage ended (model set-up included), whole-run clock
        start = max((v["end_s"] for v in stages.values()), default=0.0)
        stages[name] = {"summary": s, "peak_ledger_bytes": rt.ledger.peak, "blocks": len(rt.plan.blocks),
                        "retained": list(rt.retention.retained) if rt.retention else [],
                        "end_s": end, "stage_s": end - start}
        whole.absorb(rt.profile, prefix=f"{name}/", stage=STAGE_LABELS.get(name, name))

    def _encode(self, cfg: GenerateConfig, whole: Profile, stages: dict[str, Any],
                report: Callable[[str, int, int], None]) -> tuple[torch.Tensor, torch.Tensor]:
        from blockrt.pipelines.opensora.t5 import encode_prompts, load_tokenizer

        report("T5 encode", 0, 1)
        t5 = loading.load_t5(self.root / DIRS["t5"])
        tokenizer = load_tokenizer(self.root / DIRS["t5"])
        with self._run(t5.model, t5.weights) as rt:
            rt.expect_last_pass()  # one pass: no second one to prefetch for
            y, mask = encode_prompts(tokenizer, rt, [preprocess(cfg.prompt)])  # (1, 1, L, d), (1, L)
        self._finish("t5", rt, whole, stages)
        report("T5 encode", 1, 1)
        del t5, rt
        gc.collect()
        return y, mask

    def _denoise(self, cfg: GenerateConfig, y: torch.Tensor, mask: torch.Tensor, whole: Profile,
                 stages: dict[str, Any], report: Callable[[str, int, int], None]) -> tuple[torch.Tensor, int, int | None]:
        stdit = loading.load_stdit3(self.root / DIRS["stdit3"])
        model = stdit.model.eval()
        h, w = resolve(cfg.resolution, cfg.aspect)
        frames = num_frames(cfg.frames)
        lt, lh, lw = latent_size(frames, h, w)
        ts = timesteps(cfg.steps, height=h, width=w, num_frames=frames)
        z = initial_noise((1, model.config.in_channels, lt, lh, lw), cfg.seed)
        with self._run(model, stdit.weights) as rt:
            y_in = torch.cat([y, model.null_caption(1)])  # cond row first, then the learned null caption
            # fps/height/width in the model dtype (bf16 rounds the sizes) and fps 120 for an image, as the original
            side = model_inputs(height=h, width=w, frames=frames, fps=cfg.fps, dtype=model.dtype)

            policy = cfg.policy()
            # the step of the last STDiT3 call, where known in advance (dynamic LPL decides as it goes)
            last_call = None if isinstance(policy, DynamicLeap) else \
                policy.leap_at if isinstance(policy, FixedLeap) else cfg.steps - 1

            def model_fn(z_in: torch.Tensor, t_in: torch.Tensor, step: int, x_mask: torch.Tensor | None) -> torch.Tensor:
                if step == last_call:
                    rt.expect_last_pass()
                # STDiT3 casts x to its weights' dtype first; casting here keeps every step one input kind for
                # the runtime (step 0's latent is bf16 noise, later ones fp32) without changing a bit
                return rt(z_in.to(model.dtype), t_in, y_in, mask=mask, x_mask=x_mask, **cfg.merge_args(step), **side)

            result = sample(model_fn, z, ts, cfg_scale=cfg.cfg_scale, policy=policy,
                            progress=lambda done, total: report("denoising", done, total))
        self._finish("stdit3", rt, whole, stages)
        del stdit, model, rt
        gc.collect()
        return result.z, result.steps_run, result.leapt_at

    def _decode(self, cfg: GenerateConfig, z: torch.Tensor, whole: Profile, stages: dict[str, Any],
                report: Callable[[str, int, int], None]) -> torch.Tensor:
        vae_dir = loading.load_vae(self.root / DIRS["vae"])
        vae = vae_dir.model.eval()
        source = CheckpointSource(vae_dir.weights)
        small = {k: source.read_tensor(k) for k in source.segments
                 if k in ("scale", "shift") or ".post_quant_conv." in k}
        vae.load_state_dict(small, strict=False, assign=True)  # the little parts around the two decoders
        frames = num_frames(cfg.frames)
        with torch.no_grad():
            with self._run(vae.temporal_vae.decoder, vae_dir.weights, weights_prefix="temporal_vae.decoder.") as rt:
                parts = vae.split_chunks(z, frames)
                chunks = []
                for k, (zk, nk) in enumerate(parts):
                    report("VAE decode", k, len(parts) + 1)
                    chunks.append(vae.temporal_vae.decode(vae.denormalize(zk), nk))
                x_z = torch.cat(chunks, dim=2)  # (1, 4, frames, h, w): chunk by chunk, 5 latents -> 17 frames
            self._finish("vae_temporal", rt, whole, stages)
            with self._run(vae.spatial_vae.module.decoder, vae_dir.weights,
                           weights_prefix="spatial_vae.module.decoder.") as rt:
                video = vae.spatial_vae.decode(x_z)  # (1, 3, frames, 8h, 8w), micro-batch by micro-batch
            self._finish("vae_spatial", rt, whole, stages)
            report("VAE decode", len(parts) + 1, len(parts) + 1)
        return video[0]


def _import_models() -> None:
    import diffusers.models.autoencoders.vae  # noqa: F401
    import transformers.models.t5.modeling_t5  # noqa: F401

    import blockrt.pipelines.opensora.stdit3  # noqa: F401
    import blockrt.pipelines.opensora.t5  # noqa: F401
    import blockrt.pipelines.opensora.vae  # noqa: F401


class _Whole:
    """The non-streamed reference: the model's weights read whole from the same checkpoint; called directly."""

    def __init__(self, model: torch.nn.Module, weights: Path, prefix: str) -> None:
        source = CheckpointSource(weights)
        tensors = {k[len(prefix):]: source.read_tensor(k) for k in source.segments if k.startswith(prefix)}
        own = set(model.state_dict())
        missing = own - set(tensors)
        for tied in [k for k in missing if k == "encoder.embed_tokens.weight" and "shared.weight" in tensors]:
            tensors[tied] = tensors["shared.weight"]  # T5: one tensor under two names
        model.load_state_dict({k: v for k, v in tensors.items() if k in own}, assign=True)
        if "encoder.embed_tokens.weight" in own:
            model.tie_weights()
        self.model = model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return self.model(*args, **kwargs)

    def expect_last_pass(self) -> None:
        """Nothing to prefetch when the weights are all resident."""

    def __enter__(self) -> "_Whole":
        return self

    def __exit__(self, *exc: object) -> None:
        pass
