"""Builders of tiny, seeded models for the tests: four Hugging Face architectures and the toy.

Every builder constructs from a config object (there is no network access) and returns
``(model.eval(), inputs)`` where ``inputs`` is a kwargs dict: ``model(**inputs)`` runs a forward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from blockrt.pipelines.toy import ToyConfig, ToyTransformer

VOCAB = 128
BATCH, SEQ = 2, 8

Built = tuple[nn.Module, dict[str, Any]]


def _ids(seed: int, vocab: int = VOCAB) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, vocab, (BATCH, SEQ), generator=g)  # (B, T)


def build_toy(seed: int = 0, **overrides: Any) -> Built:
    """The toy transformer with 8 small layers (override any ToyConfig field)."""
    torch.manual_seed(seed)
    cfg = ToyConfig(**{"vocab": VOCAB, "dim": 64, "n_layers": 8, "n_heads": 4, "max_len": 32, **overrides})
    return ToyTransformer(cfg).eval(), {"ids": _ids(seed, cfg.vocab)}


def build_t5_encoder(seed: int = 0) -> Built:
    """T5EncoderModel: 4 blocks under ``encoder.block``; ``shared`` tied to ``encoder.embed_tokens``."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=4, num_heads=4, dropout_rate=0.0,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    return T5EncoderModel(cfg).eval(), {"input_ids": _ids(seed)}


def build_bert(seed: int = 0) -> Built:
    """BertModel: 3 layers under ``encoder.layer``, plus embeddings and pooler."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0,
    )
    return BertModel(cfg).eval(), {"input_ids": _ids(seed)}


def build_gpt2(seed: int = 0) -> Built:
    """GPT2Model: 3 blocks under ``h``."""
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return GPT2Model(cfg).eval(), {"input_ids": _ids(seed)}


def build_llama(seed: int = 0) -> Built:
    """LlamaModel: 3 decoder layers under ``layers`` (grouped-query attention, non-persistent rotary buffers)."""
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=None,
    )
    return LlamaModel(cfg).eval(), {"input_ids": _ids(seed)}


BUILDERS: dict[str, Callable[[], Built]] = {
    "toy": build_toy,
    "t5_encoder": build_t5_encoder,
    "bert": build_bert,
    "gpt2": build_gpt2,
    "llama": build_llama,
}


def stdit3_feed(plain: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """One CFG-batch STDiT3 call (cond row + the model's null caption) on a 3x6x7 latent at t=700, 5 prompt
    tokens; ``plain`` is a materialised STDiT3 (its ``null_caption`` is needed)."""
    cfg = plain.config
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(2, cfg.in_channels, 3, 6, 7, generator=g), "timestep": torch.tensor([700.0, 700.0]),
            "y": torch.cat([torch.randn(1, 1, cfg.model_max_length, cfg.caption_channels, generator=g),
                            plain.null_caption(1)]),
            "mask": torch.tensor([[1] * 5 + [0] * (cfg.model_max_length - 5)]), "fps": torch.tensor([24.0]),
            "height": torch.tensor([48.0]), "width": torch.tensor([56.0])}
