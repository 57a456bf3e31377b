"""Tiny seeded builders of many architectures (transformers and diffusers configs, random weights) for the zoo.

Each builder returns ``(model.eval(), kwargs)``; ``model(**kwargs)`` runs one forward. Models are ~0.3-8 MB,
with enough layers that none is more than about an eighth of the model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

Built = tuple[nn.Module, dict[str, Any]]
B, T, V = 1, 8, 96
_LLM: dict[str, Any] = {"vocab_size": V, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 6,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32}


def output(o: Any) -> torch.Tensor:
    """The tensor a zoo model's output is compared by: itself, else ``sample``/``logits``/``last_hidden_state``,
    else its first field."""
    if isinstance(o, torch.Tensor):
        return o
    for name in ("sample", "logits", "last_hidden_state"):
        if getattr(o, name, None) is not None:
            return getattr(o, name)
    return o[0]


def _g(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ids() -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=_g())


def _hf(cls_name: str, cfg_name: str, **cfg: Any) -> Callable[[], Built]:
    def build() -> Built:
        import transformers

        c = getattr(transformers, cfg_name)(**cfg)
        return getattr(transformers, cls_name)(c).eval(), {"input_ids": _ids()}
    return build


def _seq2seq(cls_name: str, cfg_name: str, **cfg: Any) -> Callable[[], Built]:
    def build() -> Built:
        import transformers

        c = getattr(transformers, cfg_name)(**cfg)
        return getattr(transformers, cls_name)(c).eval(), {"input_ids": _ids(), "decoder_input_ids": _ids()[:, :4]}
    return build


def whisper() -> Built:
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    c = WhisperConfig(vocab_size=V, d_model=64, encoder_layers=4, decoder_layers=4, encoder_attention_heads=4,
                      decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16,
                      max_source_positions=16, max_target_positions=16, pad_token_id=0, bos_token_id=1,
                      eos_token_id=2, decoder_start_token_id=1)
    feats = torch.randn(B, 16, 32, generator=_g())
    return WhisperForConditionalGeneration(c).eval(), {"input_features": feats, "decoder_input_ids": _ids()[:, :4]}


def vit() -> Built:
    from transformers import ViTConfig, ViTModel

    c = ViTConfig(hidden_size=64, num_hidden_layers=6, num_attention_heads=4, intermediate_size=128, image_size=32,
                  patch_size=8, num_channels=3)
    return ViTModel(c).eval(), {"pixel_values": torch.randn(B, 3, 32, 32, generator=_g())}


def unet() -> Built:
    from diffusers import UNet2DConditionModel

    m = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                             layers_per_block=2, norm_num_groups=8, attention_head_dim=8)
    g = _g()
    return m.eval(), {"sample": torch.randn(B, 4, 16, 16, generator=g), "timestep": torch.tensor([10]),
                      "encoder_hidden_states": torch.randn(B, 6, 32, generator=g)}


class _Decode(nn.Module):
    """AutoencoderKL's decode as a forward (the runtime hooks a module's call)."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z).sample


def vae() -> Built:
    from diffusers import AutoencoderKL

    m = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), latent_channels=4,
                      norm_num_groups=8, layers_per_block=2)
    return _Decode(m).eval(), {"z": torch.randn(B, 4, 8, 8, generator=_g())}


def flux() -> Built:
    from diffusers import FluxTransformer2DModel

    m = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=3, num_single_layers=6, attention_head_dim=16,
                               num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                               axes_dims_rope=(4, 6, 6))
    g = _g()
    return m.eval(), {"hidden_states": torch.randn(B, 16, 16, generator=g),
                      "encoder_hidden_states": torch.randn(B, 4, 32, generator=g),
                      "pooled_projections": torch.randn(B, 32, generator=g), "timestep": torch.tensor([0.5]),
                      "img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(4, 3)}


def dit() -> Built:
    from diffusers import DiTTransformer2DModel

    m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, num_layers=8,
                              sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=8)
    return m.eval(), {"hidden_states": torch.randn(B, 4, 8, 8, generator=_g()), "timestep": torch.tensor([3]),
                      "class_labels": torch.tensor([1])}


def sd3() -> Built:
    from diffusers import SD3Transformer2DModel

    m = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=6, attention_head_dim=16,
                              num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
                              pooled_projection_dim=32, out_channels=4, pos_embed_max_size=8)
    g = _g()
    return m.eval(), {"hidden_states": torch.randn(B, 4, 8, 8, generator=g),
                      "encoder_hidden_states": torch.randn(B, 4, 32, generator=g),
                      "pooled_projections": torch.randn(B, 32, generator=g), "timestep": torch.tensor([3])}


def _dict_input(cls_name: str, cfg_name: str, make_inputs: Callable[[], dict[str, Any]], **cfg: Any
                ) -> Callable[[], Built]:
    def build() -> Built:
        import transformers

        c = getattr(transformers, cfg_name)(**cfg)
        return getattr(transformers, cls_name)(c).eval(), make_inputs()
    return build


