"""CoreML export of Open-Sora (T5, STDiT3 with TDTM, VAE): every block exported end to end from tiny random
checkpoints, packages checked as specs against the manifest, rewrites checked bit for bit against the
original models, the command line, refusals; full-size single blocks behind ``slow``; predict() on macOS."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("coremltools")

from blockrt.coreml import ExportBlock, ExportError, ExportOptions, export_blocks, inspect_package, read_manifest  # noqa: E402
from blockrt.pipelines.opensora.coreml_export import MODELS, TDTM_FUNCTION, export_opensora  # noqa: E402

TDTM_MAX_SIZE_RATIO = 0.6  # multifunction package / two separate packages (weights stored once: ~0.5)
INT8_MAX_SIZE_RATIO = 0.30  # int8 weights / fp32 weights of a full-size block (~0.25 + scales)
CORE_ML_MAX_RANK = 5
PREDICT_MIN_PSNR_DB = 35.0  # Apple ml-stable-diffusion's parity threshold
RESOLUTION, FRAMES = "64x64", 17  # latent 8x8, one temporal chunk of 5 latents
T5_LAYERS = 2
OVERRIDES = {"t5": {"d_model": 32, "d_kv": 8, "num_heads": 4, "d_ff": 128, "num_layers": T5_LAYERS,
                    "num_decoder_layers": T5_LAYERS}, "stdit3": {"caption_channels": 32}}


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory, random_checkpoints) -> Path:
    """The weights root: the three components side by side."""
    from blockrt.pipelines.opensora.t5 import train_tiny_tokenizer

    tok = tmp_path_factory.mktemp("tokenizer")
    train_tiny_tokenizer(["a red circle moving left on a blue background"] * 40, tok, vocab_size=60)
    return random_checkpoints(t5_format="safetensors", tokenizer=tok, overrides=OVERRIDES)["t5"].parent


@pytest.fixture(scope="module")
def export(weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "opensora"
    seen: list[str] = []
    export_opensora(weights, out, resolution=RESOLUTION, frames=FRAMES, progress=lambda i, n, name: seen.append(name))
    assert len(seen) == len(set(seen)) and seen[-1] == "vae_spatial_out"
    return out


def expected_names(depth: int = 2) -> list[str]:
    return (["t5_embed", *[f"t5_block_{i:02d}" for i in range(T5_LAYERS)], "t5_final_norm", "stdit3_embed",
             *[f"stdit3_block_{i:02d}" for i in range(depth)], "stdit3_final", "vae_temporal_in", "vae_temporal_mid",
             *[f"vae_temporal_stage_{i}" for i in (3, 2, 1, 0)], "vae_temporal_out", "vae_spatial_in",
             "vae_spatial_mid", *[f"vae_spatial_up_{i}" for i in range(4)], "vae_spatial_out"])


def test_run_order_covers_every_block(export: Path) -> None:
    m = read_manifest(export)
    assert [p.name for p in m.packages] == expected_names()
    assert [p.order for p in m.packages] == list(range(len(m.packages)))
    assert m.extra["models"] == list(MODELS) and m.extra["latent"] == [5, 8, 8]
    wired = set(m.wiring)
    for p in m.packages:  # every input of every package has a source: a package output or an app input
        assert {f"{p.name}.{t.name}" for t in p.inputs} <= wired, p.name
    assert m.wiring["t5_block_01.position_bias"] == "t5_block_00.position_bias"
    assert m.wiring["stdit3_final.x"] == "stdit3_block_01.x_out"


def test_packages_load_and_match_the_manifest(export: Path) -> None:
    import coremltools as ct

    m = read_manifest(export)
    for p in m.packages:
        info = inspect_package(export / p.file)
        assert [(t.name, t.shape) for t in info.inputs] == [(t.name, t.shape) for t in p.inputs], p.name
        assert [t.name for t in info.outputs] == [t.name for t in p.outputs], p.name
        assert info.bytes == p.bytes
    block = m.package("stdit3_block_00")  # two functions: the plain forward and TDTM, one set of weights
    spec = ct.utils.load_spec(str(export / block.file))
    assert [f.name for f in spec.description.functions] == ["main", TDTM_FUNCTION]
    tdtm = spec.description.functions[1]
    assert [(i.name, list(i.type.multiArrayType.shape)) for i in tdtm.input] == \
        [(t["name"], t["shape"]) for t in block.meta[TDTM_FUNCTION]["inputs"]]
    assert [list(i.type.multiArrayType.shape) for i in tdtm.input][4] == [3, 16]  # RoPE over ceil(5/2) frames


def test_tdtm_function_does_not_duplicate_weights(export: Path) -> None:
    for p in read_manifest(export).packages:
        if p.name.startswith("stdit3_block_"):
            assert p.bytes < TDTM_MAX_SIZE_RATIO * p.meta["bytes_as_two_packages"], p.name


def test_t5_is_int8_and_the_rest_is_not(export: Path) -> None:
    m = read_manifest(export)
    for p in m.packages:
        info = inspect_package(export / p.file)
        if p.name.startswith("t5_block"):
            assert p.quantization == "int8" and info.has_quantized_weights, p.name
        if p.name.startswith(("stdit3", "vae")):
            assert p.quantization is None and not info.has_quantized_weights, p.name
    assert m.package("t5_embed").quantization == "int8"  # the option, but the gather table is skipped:
    assert not inspect_package(export / "t5_embed.mlpackage").has_quantized_weights


def test_rewrites_equal_the_original_models(export: Path) -> None:
    m = read_manifest(export)
    checked = 0
    for p in m.packages:
        assert p.checks["trace_equal"] is True, p.name
        if p.checks["reference_equal"] is not None:
            assert p.checks["reference_equal"] is True and p.checks["max_abs_error"] == 0.0, p.name
        for parity in (p.meta.get("parity"), (p.meta.get(TDTM_FUNCTION) or {}).get("parity")):
            if parity is not None:
                assert parity["equal"] and parity["max_abs_error"] == 0.0, p.name
                checked += 1
    # against the captured pipeline pass: every T5 and STDiT3 package (+ the TDTM functions), each VAE chain's end
    assert checked == (T5_LAYERS + 2) + (2 + 2 * 2) + 2


def test_cli_exports_without_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from blockrt.pipelines.cli import main

    out = tmp_path / "cli"
    rc = main(["export", "coreml", "--cache", str(tmp_path / "cache"), "--out", str(out), "--models", "t5",
               "--resolution", RESOLUTION, "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "t5_block_03" in text and "int8" in text and "tiny RANDOM weights" in text
    assert [p.name for p in read_manifest(out).packages][-1] == "t5_final_norm"
    assert main(["export", "coreml", "--cache", str(tmp_path / "cache"), "--out", str(out), "--models", "t5",
                 "--no-progress"]) == 2  # an export is there: refused without --overwrite
    assert "overwrite" in capsys.readouterr().err


def test_refuses_an_existing_directory_that_is_not_an_export(weights: Path, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not a blockrt CoreML export"):
        export_opensora(weights, out, models=("t5",))
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="models must be"):
        export_opensora(weights, tmp_path / "x", models=("t5", "unet"))


def max_rank(package: Path) -> int:
    """The largest tensor rank in any function of an ML program (Core ML runs rank <= 5 only)."""
    import coremltools as ct

    spec = ct.utils.load_spec(str(package))
    rank = 0
    for f in spec.mlProgram.functions.values():
        for op in f.block_specializations[f.opset].operations:
            rank = max([rank, *(o.type.tensorType.rank for o in op.outputs if o.type.HasField("tensorType"))])
    return rank


def test_every_tensor_is_within_core_mls_rank_limit(export: Path) -> None:
    for p in read_manifest(export).packages:
        assert max_rank(export / p.file) <= CORE_ML_MAX_RANK, p.name


def test_unconvertible_op_names_the_op_and_the_block(tmp_path: Path) -> None:
    """A flexible frame batch in the spatial VAE: coremltools' group_norm rejects the symbolic dim."""
    from blockrt.pipelines.opensora.coreml_vae import spatial_parts
    from blockrt.pipelines.opensora.vae import VAEConfig, VideoAutoencoderPipeline

    name, mid = spatial_parts(VideoAutoencoderPipeline(VAEConfig.tiny()).eval())[1]
    x = torch.randn(4, 32, 8, 8)
    block = ExportBlock(name, mid, (x,), ("x",), ("out",), flexible={"x": ((1, 4), 32, 8, 8)})
    with pytest.raises(ExportError) as e:
        export_blocks([block], tmp_path / "bad", ExportOptions(check=False))
    assert e.value.block == "vae_spatial_mid" and e.value.op == "group_norm"
    assert not (tmp_path / "bad").exists()


