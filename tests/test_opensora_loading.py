"""Open-Sora checkpoints: random ones written in the real layout, read back from local HF-style directories.

Covers the T5 tokenizer (a tiny SentencePiece model, Open-Sora's padding/EOS/mask), the writer (the full-size
layout against the key dumps, without writing 25 GB; byte-exact torch.save files; the cache), the loaders
(meta skeletons streamed by blockrt equal the models loaded normally, .bin and safetensors), and one clear
error per kind of damage.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest
import torch

import blockrt
from models import stdit3_feed
from blockrt.pipelines.opensora import checkpoint_layout as layout
from blockrt.pipelines.opensora import random_weights as rw
from blockrt.pipelines.opensora import tensor_files
from blockrt.pipelines.opensora.bin_checkpoint import load_bin
from blockrt.pipelines.opensora.loading import CheckpointError, check_weights, load_stdit3, load_t5, load_vae
from blockrt.pipelines.opensora.t5 import (MAX_LENGTH, encode_prompts, load_tokenizer, precompiled_charsmap,
                                   t5_tiny_config, t5_xxl_config, tokenize, train_tiny_tokenizer)

FIXTURES = Path(__file__).parent / "fixtures" / "opensora_keys"
BUDGET = "64MB"
XXL_SHARD_BYTES = (9_452_249_088, 9_596_993_536)  # the real pytorch_model-0000{1,2}-of-00002.bin: 9.45 + 9.60 GB
MAX_ACTIVATION = 1e3  # random weights must keep every layer's output O(1), far from overflow
CAPTIONS = [
    "a beautiful waterfall in a green forest aesthetic score: 6.5.",
    "a cat sitting on a red chair in the sun aesthetic score: 6.5.",
    "the quick brown fox jumps over the lazy dog aesthetic score: 6.5.",
    "drone shot of a city at night with bright lights aesthetic score: 6.5.",
    "a close up of waves crashing on the beach at sunset aesthetic score: 6.5.",
] * 10
PROMPTS = ["a cat sitting on a chair aesthetic score: 6.5.", "waves on the beach at night"]

@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return train_tiny_tokenizer(CAPTIONS, tmp_path_factory.mktemp("tokenizer"), vocab_size=120)


@pytest.fixture(scope="module")
def t5_dirs(random_checkpoints, tok_dir):
    """Tiny T5 checkpoints in both real layouts: {'bin': dir, 'safetensors': dir}."""
    return {fmt: random_checkpoints(("t5",), t5_format=fmt, tokenizer=tok_dir)["t5"] for fmt in layout.T5_FORMATS}


def _dump(name: str) -> dict[str, tuple[int, ...]]:
    return {e["key"]: tuple(e["shape"]) for e in json.loads((FIXTURES / name).read_text())["state_dict"]}


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".blockrt-safetensors"))  # not another test's conversion
    return dst


# -- tokenizer ----------------------------------------------------------------------------------------------


def test_tokenizer_uses_the_sentencepiece_model(tok_dir):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "spiece.model"))
    tok = load_tokenizer(tok_dir)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)  # T5's ids
    assert tok.convert_tokens_to_ids("<extra_id_0>") == len(tok) - 1  # sentinels after the pieces, reversed
    for text in PROMPTS + ["A  Waterfall,   AT night!", "ｆｕｌｌ-width ünïcödé ½"]:
        ids = tok(text).input_ids
        assert ids == sp.encode(text) + [1], text  # exactly SentencePiece's pieces, then </s>
    words = tok("a beautiful waterfall in the forest").input_ids[:-1]
    assert tok.unk_token_id not in words and len(words) >= 5  # real words, not <unk> (the transformers 5 pitfall)


def test_tokenization_pads_truncates_and_masks_as_open_sora(tok_dir):
    tok = load_tokenizer(tok_dir)
    long = "the quick brown fox " * 200
    ids, mask = tokenize(tok, [PROMPTS[0], long])
    assert ids.shape == mask.shape == (2, MAX_LENGTH) and ids.dtype == mask.dtype == torch.int64
    n = len(tok(PROMPTS[0]).input_ids)  # text tokens + </s>
    assert mask[0].tolist() == [1] * n + [0] * (MAX_LENGTH - n)  # the mask counts the EOS
    assert ids[0, n - 1] == tok.eos_token_id and (ids[0, n:] == tok.pad_token_id).all()
    assert mask[1].all() and ids[1, -1] == tok.eos_token_id  # truncated to 300 with </s> kept last
    with pytest.raises(TypeError, match="sequence of strings"):
        tokenize(tok, PROMPTS[0])


def test_tokenizer_refuses_a_directory_without_spiece_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="spiece.model"):
        load_tokenizer(tmp_path)


def test_precompiled_charsmap_is_the_models_normaliser(tok_dir):
    """Read through SentencePiece's own ModelProto: the NFKC map the trainer compiled in; garbage is refused."""
    from sentencepiece import sentencepiece_model_pb2

    data = (tok_dir / "spiece.model").read_bytes()
    charsmap = precompiled_charsmap(data)
    assert isinstance(charsmap, bytes) and len(charsmap) > 1000  # nmt_nfkc: a compiled table, not the identity
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(data)
    proto.normalizer_spec.precompiled_charsmap = b""
    assert precompiled_charsmap(proto.SerializeToString()) is None  # identity normaliser
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        precompiled_charsmap(b"\xff\xff\xff not a protobuf")


