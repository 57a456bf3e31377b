"""The T5-v1.1-XXL text encoder of Open-Sora v1.2: config, tokenizer, prompt encoding (spec §3).

The encoder itself is ``transformers.T5EncoderModel``; nothing here re-implements T5. What is here:

- ``t5_xxl_config()``: the ``DeepFloyd/t5-v1_1-xxl`` architecture (4,762,310,656 parameters) and
  ``t5_tiny_config()`` with the same structure for tests;
- ``load_tokenizer(directory)``: the T5 tokenizer from a local ``spiece.model`` (+ ``tokenizer_config.json`` /
  ``special_tokens_map.json``), built from the SentencePiece model's own pieces, scores and normaliser. In
  transformers 5.x ``T5Tokenizer(vocab_file=...)`` ignores the file and maps every word to ``<unk>``; so the
  pieces are read with ``sentencepiece`` and the normaliser's precompiled charsmap with SentencePiece's own
  protobuf model definition (``sentencepiece_model_pb2``, which needs ``protobuf``);
- ``tokenize`` / ``encode_prompts``: Open-Sora's tokenisation (pad to 300, truncate, EOS appended, the mask
  counts the EOS) and ``y [n, 1, 300, d_model]``;
- ``train_tiny_tokenizer``: a small SentencePiece model in the same format, for tests and small models.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

MAX_LENGTH = 300  # Open-Sora v1.2's model_max_length for T5
EXTRA_IDS = 100  # T5's sentinel tokens <extra_id_0..99>, after the SentencePiece pieces (in reverse order)

# config.json of DeepFloyd/t5-v1_1-xxl (google/t5-v1_1-xxl's, architectures = the encoder only).
XXL_CONFIG_JSON: dict[str, Any] = {
    "architectures": ["T5EncoderModel"],
    "d_ff": 10240,
    "d_kv": 64,
    "d_model": 4096,
    "decoder_start_token_id": 0,
    "dense_act_fn": "gelu_new",
    "dropout_rate": 0.1,
    "eos_token_id": 1,
    "feed_forward_proj": "gated-gelu",
    "initializer_factor": 1.0,
    "is_encoder_decoder": True,
    "is_gated_act": True,
    "layer_norm_epsilon": 1e-06,
    "model_type": "t5",
    "num_decoder_layers": 24,
    "num_heads": 64,
    "num_layers": 24,
    "output_past": True,
    "pad_token_id": 0,
    "relative_attention_max_distance": 128,
    "relative_attention_num_buckets": 32,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "transformers_version": "4.21.0.dev0",
    "use_cache": True,
    "vocab_size": 32128,
}
_ARCH_FIELDS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
                "relative_attention_num_buckets", "relative_attention_max_distance", "dropout_rate",
                "layer_norm_epsilon", "initializer_factor", "feed_forward_proj", "is_encoder_decoder",
                "tie_word_embeddings", "pad_token_id", "eos_token_id", "decoder_start_token_id", "use_cache")
TINY_SIZES: dict[str, Any] = dict(vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=4,
                                  num_decoder_layers=4, num_heads=4)


def t5_config_json(**overrides: Any) -> dict[str, Any]:
    """The ``config.json`` dict of DeepFloyd/t5-v1_1-xxl, with ``overrides`` (e.g. small sizes) applied."""
    unknown = set(overrides) - set(XXL_CONFIG_JSON)
    if unknown:
        raise ValueError(f"unknown T5 config fields {sorted(unknown)}; known: {sorted(XXL_CONFIG_JSON)}")
    return {**XXL_CONFIG_JSON, **overrides}


def _config(d: dict[str, Any]):
    from transformers import T5Config

    return T5Config(architectures=list(d["architectures"]), **{k: d[k] for k in _ARCH_FIELDS})


def t5_xxl_config():
    """``transformers.T5Config`` of DeepFloyd/t5-v1_1-xxl: d_model 4096, 24 layers, 64 heads of 64, d_ff 10240,
    gated-gelu (tanh), vocab 32128, 32 relative buckets up to distance 128, RMS-norm eps 1e-6."""
    return _config(XXL_CONFIG_JSON)


def t5_tiny_config(**overrides: Any):
    """The XXL config with test sizes (vocab 256, d_model 64, 4 layers of 4 heads x 16, d_ff 128) and ``overrides``."""
    return _config(t5_config_json(**{**TINY_SIZES, **overrides}))


# -- tokenizer --------------------------------------------------------------------------------------------


def precompiled_charsmap(model_bytes: bytes) -> bytes | None:
    """The normaliser's precompiled charsmap of a SentencePiece model file (``ModelProto.normalizer_spec.
    precompiled_charsmap``), read with SentencePiece's own protobuf definition; None if empty (identity).

    Raises:
        ValueError: the bytes are not a SentencePiece model.
    """
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(model_bytes)
    except DecodeError as e:
        raise ValueError(f"not a SentencePiece model (ModelProto): {e}") from None
    return proto.normalizer_spec.precompiled_charsmap or None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _token_str(v: Any, default: str) -> str:
    if v is None:
        return default
    return v["content"] if isinstance(v, dict) else str(v)


def load_tokenizer(directory: str | Path, *, model_max_length: int = 512):
    """The T5 tokenizer of a local directory holding ``spiece.model`` (as DeepFloyd/t5-v1_1-xxl ships it).

    Special tokens and ``extra_ids`` come from ``special_tokens_map.json`` / ``tokenizer_config.json`` when
    present (T5's defaults otherwise: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, 100 sentinels). The result is
    checked against SentencePiece itself on a probe text, so a tokenizer that maps words to ``<unk>`` is
    never returned.

    Raises:
        FileNotFoundError: no ``spiece.model`` in ``directory``.
        ValueError: the model's special ids are not T5's, or the tokenizer disagrees with SentencePiece.

    Example:
        >>> tok = load_tokenizer("weights/t5-v1_1-xxl")
        >>> tok("a cat", max_length=300, padding="max_length", truncation=True).input_ids[:4]
    """
    import sentencepiece as spm
    from transformers import T5Tokenizer

    d = Path(directory)
    spiece = d / "spiece.model"
    if not spiece.is_file():
        found = sorted(p.name for p in d.iterdir()) if d.is_dir() else "the directory does not exist"
        raise FileNotFoundError(f"expected the T5 SentencePiece model {spiece}; found {found}")
    conf = {**_read_json(d / "tokenizer_config.json"), **_read_json(d / "special_tokens_map.json")}
    pad = _token_str(conf.get("pad_token"), "<pad>")
    eos = _token_str(conf.get("eos_token"), "</s>")
    unk = _token_str(conf.get("unk_token"), "<unk>")
    extra_ids = int(conf.get("extra_ids", EXTRA_IDS))

    model_bytes = spiece.read_bytes()
    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    ids = {"pad": (sp.pad_id(), pad, 0), "eos": (sp.eos_id(), eos, 1), "unk": (sp.unk_id(), unk, 2)}
    wrong = [f"{name} {tok!r} has id {got} (piece {sp.id_to_piece(got) if got >= 0 else None!r}), T5 needs {want}"
             for name, (got, tok, want) in ids.items() if got != want or sp.id_to_piece(got) != tok]
    if wrong:
        raise ValueError(f"{spiece}: not a T5 SentencePiece model: " + "; ".join(wrong))
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    vocab += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(extra_ids))]  # <extra_id_0> is the last id
    tok = T5Tokenizer(vocab=vocab, eos_token=eos, unk_token=unk, pad_token=pad, extra_ids=extra_ids,
                      _spm_precompiled_charsmap=precompiled_charsmap(model_bytes),
                      model_max_length=model_max_length)
    _check_against_sentencepiece(tok, sp, spiece)
    return tok


def _check_against_sentencepiece(tok: Any, sp: Any, path: Path) -> None:
    """Tokenize a probe made of the model's own pieces both ways; they must agree and not be all <unk>."""
    words = []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i)) and len(piece) > 1:
            words.append(piece)
        if len(words) == 12:
            break
    probe = sp.decode_pieces(words) if words else "a"
    want = sp.encode(probe) + [sp.eos_id()]
    got = tok(probe).input_ids
    if got != want or all(t == sp.unk_id() for t in got[:-1]):
        raise ValueError(f"{path}: the tokenizer built from this SentencePiece model disagrees with SentencePiece on "
                         f"{probe!r}: {got} vs {want}")