@pytest.mark.skipif(sys.platform != "darwin", reason="MLModel.predict() runs on macOS only")
def test_predict_matches_pytorch(export: Path, weights: Path) -> None:
    import coremltools as ct
    import numpy as np

    m = read_manifest(export)
    p = m.package("stdit3_final")
    mlmodel = ct.models.MLModel(str(export / p.file))
    x = np.random.default_rng(0).standard_normal([s for s in p.inputs[0].shape]).astype(np.float32)
    t = np.random.default_rng(1).standard_normal([s for s in p.inputs[1].shape]).astype(np.float32)
    from blockrt.pipelines.opensora.coreml_stdit3 import STDiT3Final
    from blockrt.pipelines.opensora.loading import load_stdit3

    model = load_stdit3(weights / "OpenSora-STDiT-v3", meta=False).model
    ref = STDiT3Final(model, tuple(m.extra["latent"]))(torch.from_numpy(x), torch.from_numpy(t)).detach().numpy()
    out = mlmodel.predict({"x": x, "t": t})["velocity"]
    psnr = 10 * np.log10(np.abs(ref).max() ** 2 / np.mean((out - ref) ** 2))
    assert psnr >= PREDICT_MIN_PSNR_DB


# -- full size, one block each ------------------------------------------------------------------------------