def test_configs():
    xxl = t5_xxl_config()
    assert (xxl.d_model, xxl.num_layers, xxl.num_heads, xxl.d_kv, xxl.d_ff, xxl.vocab_size) == (4096, 24, 64, 64, 10240, 32128)
    assert (xxl.feed_forward_proj, xxl.dense_act_fn, xxl.is_gated_act) == ("gated-gelu", "gelu_new", True)
    assert (xxl.relative_attention_num_buckets, xxl.relative_attention_max_distance, xxl.layer_norm_epsilon) == (32, 128, 1e-6)
    tiny = t5_tiny_config(num_layers=2)
    assert tiny.num_layers == 2 and tiny.feed_forward_proj == "gated-gelu"


# -- the writer: layout ---------------------------------------------------------------------------------------


def test_full_size_layout_matches_the_key_dumps():
    """Names, shapes and files of the 25 GB of checkpoints, planned without writing them."""
    plan = rw.write_random_checkpoints("unused", dry_run=True)
    by_dir: dict[str, dict[str, tuple[int, ...]]] = {}
    for p in plan:
        assert p.dtype == "float32"
        by_dir.setdefault(p.file.split("/")[0], {})[p.key] = p.shape
    assert by_dir["t5-v1_1-xxl"] == _dump("t5_v1_1_xxl_encoder.json")  # 220, both names of the embedding
    assert by_dir["OpenSora-STDiT-v3"] == _dump("stdit3_xl2.json")  # 973
    assert by_dir["OpenSora-VAE-v1.2"] == _dump("vae_v1_2_pipeline.json")  # 517
    assert {p.file for p in plan} == {"OpenSora-STDiT-v3/model.safetensors", "OpenSora-VAE-v1.2/model.safetensors",
                                      "t5-v1_1-xxl/pytorch_model-00001-of-00002.bin",
                                      "t5-v1_1-xxl/pytorch_model-00002-of-00002.bin"}
    spec = layout.t5_spec("full", "bin")
    assert tuple(sum(e.nbytes for e in f.tensors if e.storage is None) for f in spec.files) == XXL_SHARD_BYTES
    assert spec.files[0].tensors[-1].key == "encoder.block.11.layer.1.DenseReluDense.wi_0.weight"
    index = spec.json_files["pytorch_model.bin.index.json"]
    assert index["metadata"]["total_size"] == layout.XXL_COUNTED_BYTES and len(index["weight_map"]) == 220
    st = layout.t5_spec("full", "safetensors")  # the hub's refs/pr/3 conversion: the tied embedding stored once
    st_keys = {e.key: e.shape for f in st.files for e in f.tensors}
    assert st_keys == {k: s for k, s in _dump("t5_v1_1_xxl_encoder.json").items() if k != "encoder.embed_tokens.weight"}
    assert [f.name for f in st.files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    # the real hub files' sizes, to the byte: same keys, shapes and header layout (spec §6)
    for spec, config_bytes, file_bytes in ((layout.stdit3_spec(), 688, 4_835_598_472), (layout.vae_spec(), 673, 1_573_430_548)):
        f = spec.files[0]
        assert tensor_files.safetensors_header([(e.key, e.shape, e.dtype) for e in f.tensors])[2] == file_bytes
        assert len(json.dumps(spec.json_files["config.json"], indent=2) + "\n") == config_bytes
    vae_spec = layout.vae_spec()
    vae, init = {e.key: e for e in vae_spec.files[0].tensors}, rw.initializer(vae_spec)
    assert init(vae["scale"]) == ("values", [3.85, 2.32, 2.33, 3.06]) and init(vae["shift"]) == ("values", [-0.1, 0.34, 0.27, 0.98])
    assert layout.stdit3_spec().json_files["config.json"]["model_type"] == "STDiT3"


def test_written_files_hold_what_the_plan_says(random_checkpoints, t5_dirs):
    from blockrt.safetensors_format import read_header

    out = random_checkpoints(("stdit3", "vae"))
    out["t5"] = t5_dirs["bin"]
    plan = layout.checkpoint_plan(size="tiny")
    found = set()
    for comp, d in out.items():
        for f in sorted(d.iterdir()):
            if f.suffix == ".safetensors":
                found |= {(f"{d.name}/{f.name}", k, s.shape, s.dtype) for k, s in read_header(f)[0].items()}
            elif f.suffix == ".bin":
                found |= {(f"{d.name}/{f.name}", k, tuple(t.shape), str(t.dtype)[6:]) for k, t in load_bin(f).items()}
    assert found == {tuple(p) for p in plan}
    names = sorted(p.name for p in t5_dirs["bin"].iterdir())
    assert names == [".blockrt-random.json", "config.json", "pytorch_model-00001-of-00002.bin",
                     "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json", "special_tokens_map.json",
                     "spiece.model", "tokenizer_config.json"]
    cfg = json.loads((t5_dirs["bin"] / "config.json").read_text())
    assert cfg["model_type"] == "t5" and cfg["architectures"] == ["T5EncoderModel"] and cfg["d_model"] == 64
    sd = load_bin(t5_dirs["bin"] / "pytorch_model-00001-of-00002.bin")  # the tie is one storage, as torch.save keeps it
    assert sd["shared.weight"].untyped_storage().data_ptr() == sd["encoder.embed_tokens.weight"].untyped_storage().data_ptr()


def test_bin_writer_writes_what_torch_save_writes(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {"emb": torch.randn(7, 3, generator=g), "w": torch.randn(2, 5, 1, generator=g), "n": torch.ones(4)}
    sd["emb_alias"] = sd["emb"].detach()  # a tied weight: one storage, two names
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    torch.save(sd, tmp_path / "a" / "model.bin")
    specs = [(k, tuple(t.shape), "float32", "emb" if k == "emb_alias" else None) for k, t in sd.items()]
    tensor_files.write_torch_bin(tmp_path / "b" / "model.bin", specs, lambda k: sd[k])
    assert (tmp_path / "a" / "model.bin").read_bytes() == (tmp_path / "b" / "model.bin").read_bytes()


def test_command_line_writes_the_tiny_layout(tmp_path, capsys):
    rw.main([str(tmp_path), "--which", "stdit3", "--size", "tiny", "--seed", "1"])
    assert "stdit3:" in capsys.readouterr().out
    assert (tmp_path / "OpenSora-STDiT-v3" / "model.safetensors").is_file()


def test_writer_is_deterministic_cached_and_never_touches_other_directories(tmp_path, t5_dirs):
    a = rw.write_random_checkpoints(tmp_path / "a", ("stdit3",), seed=3, size="tiny")["stdit3"]
    b = rw.write_random_checkpoints(tmp_path / "b", ("stdit3",), seed=3, size="tiny")["stdit3"]
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    mtime = (a / "model.safetensors").stat().st_mtime_ns
    assert rw.write_random_checkpoints(tmp_path / "a", ("stdit3",), seed=3, size="tiny")["stdit3"] == a
    assert (a / "model.safetensors").stat().st_mtime_ns == mtime  # complete: reused, not rewritten
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".tmp")]
    with pytest.raises(FileExistsError, match="overwrite=True"):
        rw.write_random_checkpoints(tmp_path / "a", ("stdit3",), seed=4, size="tiny")
    rw.write_random_checkpoints(tmp_path / "a", ("stdit3",), seed=4, size="tiny", overwrite=True)
    assert (a / "model.safetensors").read_bytes() != (b / "model.safetensors").read_bytes()
    (a / "model.safetensors").write_bytes(b"damaged")  # incomplete cache: rewritten only when asked
    with pytest.raises(FileExistsError):
        rw.write_random_checkpoints(tmp_path / "a", ("stdit3",), seed=4, size="tiny")
    real = tmp_path / "real" / "OpenSora-STDiT-v3"
    real.mkdir(parents=True)
    with pytest.raises(FileExistsError, match="not a random checkpoint"):
        rw.write_random_checkpoints(tmp_path / "real", ("stdit3",), size="tiny", overwrite=True)
    # a tensor's values depend on (seed, component, key) only: the .bin and safetensors T5 agree
    from safetensors.torch import load_file

    st = load_file(t5_dirs["safetensors"] / "model-00002-of-00002.safetensors")
    pt = load_bin(t5_dirs["bin"] / "pytorch_model-00002-of-00002.bin")
    assert st.keys() == pt.keys() and all(torch.equal(st[k], pt[k]) for k in st)