def train_tiny_tokenizer(texts: Sequence[str], directory: str | Path, vocab_size: int = 200) -> Path:
    """Train a small SentencePiece unigram model on ``texts`` and write it as a T5 tokenizer directory.

    Writes ``spiece.model``, ``special_tokens_map.json`` and ``tokenizer_config.json`` like
    DeepFloyd/t5-v1_1-xxl (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, no BOS, NFKC normalisation, 100 sentinels).
    ``vocab_size`` is an upper bound: a small corpus yields fewer pieces. Deterministic for the same texts.

    Returns:
        ``directory``, ready for ``load_tokenizer``.
    """
    import sentencepiece as spm

    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError("train_tiny_tokenizer needs at least one non-empty text")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    model = d / "spiece.model"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(d / "spiece"), vocab_size=vocab_size,
        hard_vocab_limit=False, model_type="unigram", character_coverage=1.0, normalization_rule_name="nmt_nfkc",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        num_threads=1, minloglevel=2)
    (d / "spiece.vocab").unlink(missing_ok=True)
    extra = [f"<extra_id_{i}>" for i in range(EXTRA_IDS)]
    special = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", "additional_special_tokens": extra}
    (d / "special_tokens_map.json").write_text(json.dumps(special) + "\n")
    (d / "tokenizer_config.json").write_text(json.dumps(
        {**special, "extra_ids": EXTRA_IDS, "model_max_length": 512, "tokenizer_class": "T5Tokenizer"}, indent=2) + "\n")
    log.info("trained a SentencePiece model of %d pieces into %s", _piece_count(model), d)
    return d


