"""LPL on diffusers' flow-matching pipelines: model calls and wall time with and without the leap.

Random-weight SD3, Flux, Wan and LTX-Video pipelines are built from configs (no download: the text encoders are
left out and the prompt embeddings are passed in, random, of the right shapes), at ``--size tiny`` (the tests'
size) or ``small`` (a few transformer layers, where the model calls dominate the time). Each runs ``--steps``
denoising steps three ways on the same seed: the full schedule, ``leap(pipe, calls=--calls)`` (the paper's
16 of 30) and the dynamic leap (``DynamicLeap()``), optionally with the transformer streamed by blockrt under
``--budget``. Printed per pipeline: model calls (denoising steps, the LPL count), transformer forwards (counted by
a forward hook; Wan runs CFG as two forwards a step), the fastest wall time of ``--repeat`` runs, speedup, and the
PSNR of the leapt output against the full one (random weights: a numerical deviation, not a quality figure). The
wall time is the pipeline call with `output_type="latent"`: text embeddings given, denoising, no VAE decode.

    .venv/bin/python benchmarks/flow_lpl.py                      # small size, 30 steps, LPL 16, all four
    .venv/bin/python benchmarks/flow_lpl.py --size tiny --steps 8 --calls 4 --pipelines sd3,flux
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

PIPELINES = ("sd3", "flux", "wan", "ltx")
TEXT_TOKENS = 12  # random prompt embedding length


@dataclass
class Built:
    """A pipeline with random weights, the transformer it calls and the keyword arguments of one call."""

    pipe: Any
    transformer: torch.nn.Module
    kwargs: dict[str, Any]


def _embeds(gen: torch.Generator, dim: int, tokens: int = TEXT_TOKENS) -> torch.Tensor:
    return torch.randn(1, tokens, dim, generator=gen)  # (1, L, dim)


def build_sd3(size: str = "tiny") -> Built:
    """Stable Diffusion 3: ``SD3Transformer2DModel`` + ``AutoencoderKL``, CFG batched (one call a step)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    layers, heads, res = (1, 4, 32) if size == "tiny" else (4, 8, 64)
    transformer = SD3Transformer2DModel(sample_size=res // 2, patch_size=1 if size == "tiny" else 2, in_channels=4,
                                        num_layers=layers, attention_head_dim=8 if size == "tiny" else 32,
                                        num_attention_heads=heads, caption_projection_dim=32 if size == "tiny" else 256,
                                        joint_attention_dim=32, pooled_projection_dim=64, out_channels=4)
    vae = AutoencoderKL(sample_size=res, in_channels=3, out_channels=3, block_out_channels=(4, 4), layers_per_block=1,
                        latent_channels=4, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD3-medium's scheduler config
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=sched, vae=vae, text_encoder=None,
                                    tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                    tokenizer_3=None)
    gen = torch.Generator().manual_seed(1)
    kwargs = dict(prompt_embeds=_embeds(gen, 32), negative_prompt_embeds=_embeds(gen, 32),
                  pooled_prompt_embeds=torch.randn(1, 64, generator=gen),
                  negative_pooled_prompt_embeds=torch.randn(1, 64, generator=gen),
                  height=res, width=res, guidance_scale=5.0)
    return Built(pipe, transformer, kwargs)