def test_random_values_are_not_degenerate(t5_dirs, random_checkpoints):
    from safetensors.torch import load_file

    d = random_checkpoints(("stdit3", "vae"))
    st = load_file(d["stdit3"] / "model.safetensors")
    vae = load_file(d["vae"] / "model.safetensors")
    t5 = {**load_bin(t5_dirs["bin"] / "pytorch_model-00001-of-00002.bin"),
          **load_bin(t5_dirs["bin"] / "pytorch_model-00002-of-00002.bin")}
    for name, sd in (("stdit3", st), ("vae", vae), ("t5", t5)):
        for k, t in sd.items():
            assert torch.isfinite(t).all() and t.abs().max() > 0, f"{name} {k}"
            if t.numel() > 1 and k not in ("rope.freqs", "scale", "shift"):
                assert t.std() > 0, f"{name} {k} is constant"
            if t.ndim == 1 and k.endswith("weight") and k != "rope.freqs":  # norm weights near 1
                assert (t - 1).abs().max() < 0.2, f"{name} {k}"
    # what Open-Sora zero-initialises is small but not zero: well under a plain 1/sqrt(fan_in) weight
    for k in ("temporal_blocks.1.attn.proj.weight", "temporal_blocks.0.mlp.fc2.weight", "final_layer.linear.weight",
              "temporal_blocks.1.cross_attn.proj.weight", "fps_embedder.mlp.2.weight", "t_block.1.weight"):
        assert 0 < st[k].std() < 0.5 / st[k].shape[1] ** 0.5, k
    assert 0 < st["spatial_blocks.0.scale_shift_table"].std() < 0.2  # Open-Sora's randn / sqrt(hidden)
    assert torch.equal(st["rope.freqs"], 1.0 / 10000 ** (torch.arange(0, 16, 2).float() / 16))
    assert torch.equal(vae["scale"].flatten(), torch.tensor([3.85, 2.32, 2.33, 3.06]))
    assert t5["shared.weight"].std().item() == pytest.approx(1.0, abs=0.05)  # embeddings ~ N(0, 1)


