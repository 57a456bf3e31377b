"""Tiny random diffusers pipelines built from configs, offline: SD3, Flux, Wan, LTX-Video, CogVideoX.

Every model is real (text encoders, transformer, VAE) with random seeded weights, a few hundred KB each, with
enough layers that each streams in several blocks. Tokenizers are built offline: T5's from the built-in shapes
model's ``spiece.model`` (152 pieces), CLIP's from a byte-level vocabulary written here (one token per byte, no
merges). ``BUILDERS[name](seed, scale)`` returns ``(pipe, call_kwargs)``; ``call_kwargs()`` gives fresh arguments
(a new seeded generator each time) for ``pipe(**call_kwargs())``, whose output is ``.frames`` or ``.images`` as
a tensor (``output_type="pt"``). ``scale`` widens the models (the benchmark uses larger ones).
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

T5_VOCAB = 160  # >= the shapes tokenizer's 152 pieces
CLIP_VOCAB = 520  # >= 256 bytes x 2 (with and without </w>) + 2 specials
SEQ = 16  # max_sequence_length of every prompt
PROMPT = "a red circle moving left"
NEGATIVE = "blurry"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map of bytes to printable characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=1)
def _clip_files() -> tuple[str, str]:
    d = Path(tempfile.mkdtemp(prefix="tiny-clip-tokenizer-"))
    atexit.register(shutil.rmtree, d, True)  # the tokenizer reads them once, when built
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    return str(d / "vocab.json"), str(d / "merges.txt")


def clip_tokenizer() -> Any:
    from transformers import CLIPTokenizer

    vocab, merges = _clip_files()
    return CLIPTokenizer(vocab, merges, model_max_length=SEQ)


def t5_tokenizer() -> Any:
    import blockrt.pipelines.shapes as shapes
    from blockrt.pipelines.opensora.t5 import load_tokenizer

    return load_tokenizer(Path(shapes.__file__).parent / "weights" / "t5-v1_1-xxl", model_max_length=SEQ)


def _clip_text(cls_name: str, hidden: int, projection: int) -> Any:
    import transformers

    tok = clip_tokenizer()
    cfg = transformers.CLIPTextConfig(vocab_size=CLIP_VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=SEQ,
                                      projection_dim=projection, bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return getattr(transformers, cls_name)(cfg).eval()


def _t5(d_model: int, cls_name: str = "T5EncoderModel") -> Any:
    import transformers

    cfg_cls = transformers.UMT5Config if cls_name.startswith("UMT5") else transformers.T5Config
    cfg = cfg_cls(vocab_size=T5_VOCAB, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=4, num_heads=4,
                  relative_attention_num_buckets=8, decoder_start_token_id=0)
    return getattr(transformers, cls_name)(cfg).eval()


def _kwargs(seed: int, **extra: Any) -> Callable[[], dict[str, Any]]:
    def make() -> dict[str, Any]:
        return {"prompt": PROMPT, "negative_prompt": NEGATIVE, "num_inference_steps": 2, "output_type": "pt",
                "generator": torch.Generator().manual_seed(seed), **extra}
    return make


def sd3(seed: int = 0, scale: int = 1) -> tuple[Any, Callable[[], dict[str, Any]]]:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    h = 32 * scale
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=1, in_channels=4, num_layers=4, attention_head_dim=8,
                                        num_attention_heads=4 * scale, caption_projection_dim=h, joint_attention_dim=h,
                                        pooled_projection_dim=2 * h, out_channels=4,
                                        pos_embed_max_size=16).eval()
    vae = AutoencoderKL(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(8 * scale, 8 * scale),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, latent_channels=4, norm_num_groups=2, shift_factor=0.0609,
                        scaling_factor=1.5035).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
        text_encoder=_clip_text("CLIPTextModelWithProjection", h, h), tokenizer=clip_tokenizer(),
        text_encoder_2=_clip_text("CLIPTextModelWithProjection", h, h), tokenizer_2=clip_tokenizer(),
        text_encoder_3=_t5(h), tokenizer_3=t5_tokenizer())
    return pipe, _kwargs(seed, height=32, width=32, max_sequence_length=SEQ, guidance_scale=5.0)


def flux(seed: int = 0, scale: int = 1) -> tuple[Any, Callable[[], dict[str, Any]]]:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    h = 32 * scale
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=4,
                                         attention_head_dim=16, num_attention_heads=2 * scale, joint_attention_dim=h,
                                         pooled_projection_dim=h, axes_dims_rope=(4, 4, 8)).eval()
    vae = AutoencoderKL(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(8 * scale, 8 * scale),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, latent_channels=1, norm_num_groups=2, shift_factor=0.0609,
                        scaling_factor=1.5035).eval()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                        text_encoder=_clip_text("CLIPTextModel", h, h), tokenizer=clip_tokenizer(),
                        text_encoder_2=_t5(h), tokenizer_2=t5_tokenizer(), transformer=transformer)
    kwargs = _kwargs(seed, height=16, width=16, max_sequence_length=SEQ, guidance_scale=3.5)
    return pipe, lambda: {k: v for k, v in kwargs().items() if k != "negative_prompt"}  # true CFG off, as Flux-dev


def wan(seed: int = 0, scale: int = 1) -> tuple[Any, Callable[[], dict[str, Any]]]:
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(seed)
    h = 32 * scale
    vae = AutoencoderKLWan(base_dim=4 * scale, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2 * scale, attention_head_dim=12,
                                        in_channels=16, out_channels=16, text_dim=h, freq_dim=256, ffn_dim=32,
                                        num_layers=4, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32).eval()
    pipe = WanPipeline(tokenizer=t5_tokenizer(), text_encoder=_t5(h, "UMT5EncoderModel"), vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), transformer=transformer)
    return pipe, _kwargs(seed, height=16, width=16, num_frames=9, max_sequence_length=SEQ, guidance_scale=6.0)


def ltx(seed: int = 0, scale: int = 1) -> tuple[Any, Callable[[], dict[str, Any]]]:
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel

    torch.manual_seed(seed)
    h = 32 * scale
    transformer = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                             num_attention_heads=4 * scale, attention_head_dim=8, cross_attention_dim=h,
                                             num_layers=4, caption_channels=h).eval()
    c = 8 * scale
    vae = AutoencoderKLLTXVideo(in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(c,) * 4,
                                decoder_block_out_channels=(c,) * 4, layers_per_block=(1,) * 5,
                                decoder_layers_per_block=(1,) * 5, spatio_temporal_scaling=(True, True, False, False),
                                decoder_spatio_temporal_scaling=(True, True, False, False),
                                decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4,
                                upsample_factor=(1,) * 4, timestep_conditioning=False, patch_size=1, patch_size_t=1,
                                encoder_causal=True, decoder_causal=False).eval()
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    pipe = LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=_t5(h),
                       tokenizer=t5_tokenizer(), transformer=transformer)
    return pipe, _kwargs(seed, height=32, width=32, num_frames=9, max_sequence_length=SEQ, guidance_scale=3.0)


def cogvideox(seed: int = 0, scale: int = 1) -> tuple[Any, Callable[[], dict[str, Any]]]:
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    h = 32 * scale
    transformer = CogVideoXTransformer3DModel(num_attention_heads=4 * scale, attention_head_dim=8, in_channels=4,
                                              out_channels=4, time_embed_dim=2, text_embed_dim=h, num_layers=4,
                                              sample_width=2, sample_height=2, sample_frames=9, patch_size=2,
                                              temporal_compression_ratio=4, max_text_seq_length=SEQ).eval()
    vae = AutoencoderKLCogVideoX(in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
                                 up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8 * scale,) * 4,
                                 latent_channels=4, layers_per_block=1, norm_num_groups=2,
                                 temporal_compression_ratio=4).eval()
    pipe = CogVideoXPipeline(tokenizer=t5_tokenizer(), text_encoder=_t5(h), vae=vae, transformer=transformer,
                             scheduler=CogVideoXDDIMScheduler())
    return pipe, _kwargs(seed, height=16, width=16, num_frames=8, max_sequence_length=SEQ, guidance_scale=6.0)


BUILDERS: dict[str, Callable[..., tuple[Any, Callable[[], dict[str, Any]]]]] = {
    "sd3": sd3, "flux": flux, "wan": wan, "ltx": ltx, "cogvideox": cogvideox}


def output(result: Any) -> torch.Tensor:
    """The images or video frames of a pipeline's result as one tensor."""
    out = getattr(result, "frames", None)
    return out if out is not None else result.images