def _pixels() -> dict[str, Any]:
    return {"pixel_values": torch.randn(B, 3, 32, 32, generator=_g())}


def clip() -> Built:
    """The whole CLIP model: text and vision towers, both run by one forward."""
    from transformers import CLIPConfig, CLIPModel

    c = CLIPConfig(text_config={"vocab_size": V, "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
                                "intermediate_size": 128, "max_position_embeddings": 32, "bos_token_id": 1,
                                "eos_token_id": 2, "pad_token_id": 0},
                   vision_config={"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
                                  "intermediate_size": 128, "image_size": 32, "patch_size": 8},
                   projection_dim=32)
    return CLIPModel(c).eval(), {"input_ids": _ids(), **_pixels()}


def transformer2d() -> Built:
    from diffusers import Transformer2DModel

    m = Transformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=8, num_layers=6,
                           norm_num_groups=8, cross_attention_dim=32)
    g = _g()
    return m.eval(), {"hidden_states": torch.randn(B, 8, 4, 4, generator=g),
                      "encoder_hidden_states": torch.randn(B, 4, 32, generator=g)}


def pixart() -> Built:
    from diffusers import PixArtTransformer2DModel

    m = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                 num_layers=6, cross_attention_dim=32, caption_channels=32, sample_size=8,
                                 patch_size=2, norm_num_groups=8)
    g = _g()
    return m.eval(), {"hidden_states": torch.randn(B, 4, 8, 8, generator=g),
                      "encoder_hidden_states": torch.randn(B, 4, 32, generator=g), "timestep": torch.tensor([3]),
                      "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}


def cogvideox() -> Built:
    from diffusers import CogVideoXTransformer3DModel

    m = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                    time_embed_dim=32, text_embed_dim=32, num_layers=6, sample_width=8,
                                    sample_height=8, sample_frames=5, patch_size=2, max_text_seq_length=4,
                                    temporal_compression_ratio=4)
    g = _g()
    return m.eval(), {"hidden_states": torch.randn(B, 2, 4, 8, 8, generator=g),
                      "encoder_hidden_states": torch.randn(B, 4, 32, generator=g), "timestep": torch.tensor([3])}


def ltx() -> Built:
    from diffusers import LTXVideoTransformer3DModel

    m = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16,
                                   cross_attention_dim=32, num_layers=6, caption_channels=32)
    g = _g()
    return m.eval(), {"hidden_states": torch.randn(B, 2 * 4 * 4, 8, generator=g),
                      "encoder_hidden_states": torch.randn(B, 4, 32, generator=g), "timestep": torch.tensor([3]),
                      "encoder_attention_mask": torch.ones(B, 4), "num_frames": 2, "height": 4, "width": 4}


def wan() -> Built:
    from diffusers import WanTransformer3DModel

    m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                              out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=6, rope_max_seq_len=32)
    g = _g()
    return m.eval(), {"hidden_states": torch.randn(B, 4, 2, 8, 8, generator=g), "timestep": torch.tensor([3]),
                      "encoder_hidden_states": torch.randn(B, 4, 32, generator=g)}


def hunyuan_video() -> Built:
    from diffusers import HunyuanVideoTransformer3DModel

    m = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                       num_layers=3, num_single_layers=6, num_refiner_layers=1, patch_size=2,
                                       text_embed_dim=32, pooled_projection_dim=32, rope_axes_dim=(4, 6, 6))
    g = _g()
    return m.eval(), {"hidden_states": torch.randn(B, 4, 2, 8, 8, generator=g), "timestep": torch.tensor([3]),
                      "encoder_hidden_states": torch.randn(B, 4, 32, generator=g),
                      "encoder_attention_mask": torch.ones(B, 4), "pooled_projections": torch.randn(B, 32, generator=g),
                      "guidance": torch.tensor([3500.0])}


def vae_full() -> Built:
    """AutoencoderKL's own forward: encode, the posterior's mode, decode."""
    from diffusers import AutoencoderKL

    m = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), latent_channels=4,
                      norm_num_groups=8, layers_per_block=2)
    return m.eval(), {"sample": torch.randn(B, 3, 16, 16, generator=_g())}


def unet_sdxl() -> Built:
    """An SDXL-like UNet: text-time addition embeddings, a transformer depth per stage, a linear projection."""
    from diffusers import UNet2DConditionModel

    m = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                             down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                             up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                             layers_per_block=2, norm_num_groups=8, attention_head_dim=8,
                             transformer_layers_per_block=(1, 2), use_linear_projection=True,
                             addition_embed_type="text_time", addition_time_embed_dim=8,
                             projection_class_embeddings_input_dim=16 + 6 * 8)
    g = _g()
    return m.eval(), {"sample": torch.randn(B, 4, 16, 16, generator=g), "timestep": torch.tensor([10]),
                      "encoder_hidden_states": torch.randn(B, 6, 32, generator=g),
                      "added_cond_kwargs": {"text_embeds": torch.randn(B, 16, generator=g),
                                            "time_ids": torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]])}}