def test_deep_random_t5_stays_finite_and_order_one(random_checkpoints):
    """24 layers (the XXL depth) with the writer's scale rules: every block's output stays O(1)."""
    d = random_checkpoints(("t5",), t5_format="safetensors",
                           overrides={"t5": {"num_layers": 24, "d_model": 128, "d_ff": 320}})["t5"]
    model, _ = load_t5(d, meta=False)
    peaks = []
    for block in model.encoder.block:
        block.register_forward_hook(lambda m, a, out: peaks.append(out[0].abs().max().item()))
    ids = torch.randint(3, 200, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(input_ids=ids).last_hidden_state
    assert len(peaks) == 24 and max(peaks) < MAX_ACTIVATION
    assert torch.isfinite(y).all() and 0.3 < y.std() < 3  # after the final RMS norm


# -- the loaders -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", layout.T5_FORMATS)
def test_t5_streams_from_the_real_layout_identically(fmt, t5_dirs, tmp_path):
    """The meta skeleton streamed by blockrt equals the T5EncoderModel that transformers loads normally."""
    from transformers import T5EncoderModel

    d = _copy(t5_dirs[fmt], tmp_path / "t5")  # the .bin shards are converted into the directory: not the shared one
    tok = load_tokenizer(d)
    plain = T5EncoderModel.from_pretrained(d).eval()  # transformers' own loading of the same files
    y_ref, mask_ref = encode_prompts(tok, plain, PROMPTS)
    assert y_ref.shape == (2, 1, MAX_LENGTH, 64) and torch.isfinite(y_ref).all()
    model, weights = load_t5(d)
    assert all(p.is_meta for p in model.parameters())
    if fmt == "bin":  # converted once into safetensors next to the shards
        assert weights == d / ".blockrt-safetensors" / "model.safetensors.index.json"
        assert sorted(p.name for p in weights.parent.glob("*.safetensors")) == [
            "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    else:
        assert weights == d / "model.safetensors.index.json"
    with blockrt.run(model, budget=BUDGET, weights=weights) as rt:
        for _ in range(2):
            y, mask = encode_prompts(tok, rt, PROMPTS)
            assert torch.equal(y, y_ref) and torch.equal(mask, mask_ref)
    loaded, _ = load_t5(d, meta=False)
    assert loaded.shared.weight is loaded.encoder.embed_tokens.weight  # the tie survives loading
    assert torch.equal(encode_prompts(tok, loaded, PROMPTS)[0], y_ref)


def test_bin_conversion_happens_once_and_follows_the_sources(tmp_path, t5_dirs):
    d = _copy(t5_dirs["bin"], tmp_path / "t5")
    _, w1 = load_t5(d, cache_dir=tmp_path / "cache")
    assert w1.parent == tmp_path / "cache" and not (d / ".blockrt-safetensors").exists()
    mtime = w1.stat().st_mtime_ns
    _, w2 = load_t5(d, cache_dir=tmp_path / "cache")
    assert w2 == w1 and w1.stat().st_mtime_ns == mtime  # reused
    shard = d / "pytorch_model-00002-of-00002.bin"
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))  # the source changed
    _, w3 = load_t5(d, cache_dir=tmp_path / "cache")
    assert w3 == w1 and w3.stat().st_mtime_ns != mtime  # converted again
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "mine.txt").write_text("not a conversion")
    shard.touch()
    with pytest.raises(CheckpointError, match="refusing to replace"):
        load_t5(d, cache_dir=tmp_path / "elsewhere")