def build_flux(size: str = "tiny") -> Built:
    """Flux: ``FluxTransformer2DModel`` (guidance-distilled, packed latents) + ``AutoencoderKL``, one call a step."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    double, single, heads, res = (1, 1, 2, 16) if size == "tiny" else (2, 4, 4, 64)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=double, num_single_layers=single,
                                         attention_head_dim=16 if size == "tiny" else 32, num_attention_heads=heads,
                                         joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                                         axes_dims_rope=(4, 4, 8) if size == "tiny" else (8, 12, 12))
    vae = AutoencoderKL(sample_size=res, in_channels=3, out_channels=3, block_out_channels=(4, 4), layers_per_block=1,
                        latent_channels=4, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.1159, scaling_factor=0.3611)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)  # Flux-dev's config
    pipe = FluxPipeline(scheduler=sched, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)
    gen = torch.Generator().manual_seed(1)
    kwargs = dict(prompt_embeds=_embeds(gen, 32), pooled_prompt_embeds=torch.randn(1, 32, generator=gen),
                  height=res, width=res, guidance_scale=3.5)
    return Built(pipe, transformer, kwargs)


def build_wan(size: str = "tiny") -> Built:
    """Wan 2.1 text-to-video: ``WanTransformer3DModel`` + ``AutoencoderKLWan``, CFG as two calls a step."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(0)
    layers, heads, res, frames = (1, 2, 16, 5) if size == "tiny" else (4, 4, 128, 17)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads,
                                        attention_head_dim=12 if size == "tiny" else 32, in_channels=16,
                                        out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32 if size == "tiny" else 256,
                                        num_layers=layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    sched = FlowMatchEulerDiscreteScheduler(shift=5.0)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=sched, transformer=transformer)
    gen = torch.Generator().manual_seed(1)
    kwargs = dict(prompt_embeds=_embeds(gen, 32), negative_prompt_embeds=_embeds(gen, 32), height=res, width=res,
                  num_frames=frames, guidance_scale=5.0)
    return Built(pipe, transformer, kwargs)


def build_ltx(size: str = "tiny") -> Built:
    """LTX-Video: ``LTXVideoTransformer3DModel`` (packed latents) + ``AutoencoderKLLTXVideo``, CFG batched."""
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel

    torch.manual_seed(0)
    layers, heads, res, frames = (1, 4, 32, 9) if size == "tiny" else (4, 8, 64, 9)
    transformer = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                             num_attention_heads=heads, attention_head_dim=8 if size == "tiny" else 32,
                                             cross_attention_dim=32 if size == "tiny" else 256, num_layers=layers,
                                             caption_channels=32)
    vae = AutoencoderKLLTXVideo(in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
                                decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
                                decoder_layers_per_block=(1, 1, 1, 1, 1),
                                spatio_temporal_scaling=(True, True, False, False),
                                decoder_spatio_temporal_scaling=(True, True, False, False),
                                decoder_inject_noise=(False, False, False, False, False),
                                upsample_residual=(False, False, False, False), upsample_factor=(1, 1, 1, 1),
                                timestep_conditioning=False, patch_size=1, patch_size_t=1, encoder_causal=True,
                                decoder_causal=False)
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05,
                                            base_image_seq_len=1024, max_image_seq_len=4096, shift_terminal=0.1)
    pipe = LTXPipeline(scheduler=sched, vae=vae, text_encoder=None, tokenizer=None, transformer=transformer)
    gen = torch.Generator().manual_seed(1)
    mask = torch.ones(1, TEXT_TOKENS, dtype=torch.long)
    kwargs = dict(prompt_embeds=_embeds(gen, 32), prompt_attention_mask=mask,
                  negative_prompt_embeds=_embeds(gen, 32), negative_prompt_attention_mask=mask,
                  height=res, width=res, num_frames=frames, guidance_scale=3.0)
    return Built(pipe, transformer, kwargs)


BUILDERS = {"sd3": build_sd3, "flux": build_flux, "wan": build_wan, "ltx": build_ltx}


class CallCounter:
    """Counts forward calls of a module with a removable forward hook."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.count = 0
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: Any, out: Any) -> None:
        self.count += 1

    def remove(self) -> None:
        self._handle.remove()


def run_once(built: Built, steps: int, seed: int = 0, output_type: str = "latent") -> tuple[torch.Tensor, int, float]:
    """One pipeline call: (output, transformer calls, wall seconds)."""
    counter = CallCounter(built.transformer)
    try:
        built.pipe.set_progress_bar_config(disable=True)
        t0 = time.perf_counter()
        out = built.pipe(num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                         output_type=output_type, **built.kwargs)
        wall = time.perf_counter() - t0
    finally:
        counter.remove()
    result = out.images if hasattr(out, "images") else out.frames
    return torch.as_tensor(result), counter.count, wall


def best_of(built: Built, steps: int, repeat: int) -> tuple[torch.Tensor, int, float]:
    """``run_once`` ``repeat`` times: the output and call count (checked equal every time) and the fastest wall."""
    out, calls, wall = run_once(built, steps)
    for _ in range(repeat - 1):
        again, calls2, wall2 = run_once(built, steps)
        if calls2 != calls or not torch.equal(again, out):
            raise RuntimeError(f"a repeated run differs: {calls2} calls vs {calls}, or another output")
        wall = min(wall, wall2)
    return out, calls, wall


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of ``a`` against ``b`` over ``b``'s peak-to-peak range."""
    a, b = a.double(), b.double()
    mse = float((a - b).pow(2).mean())
    peak = float(b.max() - b.min()) or 1.0
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