ZOO: dict[str, Callable[[], Built]] = {
    "llama": _hf("LlamaModel", "LlamaConfig", vocab_size=V, hidden_size=64, intermediate_size=128,
                 num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32),
    "gpt2": _hf("GPT2LMHeadModel", "GPT2Config", vocab_size=V, n_embd=64, n_layer=6, n_head=4, n_positions=32),
    "mixtral": _hf("MixtralModel", "MixtralConfig", vocab_size=V, hidden_size=64, intermediate_size=64,
                   num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                   num_experts_per_tok=2, max_position_embeddings=32),
    "bert": _hf("BertModel", "BertConfig", vocab_size=V, hidden_size=64, num_hidden_layers=6, num_attention_heads=4,
                intermediate_size=128, max_position_embeddings=32),
    "clip_text": _hf("CLIPTextModel", "CLIPTextConfig", vocab_size=V, hidden_size=64, num_hidden_layers=6,
                     num_attention_heads=4, intermediate_size=128, max_position_embeddings=32),
    "t5": _seq2seq("T5ForConditionalGeneration", "T5Config", vocab_size=V, d_model=64, d_kv=16, d_ff=128,
                   num_layers=4, num_heads=4, decoder_start_token_id=0),
    "bart": _seq2seq("BartForConditionalGeneration", "BartConfig", vocab_size=V, d_model=64, encoder_layers=4,
                     decoder_layers=4, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                     decoder_ffn_dim=128, max_position_embeddings=32),
    "whisper": whisper,
    "vit": vit,
    "unet": unet,
    "vae_decode": vae,
    "flux": flux,
    "dit": dit,
    "sd3": sd3,
    "mistral": _hf("MistralModel", "MistralConfig", **_LLM),
    "qwen2": _hf("Qwen2Model", "Qwen2Config", **_LLM),
    "qwen3": _hf("Qwen3Model", "Qwen3Config", head_dim=16, **_LLM),
    "gpt_neox": _hf("GPTNeoXModel", "GPTNeoXConfig", vocab_size=V, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=6, num_attention_heads=4, max_position_embeddings=32),
    "opt": _hf("OPTModel", "OPTConfig", vocab_size=V, hidden_size=64, ffn_dim=128, num_hidden_layers=6,
               num_attention_heads=4, max_position_embeddings=32, word_embed_proj_dim=64),
    "phi": _hf("PhiModel", "PhiConfig", **_LLM),
    "gemma": _hf("GemmaModel", "GemmaConfig", head_dim=16, **_LLM),
    "gemma2": _hf("Gemma2Model", "Gemma2Config", head_dim=16, sliding_window=4, **_LLM),
    "falcon": _hf("FalconModel", "FalconConfig", vocab_size=V, hidden_size=64, num_hidden_layers=6,
                  num_attention_heads=4, new_decoder_architecture=True, num_kv_heads=2),
    "qwen2_moe": _hf("Qwen2MoeModel", "Qwen2MoeConfig", vocab_size=V, hidden_size=64, intermediate_size=128,
                     moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=4,
                     num_experts_per_tok=2, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                     max_position_embeddings=32),
    "roberta": _hf("RobertaModel", "RobertaConfig", vocab_size=V, hidden_size=64, num_hidden_layers=6,
                   num_attention_heads=4, intermediate_size=128, max_position_embeddings=40, pad_token_id=1),
    "t5_encoder": _hf("T5EncoderModel", "T5Config", vocab_size=V, d_model=64, d_kv=16, d_ff=128, num_layers=6,
                      num_heads=4),
    "clip": clip,
    "clip_vision": _dict_input("CLIPVisionModel", "CLIPVisionConfig", _pixels, hidden_size=64, num_hidden_layers=6,
                               num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=8),
    "transformer2d": transformer2d,
    "pixart": pixart,
    "cogvideox": cogvideox,
    "ltx_video": ltx,
    "wan": wan,
    "hunyuan_video": hunyuan_video,
    "vae": vae_full,
    "unet_sdxl": unet_sdxl,
}

# Near-copies of a default architecture (a Llama-like decoder, BERT, the towers of the whole CLIP, PixArt's
# transformer blocks): run with ``-m slow`` so the default zoo stays short on a shared 2-core machine; the
# benchmark runs every one.
SLOW = frozenset({"mistral", "qwen2", "qwen3", "gemma", "phi", "gpt_neox", "opt", "roberta", "clip_text",
                  "clip_vision", "transformer2d"})


def build(name: str, seed: int = 0) -> Built:
    """``ZOO[name]`` built with the torch seed fixed (two calls give identical weights)."""
    torch.manual_seed(seed)
    return ZOO[name]()