def test_stdit3_loads_on_meta_and_streams_identically(random_checkpoints):
    d = random_checkpoints(("stdit3",))["stdit3"]
    plain, _ = load_stdit3(d, meta=False)
    model, weights = load_stdit3(d)
    assert weights == d / "model.safetensors" and all(p.is_meta for p in model.parameters())
    feed = stdit3_feed(plain)
    with torch.no_grad():
        ref = plain(**feed)
    assert torch.isfinite(ref).all() and 0 < ref.abs().max() < MAX_ACTIVATION
    with blockrt.run(model, budget=BUDGET, weights=weights) as rt:
        assert torch.equal(rt(**feed), ref)


def test_deep_random_stdit3_stays_finite_and_order_one(random_checkpoints):
    """28 spatial + 28 temporal blocks (the XL/2 depth) with the writer's scale rules stay O(1)."""
    d = random_checkpoints(("stdit3",), overrides={"stdit3": {"depth": 28}})["stdit3"]
    model, _ = load_stdit3(d, meta=False)
    cfg = model.config
    peaks = []
    for block in [*model.spatial_blocks, *model.temporal_blocks]:
        block.register_forward_hook(lambda m, a, out: peaks.append(out.abs().max().item()))
    g = torch.Generator().manual_seed(0)
    y = torch.cat([torch.randn(1, 1, cfg.model_max_length, cfg.caption_channels, generator=g), model.null_caption(1)])
    with torch.no_grad():
        out = model(torch.randn(2, 4, 3, 6, 7, generator=g), torch.tensor([900.0, 900.0]), y,
                    mask=torch.tensor([[1] * 9 + [0] * (cfg.model_max_length - 9)]), fps=torch.tensor([24.0]),
                    height=torch.tensor([48.0]), width=torch.tensor([56.0]))
    assert len(peaks) == 56 and max(peaks) < MAX_ACTIVATION
    assert torch.isfinite(out).all() and 0.01 < out.std() < 10


