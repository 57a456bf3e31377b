"""Tests of the Open-Sora v1.2 VAE (pipelines/opensora/vae.py, vae_temporal.py).

Checkpoint parity is checked on the meta device against the key dumps in tests/fixtures/opensora_keys/;
the numerics (latent lengths, frame counts, chunk independence, causality, normalisation, micro-batching,
spatial floor) run on the tiny config on CPU in fp32.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from blockrt.pipelines.opensora.vae import (
    SPATIAL_SCALING_FACTOR,
    SpatialVAE,
    SpatialVAEConfig,
    VAEConfig,
    VideoAutoencoderPipeline,
)
from blockrt.pipelines.opensora.vae_temporal import CausalConv3d, TemporalVAE, TemporalVAEConfig, depth_to_time

KEYS = Path(__file__).parent / "fixtures" / "opensora_keys"

# PyTorch's CPU convs are not batch-size invariant: regrouping frames into micro-batches moves fp32 results
# in the last bits (~1e-5 seen on unit-scale outputs), so micro-batching is compared with a tolerance.
MICRO_BATCH_ATOL = 1e-4
MICRO_BATCH_RTOL = 1e-4

# (pixel frames, latent frames) from spec §2.3.
LATENT_LENGTHS = [(1, 1), (16, 4), (17, 5), (34, 10), (51, 15), (68, 20), (102, 30), (816, 240)]


def load_dump(name: str) -> dict[str, list[int]]:
    dump = json.loads((KEYS / name).read_text())
    entries = {e["key"]: e["shape"] for e in dump["state_dict"]}
    assert len(entries) == dump["num_state_dict_entries"]
    return entries


def shapes(module: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(t.shape) for k, t in module.state_dict().items()}


@pytest.fixture(scope="module")
def meta_vae() -> VideoAutoencoderPipeline:
    with torch.device("meta"):
        return VideoAutoencoderPipeline(VAEConfig())


def tiny_vae(micro_batch_size: int | None = 4, seed: int = 0) -> VideoAutoencoderPipeline:
    torch.manual_seed(seed)
    return VideoAutoencoderPipeline(VAEConfig.tiny(micro_batch_size=micro_batch_size)).eval()


# --- checkpoint parity (meta) ------------------------------------------------------------------------


def test_pipeline_state_dict_matches_checkpoint(meta_vae):
    expected = load_dump("vae_v1_2_pipeline.json")
    assert len(expected) == 517
    assert shapes(meta_vae) == expected
    assert all(t.is_meta for t in meta_vae.state_dict().values())
    assert sum(p.numel() for p in meta_vae.parameters()) == 393_341_007


@pytest.mark.parametrize(
    "name, dump, count, numel",
    [
        ("temporal_vae", "vae_temporal.json", 267, 309_687_144),
        ("spatial_vae.module", "vae_spatial_sdxl_autoencoderkl.json", 248, 83_653_863),
    ],
)
def test_part_state_dict_matches_dump_in_order(meta_vae, name, dump, count, numel):
    part = meta_vae.get_submodule(name)
    expected = load_dump(dump)
    assert len(expected) == count
    assert list(shapes(part).items()) == list(expected.items())  # same keys, shapes and module order
    assert sum(p.numel() for p in part.parameters()) == numel


def test_tiny_config_has_the_real_key_names():
    assert set(tiny_vae().state_dict()) == set(load_dump("vae_v1_2_pipeline.json"))


def test_shift_scale_buffers_hold_the_checkpoint_values():
    vae = tiny_vae()
    dump = {e["key"]: e for e in json.loads((KEYS / "vae_v1_2_pipeline.json").read_text())["state_dict"]}
    for name in ("shift", "scale"):
        buf = getattr(vae, name)
        assert list(buf.shape) == dump[name]["shape"] == [1, 4, 1, 1, 1]
        assert torch.equal(buf.flatten(), torch.tensor(dump[name]["value"], dtype=torch.float32))
        assert name in vae.state_dict()


def test_meta_build_then_assign_load_runs():
    ref = tiny_vae()
    with torch.device("meta"):
        vae = VideoAutoencoderPipeline(VAEConfig.tiny()).eval()
    vae.load_state_dict(ref.state_dict(), assign=True)
    assert not any(t.is_meta for t in list(vae.parameters()) + list(vae.buffers()))
    z = torch.randn(1, 4, 2, 1, 1)
    with torch.no_grad():
        assert torch.equal(vae.decode(z, 6), ref.decode(z, 6))


# --- time bookkeeping --------------------------------------------------------------------------------


@pytest.mark.parametrize("frames, latents", LATENT_LENGTHS)
def test_get_latent_size(meta_vae, frames, latents):
    assert meta_vae.get_latent_size([frames, None, None]) == [latents, None, None]


def test_get_latent_size_spatial_floor(meta_vae):
    assert meta_vae.get_latent_size([51, 240, 426]) == [15, 30, 53]  # spec §0: 426 -> 53 -> 424 decoded


@pytest.mark.parametrize("frames, latents", LATENT_LENGTHS[:6])
def test_encode_latent_length(frames, latents):
    vae = tiny_vae()
    x = torch.rand(1, 3, frames, 8, 8) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x, sample_posterior=False)
    assert z.shape == (1, 4, latents, 1, 1)
    assert vae.get_latent_size([frames, 8, 8]) == [latents, 1, 1]


@pytest.mark.parametrize("frames, latents", LATENT_LENGTHS[:6])
def test_decode_frame_count(frames, latents):
    vae = tiny_vae()
    z = torch.randn(2, 4, latents, 1, 2)
    with torch.no_grad():
        assert vae.decode(z, num_frames=frames).shape == (2, 3, frames, 8, 16)


@pytest.mark.parametrize("frames", [1, 2, 3, 4, 5, 13, 16, 17])
def test_temporal_vae_crops_the_front_padding(frames):
    torch.manual_seed(0)
    tvae = TemporalVAE(TemporalVAEConfig(filters=8, num_groups=4)).eval()
    x = torch.randn(1, 4, frames, 2, 3)
    with torch.no_grad():
        z = tvae.encode(x).mode()
        assert z.shape[2] == (frames + 3) // 4
        full = tvae.decoder(tvae.post_quant_conv(z))  # 4 * Tz frames before cropping
        out = tvae.decode(z, num_frames=frames)
    assert full.shape[2] == 4 * z.shape[2]
    assert torch.equal(out, full[:, :, full.shape[2] - frames :])  # the first (4 - n % 4) % 4 dropped


def test_decode_rejects_inconsistent_num_frames():
    vae = tiny_vae()
    with pytest.raises(ValueError, match="num_frames 18 encodes to 6 latent frames but z has 5"):
        vae.decode(torch.randn(1, 4, 5, 1, 1), num_frames=18)
    with pytest.raises(ValueError, match="at most 5 latent"):
        vae.decode_chunk(torch.randn(1, 4, 6, 1, 1), num_frames=17)


# --- chunks, causality ---------------------------------------------------------------------------------


@pytest.mark.parametrize("num_frames, sizes", [(34, [(5, 17), (5, 17)]), (40, [(5, 17), (5, 17), (2, 6)])])
def test_decode_equals_independent_chunks(num_frames, sizes):
    vae = tiny_vae(micro_batch_size=1)  # same spatial grouping (one frame per call) on both paths
    z = torch.randn(2, 4, sum(t for t, _ in sizes), 2, 1)
    chunks = vae.split_chunks(z, num_frames)
    assert [(zk.shape[2], nk) for zk, nk in chunks] == sizes
    with torch.no_grad():
        whole = vae.decode(z, num_frames)
        parts = [vae.decode_chunk(zk.clone(), nk) for zk, nk in chunks]
        # a chunk does not see its neighbours: change the first chunk, the second is unchanged
        z2 = z.clone()
        z2[:, :, :5] += 1.0
        other = vae.decode(z2, num_frames)
    assert torch.equal(whole, torch.cat(parts, dim=2))
    assert torch.equal(other[:, :, 17:], whole[:, :, 17:])
    assert not torch.equal(other[:, :, :17], whole[:, :, :17])


@pytest.mark.parametrize("kernel, stride, front_pad", [(3, 1, 2), (3, 2, 1), (1, 1, 0)])
def test_causal_conv_never_looks_ahead(kernel, stride, front_pad):
    torch.manual_seed(0)
    conv = CausalConv3d(3, 5, kernel, stride_t=stride)
    assert conv.padding[4:] == (front_pad, 0)
    x = torch.randn(1, 3, 8, 4, 5)
    with torch.no_grad():
        y = conv(x)
        assert y.shape == (1, 5, 8 // stride, 4, 5)
        for k in range(1, 8):
            x2 = x.clone()
            x2[:, :, k] += 1.0
            y2 = conv(x2)
            # output t reads inputs stride*t + stride - 1 - (k-1) .. stride*t + stride - 1: none after that
            first_affected = max(0, -(-(k - (stride - 1)) // stride))
            assert torch.equal(y2[:, :, :first_affected], y[:, :, :first_affected])
            assert not torch.equal(y2[:, :, first_affected], y[:, :, first_affected])


def test_depth_to_time_layout():
    x = torch.randn(2, 6, 3, 2, 2)  # (B, 2C, T, H, W)
    out = depth_to_time(x)
    assert out.shape == (2, 3, 6, 2, 2)
    for c in range(3):
        for t in range(3):
            for s in range(2):
                assert torch.equal(out[:, c, 2 * t + s], x[:, 2 * c + s, t])


# --- normalisation, spatial VAE ------------------------------------------------------------------------


def test_shift_scale_affine():
    vae = tiny_vae()
    x = torch.rand(1, 3, 17, 8, 16) * 2 - 1
    with torch.no_grad():
        raw = vae.temporal_vae.encode(vae.spatial_vae.encode(x, sample_posterior=False)).mode()
        z = vae.encode(x, sample_posterior=False)
        assert torch.equal(z, (raw - vae.shift) / vae.scale)
        assert torch.allclose(vae.denormalize(z), raw, atol=1e-6)  # round trip of the affine part
        expected = vae.spatial_vae.decode(vae.temporal_vae.decode(z * vae.scale + vae.shift, 17))
        assert torch.equal(vae.decode(z, 17), expected)
    zb = z.bfloat16()
    assert vae.denormalize(zb).dtype == torch.bfloat16  # de-normalised in the latents' dtype
    assert torch.equal(vae.denormalize(zb), zb * vae.scale.bfloat16() + vae.shift.bfloat16())


def test_spatial_scale_is_opensora_hard_coded():
    vae = tiny_vae(micro_batch_size=None)
    spatial = vae.spatial_vae
    assert spatial.scaling_factor == SPATIAL_SCALING_FACTOR == 0.18215
    assert spatial.module.config.scaling_factor == 0.13025  # the config's value, unused
    z = torch.randn(1, 4, 1, 1, 1)  # one frame: the same batch of one on both sides
    with torch.no_grad():
        expected = spatial.module.decode(z[:, :, 0] / 0.18215).sample
        assert torch.equal(spatial.decode(z)[:, :, 0], expected)


def test_spatial_micro_batching_matches_one_batch():
    torch.manual_seed(0)
    batched = SpatialVAE(SpatialVAEConfig(block_out_channels=(8, 16, 32, 32), norm_num_groups=4, micro_batch_size=4))
    whole = SpatialVAE(SpatialVAEConfig(block_out_channels=(8, 16, 32, 32), norm_num_groups=4, micro_batch_size=None))
    whole.load_state_dict(batched.state_dict())
    calls = []
    batched.module.decoder.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    z = torch.randn(2, 4, 5, 2, 3)  # 10 frames -> calls of 4, 4, 2
    x = torch.rand(2, 3, 5, 16, 24) * 2 - 1
    with torch.no_grad():
        a, b = batched.decode(z), whole.decode(z)
        e1, e2 = batched.encode(x, sample_posterior=False), whole.encode(x, sample_posterior=False)
    assert calls == [4, 4, 2]
    assert a.shape == (2, 3, 5, 16, 24) and e1.shape == (2, 4, 5, 2, 3)
    torch.testing.assert_close(a, b, atol=MICRO_BATCH_ATOL, rtol=MICRO_BATCH_RTOL)
    torch.testing.assert_close(e1, e2, atol=MICRO_BATCH_ATOL, rtol=MICRO_BATCH_RTOL)
    # frames are images: frame (b, t) of the video is the image decoded alone
    with torch.no_grad():
        alone = batched.module.decode(z[1, :, 3][None] / SPATIAL_SCALING_FACTOR).sample
    torch.testing.assert_close(a[1, :, 3], alone[0], atol=MICRO_BATCH_ATOL, rtol=MICRO_BATCH_RTOL)


@pytest.mark.parametrize("hw, latent_hw", [((20, 27), (2, 3)), ((16, 24), (2, 3)), ((23, 9), (2, 1))])
def test_decoded_size_is_floor_to_multiple_of_8(hw, latent_hw):
    vae = tiny_vae()
    x = torch.rand(1, 3, 5, *hw) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x, sample_posterior=False)
        y = vae.decode(z, num_frames=5)
    assert tuple(z.shape[3:]) == latent_hw == tuple(vae.get_latent_size([5, *hw])[1:])
    assert tuple(y.shape[3:]) == (8 * latent_hw[0], 8 * latent_hw[1])


def test_posterior_sampling_follows_the_generator():
    vae = tiny_vae()
    x = torch.rand(1, 3, 5, 8, 8) * 2 - 1
    with torch.no_grad():
        a = vae.encode(x, generator=torch.Generator().manual_seed(1))
        b = vae.encode(x, generator=torch.Generator().manual_seed(1))
        c = vae.encode(x, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