def _piece_count(model: Path) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(model)).get_piece_size()


# -- encoding ---------------------------------------------------------------------------------------------


def tokenize(tokenizer: Any, prompts: Sequence[str], max_length: int = MAX_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
    """Open-Sora's T5 tokenisation: ids and mask ``[n, max_length]`` (int64); padded with ``<pad>`` (0),
    truncated so that ``</s>`` still ends the text, the mask counting the ``</s>``."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings, not one string; wrap it: [prompt]")
    enc = tokenizer(list(prompts), max_length=max_length, padding="max_length", truncation=True,
                    add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    return enc.input_ids, enc.attention_mask


def encode_prompts(tokenizer: Any, model: Any, prompts: Sequence[str], max_length: int = MAX_LENGTH,
                   device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode prompts as Open-Sora's ``T5Encoder.encode`` does.

    Args:
        tokenizer: from ``load_tokenizer``.
        model: a ``T5EncoderModel`` or anything called the same way (e.g. a ``blockrt`` Runtime streaming one).
        prompts: n prompt strings (already cleaned; Open-Sora lower-cases and appends the aesthetic score).
        max_length: tokens per prompt (300 in Open-Sora v1.2).
        device: where the ids go; default: ``model.device`` (a Runtime's compute device), CPU for meta.

    Returns:
        ``y [n, 1, max_length, d_model]`` (the encoder's last hidden state; padding positions keep their
        outputs) and ``mask [n, max_length]`` (int64, 1 for text tokens and the EOS).
    """
    ids, mask = tokenize(tokenizer, prompts, max_length)
    if device is None:
        device = getattr(model, "device", None) or "cpu"
        if torch.device(device).type == "meta":
            device = "cpu"
    with torch.no_grad():
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device))
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # (n, L, d)
    return hidden[:, None], mask  # (n, 1, L, d), (n, L)