def test_vae_loads_on_meta_and_whole(random_checkpoints):
    from safetensors.torch import load_file

    from blockrt.pipelines.opensora.loading import vae_config_from_json
    from blockrt.pipelines.opensora.vae import VideoAutoencoderPipeline

    d = random_checkpoints(("vae",))["vae"]
    model, weights = load_vae(d)
    assert weights == d / "model.safetensors" and all(t.is_meta for t in model.state_dict().values())
    loaded, _ = load_vae(d, meta=False)
    ref = VideoAutoencoderPipeline(vae_config_from_json(json.loads((d / "config.json").read_text()))).eval()
    ref.load_state_dict(load_file(weights))
    z = torch.randn(1, 4, 5, 2, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        video = loaded.decode(z, num_frames=17)
        assert torch.equal(video, ref.decode(z, num_frames=17))
    assert video.shape == (1, 3, 17, 16, 16) and torch.isfinite(video).all() and video.abs().max() < MAX_ACTIVATION
    assert torch.equal(loaded.scale.flatten(), torch.tensor([3.85, 2.32, 2.33, 3.06]))


def test_loading_real_weights_never_imports_the_random_weights_writer():
    """The loaders and pipelines depend on the layout only: loading the shipped shapes weights, in a fresh
    process, leaves the random-weights writer unimported."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from blockrt.pipelines.opensora import loading, pipeline\n"
            "from blockrt.pipelines.shapes import generate\n"
            "from blockrt.pipelines.shapes.layout import WEIGHTS_DIR\n"
            "for load, d in ((loading.load_vae, 'OpenSora-VAE-v1.2'), (loading.load_stdit3, 'OpenSora-STDiT-v3'),\n"
            "                (loading.load_t5, 't5-v1_1-xxl')):\n"
            "    load(WEIGHTS_DIR / d)\n"
            "assert 'blockrt.pipelines.opensora.random_weights' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# -- one clear error per kind of damage -----------------------------------------------------------------------


def _rewrite_shard(path: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    sd = dict(load_file(path))
    edit(sd)
    save_file(sd, path, metadata={"format": "pt"})


def test_missing_unexpected_and_misshapen_keys_are_one_error(tmp_path, t5_dirs):
    d = _copy(t5_dirs["safetensors"], tmp_path / "t5")

    def edit(sd):
        del sd["encoder.final_layer_norm.weight"]
        sd["encoder.block.3.layer.0.SelfAttention.q.weight"] = torch.zeros(5, 5)
        sd["decoder.block.0.layer.0.SelfAttention.q.weight"] = torch.zeros(2)

    _rewrite_shard(d / "model-00002-of-00002.safetensors", edit)
    with pytest.raises(CheckpointError) as e:
        load_t5(d)
    msg = str(e.value)
    assert "missing keys (1): encoder.final_layer_norm.weight" in msg
    assert "wrong shape or dtype (1): encoder.block.3.layer.0.SelfAttention.q.weight: expected float32[64, 64], found float32[5, 5]" in msg
    assert "unexpected keys (1): decoder.block.0.layer.0.SelfAttention.q.weight" in msg


def _rewrite_bin(path: Path, edit) -> None:
    sd = {k: v.clone() for k, v in load_bin(path).items()}
    edit(sd)
    torch.save(sd, path)


@pytest.mark.parametrize("fmt", layout.T5_FORMATS)
def test_either_name_of_the_tied_embedding_is_enough_but_not_neither(fmt, tmp_path, t5_dirs):
    d = _copy(t5_dirs[fmt], tmp_path / "t5")
    shard, rewrite = ((d / "model-00001-of-00002.safetensors", _rewrite_shard) if fmt == "safetensors"
                      else (d / "pytorch_model-00001-of-00002.bin", _rewrite_bin))
    rewrite(shard, lambda sd: sd.update({"encoder.embed_tokens.weight": sd.pop("shared.weight")}))
    model, weights = load_t5(d)
    check_weights(model, weights)
    with blockrt.run(model, budget=BUDGET, weights=weights) as rt:
        assert torch.isfinite(rt(input_ids=torch.tensor([[5, 6, 1]])).last_hidden_state).all()
    rewrite(shard, lambda sd: sd.pop("encoder.embed_tokens.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): shared.weight = encoder.embed_tokens.weight"):
        load_t5(d)


@pytest.mark.parametrize("fmt", layout.T5_FORMATS)
def test_truncated_file_is_a_clear_error(fmt, tmp_path, t5_dirs):
    d = _copy(t5_dirs[fmt], tmp_path / "t5")
    shard = sorted(d.glob("*.safetensors" if fmt == "safetensors" else "*.bin"))[1]
    with open(shard, "rb+") as f:
        f.truncate(shard.stat().st_size // 2)
    with pytest.raises(CheckpointError, match="truncated") as e:
        load_t5(d)
    assert shard.name in str(e.value)


@pytest.mark.parametrize("fmt", layout.T5_FORMATS)
def test_missing_shard_and_config_are_listed_together(fmt, tmp_path, t5_dirs):
    d = _copy(t5_dirs[fmt], tmp_path / "t5")
    shard = sorted(d.glob("*.safetensors" if fmt == "safetensors" else "*.bin"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"missing.*{shard.name}"):
        load_t5(d)
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError) as e:
        load_t5(d)
    assert "missing config.json" in str(e.value) and shard.name in str(e.value)


def test_empty_or_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_t5(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(CheckpointError, match="no weights: expected model.safetensors"):
        load_t5(tmp_path)


class _Payload:
    """Unpickling this would create a file: a .bin holding it must be refused before that can happen."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_a_bin_with_objects_other_than_tensors_is_refused_unread(tmp_path, t5_dirs):
    d = _copy(t5_dirs["bin"], tmp_path / "t5")
    shard = d / "pytorch_model-00002-of-00002.bin"
    sd = load_bin(shard)
    canary = tmp_path / "unpickled"
    torch.save({**{k: v.clone() for k, v in sd.items()}, "payload": _Payload(canary)}, shard)
    with pytest.raises(CheckpointError, match="refused.*weights_only=True") as e:
        load_t5(d)
    assert shard.name in str(e.value) and not canary.exists()
    torch.save({**{k: v.clone() for k, v in sd.items()}, "step": 7}, shard)  # allowed by weights_only, still not a tensor
    with pytest.raises(CheckpointError, match="'step' \\(int\\)"):
        load_t5(d)
    assert zipfile.is_zipfile(shard)


# -- real widths (slow) ----------------------------------------------------------------------------------------


class _AnonPeak:
    """Peak anonymous RSS above the baseline while the block runs, sampled every 2 ms on a thread."""

    def __enter__(self) -> "_AnonPeak":
        import threading

        from blockrt import read_rss

        self._read = read_rss
        self.base = self.peak = read_rss().anon
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._read().anon)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._read().anon)

    @property
    def delta(self) -> int:
        return self.peak - self.base