@pytest.mark.slow
def test_full_size_stdit3_and_t5_block(tmp_path: Path) -> None:
    """One STDiT3-XL/2 layer (spatial + temporal, TDTM shapes of 144p 17 frames) and one T5-XXL block, random
    weights in the real layout, converted: fp16 and int8 sizes against the fp32 weight bytes."""
    from transformers.models.t5.modeling_t5 import T5Block

    from blockrt.pipelines.opensora.coreml_stdit3 import LAYER_IO, STDiT3Layer
    from blockrt.pipelines.opensora.coreml_t5 import NEXT_IO, T5NextBlock, additive_mask
    from blockrt.pipelines.opensora.stdit3 import STDiT3Block, STDiT3Config
    from blockrt.pipelines.opensora.t5 import t5_xxl_config

    torch.manual_seed(0)
    cfg = STDiT3Config.xl2()
    sp, tp = STDiT3Block(cfg, temporal=False).eval(), STDiT3Block(cfg, temporal=True).eval()
    T, S, C, L = 5, 10 * 14, cfg.hidden_size, cfg.model_max_length
    cos, sin = torch.randn(T, cfg.head_dim), torch.randn(T, cfg.head_dim)
    ex = (torch.randn(2, T * S, C), torch.randn(2, L, C), torch.randn(2, 6 * C), torch.zeros(2, L), cos, sin)
    blocks = [ExportBlock("stdit3_block_00", STDiT3Layer(sp, tp, T, S), ex, *LAYER_IO)]
    t5_cfg = t5_xxl_config()
    t5_cfg._attn_implementation = "sdpa"  # what T5EncoderModel picks
    t5 = T5Block(t5_cfg, has_relative_attention_bias=False).eval()
    mask = additive_mask((torch.arange(300) < 20).long()[None])
    blocks.append(ExportBlock("t5_block_01", T5NextBlock(t5), (torch.randn(1, 300, 4096), torch.randn(1, 64, 300, 300),
                                                                mask), *NEXT_IO, quantize="int8"))
    m = export_blocks(blocks, tmp_path / "full", ExportOptions(precision="fp16", check=False))
    st_fp32 = sum(p.numel() * 4 for p in (*sp.parameters(), *tp.parameters()))
    t5_fp32 = sum(p.numel() * 4 for p in t5.parameters())
    assert 0.45 < m.package("stdit3_block_00").weight_bytes / st_fp32 < 0.55  # fp16
    assert m.package("t5_block_01").weight_bytes / t5_fp32 < INT8_MAX_SIZE_RATIO
    assert inspect_package(tmp_path / "full" / "t5_block_01.mlpackage").has_quantized_weights
    json.dumps(m.to_dict())