def pin_cpu_device(pipe: Any) -> None:
    """Make ``pipe`` report the CPU as its execution device. A transformer streamed by ``blockrt.run`` holds meta
    placeholders between loads, and diffusers infers the device from the first model's parameters; a whole-pipeline
    switch (``blockrt.offload``) handles this itself, this script streams the transformer alone."""
    cls = type(pipe)
    pipe.__class__ = type(cls.__name__, (cls,), {"_execution_device": property(lambda self: torch.device("cpu"))})


def main(argv: list[str] | None = None) -> int:
    from blockrt.pipelines.flow_lpl import DynamicLeap, leap

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pipelines", default=",".join(PIPELINES), help=f"comma-separated, of {PIPELINES}")
    p.add_argument("--size", choices=("tiny", "small"), default="small")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--calls", type=int, default=16, help="model calls before the leap (the paper: 16 of 30)")
    p.add_argument("--budget", default=None, help="stream the transformer with blockrt under this budget")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=2, help="runs per mode; the fastest wall time is shown")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.pipelines.split(",") if n.strip()]
    unknown = sorted(set(names) - set(PIPELINES))
    if unknown:
        p.error(f"unknown pipelines {unknown}; known: {list(PIPELINES)}")
    torch.set_num_threads(args.threads)
    print(f"flow LPL: {args.size} random pipelines, {args.steps} steps, LPL {args.calls}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)" + (f", transformer streamed under {args.budget}" if args.budget else ""))
    print(f"{'pipeline':<8} {'mode':<12} {'calls':>5} {'forwards':>8} {'wall s':>8} {'speedup':>8} {'PSNR vs full':>13}")
    rows = []
    for name in names:
        built = BUILDERS[name](args.size)
        rt = None
        if args.budget:
            import blockrt

            rt = blockrt.run(built.transformer, budget=args.budget)
            pin_cpu_device(built.pipe)
        try:
            run_once(built, 2)  # warm-up
            full, forwards, wall_full = best_of(built, args.steps, args.repeat)
            rows.append((name, "full", args.steps, forwards, wall_full, 1.0, None, None))
            for mode, policy in ((f"LPL {args.calls}", args.calls), ("dynamic LPL", DynamicLeap())):
                with leap(built.pipe, policy) as lpl:
                    out, forwards, wall = best_of(built, args.steps, args.repeat)
                rows.append((name, mode, lpl.calls, forwards, wall, wall_full / wall, psnr(out, full), lpl.leapt_at))
            for row in rows[-3:]:
                name_, mode, calls, forwards, wall, speedup, db, leapt = row
                note = "" if not mode.startswith("dynamic") else \
                    (f" (leapt after call {leapt + 1})" if leapt is not None else " (never leapt)")
                shown = "-" if db is None else f"{db:.1f} dB"
                print(f"{name_:<8} {mode:<12} {calls:>5} {forwards:>8} {wall:>8.3f} {speedup:>8.2f} {shown:>13}{note}")
            if rt is not None:
                s = rt.profile.summary()
                print(f"{name:<8} blockrt: {len(rt.plan.blocks)} blocks, peak ledger {s.peak_ledger_bytes / 1e6:.1f} MB "
                      f"of {rt.budget / 1e6:.1f} MB, {s.passes} passes")
        finally:
            if rt is not None:
                rt.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