@pytest.mark.slow
def test_full_width_t5_is_written_and_converted_in_bounded_memory_and_stays_order_one(tmp_path):
    """XXL widths (d_model 4096, 64 heads, d_ff 10240), 2 of the 24 layers: 2.1 GB of .bin shards. Writing holds
    about one tensor (the 526 MB embedding) of anonymous memory, converting almost none (the shards are
    mapped), and the random weights keep activations O(1) at the real width."""
    from blockrt.malloc import pin_malloc_mmap_threshold, trim_malloc

    pin_malloc_mmap_threshold()  # freed tensors leave RSS at once, so the peak is what is really held
    trim_malloc()
    emb = 32128 * 4096 * 4
    layout.t5_spec("tiny")  # imports (transformers' T5) before measuring
    with _AnonPeak() as write:
        d = rw.write_random_checkpoints(tmp_path / "w", ("t5",), size="full", overrides={"t5": {"num_layers": 2}})["t5"]
    assert sum(f.stat().st_size for f in d.glob("*.bin")) > 2 * 10**9
    print(f"write: {write.delta / 1e6:.0f} MB anon above baseline")
    assert write.delta < 1.25 * emb, f"writing held {write.delta / 1e6:.0f} MB"
    with _AnonPeak() as convert:
        model, weights = load_t5(d)
    print(f"convert: {convert.delta / 1e6:.0f} MB anon above baseline")
    assert convert.delta < 200e6, f"converting held {convert.delta / 1e6:.0f} MB"
    del model
    model, _ = load_t5(d, meta=False)
    peaks = []
    for block in model.encoder.block:
        block.register_forward_hook(lambda m, a, out: peaks.append(out[0].abs().max().item()))
    ids = torch.randint(3, 32000, (1, MAX_LENGTH), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(input_ids=ids).last_hidden_state
    print(f"block output peaks {peaks}, y std {y.std():.3f}")
    assert max(peaks) < MAX_ACTIVATION and torch.isfinite(y).all() and 0.3 < y.std() < 3
