"""Training the shapes model at 17 or 33 frames: clip geometry, the pipeline's VAE chunks, a tiny end-to-end run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from blockrt.pipelines.shapes import layout, train
from blockrt.pipelines.shapes.dataset import GEOMETRIES, SIZE, geometry, make_batch, make_clip, to_video_tensor
from blockrt.pipelines.shapes.probe import WORDS, swap, word_gaps
from blockrt.pipelines.shapes.train_vae import encode_spatial, finish_vae, shape_cells, shape_weights, train_temporal


def test_33_frame_clips_draw_larger_slower_shapes_with_the_same_captions():
    for i in range(40):
        short, long = make_clip(2, i), make_clip(2, i, 33)
        assert long.frames.shape == (33, SIZE, SIZE, 3) and long.frames.dtype == np.uint8
        assert long.spec.caption == short.spec.caption  # the words are drawn before the geometry
        lo, hi = GEOMETRIES[33].radius_range
        assert lo <= long.spec.radius <= hi
        for t in (0, 32):  # the shape stays inside the frame all the way
            x, y = long.spec.centre(t)
            r = long.spec.radius
            assert r <= x <= SIZE - 1 - r and r <= y <= SIZE - 1 - r
    with pytest.raises(ValueError, match=r"\[17, 33\] frames, got 20"):
        geometry(20)
    with pytest.raises(ValueError, match="frames"):
        make_clip(0, 0, 20)


def test_chunks_are_the_pipelines():
    from blockrt.pipelines.opensora.vae import VideoAutoencoderPipeline

    vae = VideoAutoencoderPipeline(layout.vae_config())
    assert vae.temporal_chunks(17) == [slice(0, 17)]
    assert vae.temporal_chunks(33) == [slice(0, 17), slice(17, 33)]
    assert vae.temporal_chunks(51) == [slice(0, 17), slice(17, 34), slice(34, 51)]
    assert vae.temporal_chunks(20) == [slice(0, 17), slice(17, 20)]
    assert train.latents_frames_to_pixels(5) == 17 and train.latents_frames_to_pixels(9) == 33
    with pytest.raises(ValueError, match="got 7 latent frames"):
        train.latents_frames_to_pixels(7)


def test_training_latents_are_the_pipelines_latents():
    """STDiT3 learns from ``finish_vae``'s latents and samples through ``VideoAutoencoderPipeline``: the two must be
    the same encoding. Encoding a 33-frame clip's spatial latents through the temporal VAE whole (not in the
    pipeline's chunks of 17) gives other latents: the temporal VAE's group norms take their statistics over the
    whole clip, and its time padding falls elsewhere."""
    from blockrt.pipelines.opensora.vae import VideoAutoencoderPipeline

    torch.manual_seed(0)
    vae = VideoAutoencoderPipeline(layout.vae_config(layout.SPATIAL_SIZES_BY_FRAMES[33])).eval()
    with torch.no_grad():
        spatial = encode_spatial(vae, 0, 3, frames=33)  # (3, 4, 33, 8, 8)
        latents = finish_vae(vae, spatial)  # (3, 4, 9, 8, 8)
        clips, _ = make_batch(0, 0, 3, 33)
        pipeline = vae.encode(to_video_tensor(clips), sample_posterior=False)
        whole = vae.normalize(vae.temporal_vae.encode(spatial).mode())
    assert latents.shape == pipeline.shape == (3, 4, 9, 8, 8)
    torch.testing.assert_close(latents, pipeline, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(whole, latents, atol=1e-2)


def test_the_temporal_vae_trains_chunk_by_chunk_with_the_shape_weighted():
    from blockrt.pipelines.opensora.vae import VideoAutoencoderPipeline

    torch.manual_seed(0)
    vae = VideoAutoencoderPipeline(layout.vae_config(layout.SPATIAL_SIZES_BY_FRAMES[33]))
    with torch.no_grad():
        spatial = encode_spatial(vae, 0, 4, frames=33)
    cells = shape_cells(spatial)
    assert cells.shape == (4, 1, 33, 8, 8) and 0 < cells.mean() < 0.5  # a few cells hold the shape
    before = [p.detach().clone() for p in vae.temporal_vae.parameters()]
    losses = []
    train_temporal(vae, spatial, 0, 3, 2, lambda name, step, v: losses.append((name, v)), focus=20.0, cosine=True)
    assert [n for n, _ in losses] == ["temporal_vae_mse"] * 3 and all(np.isfinite(v) for _, v in losses)
    assert any(not torch.equal(a, b) for a, b in zip(before, vae.temporal_vae.parameters()))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 33-frame training run a few steps long: what the one-command training writes."""
    root = tmp_path_factory.mktemp("shapes33")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "ROUND_TRIP_CLIPS", 4)
        args = ["--out", str(root / "w"), "--work", str(root / "work"), "--frames", "33", "--clips", "8",
                "--vae-steps", "2", "--vae-focus-steps", "2", "--tvae-steps", "2", "--tvae-focus", "20",
                "--tvae-cosine", "--steps", "2", "--batch", "2", "--vae-batch", "2"]
        assert train.main(args) == 0
        assert train.main(["--out", str(root / "w2"), *args[2:], "--init-vae", str(root / "w"), "--lr", "1e-4"]) == 0
        assert train.main(["--out", str(root / "w3"), *args[2:], "--init-vae", str(root / "w"), "--refine-vae", "2",
                           "--tvae-ring", "1"]) == 0
    return root


def test_ring_weights_cover_the_shape_and_the_background_next_to_it():
    clip = make_clip(0, 7, 33).frames[:1]  # (1, 64, 64, 3): a triangle
    x = to_video_tensor(clip[None])[:, :, 0]  # (1, 3, 64, 64)
    shape = shape_weights(x, 20.0) > 1  # (1, 1, 64, 64)
    ringed = shape_weights(x, 20.0, ring=2) > 1
    assert shape.sum() > 100 and torch.equal(ringed & shape, shape)  # the shape keeps its weight
    grown = ringed & ~shape
    assert grown.sum() > 0.2 * shape.sum()  # the ring: background next to the outline
    # every ring pixel is within 2 pixels (Chebyshev) of the shape, and the far background stays at 1
    ys, xs = torch.nonzero(shape[0, 0], as_tuple=True)
    for y, x_ in torch.nonzero(grown[0, 0]).tolist():
        assert ((ys - y).abs().maximum((xs - x_).abs())).min() <= 2
    assert shape_weights(x, 20.0, ring=2)[0, 0, 0, 0] == 1.0


def test_refine_vae_fine_tunes_both_stages_and_keeps_the_latent_scale(tiny_run):
    from blockrt.pipelines.opensora.pipeline import DIRS

    first = load_file(tiny_run / "w" / DIRS["vae"] / "model.safetensors")
    refined = load_file(tiny_run / "w3" / DIRS["vae"] / "model.safetensors")
    changed = {k.split(".")[0] for k in first if not torch.equal(first[k], refined[k])}
    assert changed == {"spatial_vae", "temporal_vae"}  # shift/scale are kept: STDiT3's latents keep their scale
    record = json.loads((tiny_run / "w3" / layout.RECORD).read_text())
    assert {"spatial_vae_phase3_s", "encode_spatial_s", "temporal_vae_s"} <= set(record["times"])
    assert record["args"]["refine_vae"] == 2 and record["args"]["tvae_ring"] == 1
    # its VAE and latents are cached under --work (a rerun reuses them), whole files, no temporary left behind
    caches = sorted(p.name.split("-")[0] for p in (tiny_run / "work").glob("*-refine2r2-*.safetensors"))
    assert caches == ["latents", "vae"]
    cached = load_file(next((tiny_run / "work").glob("latents-*-refine2r2-*.safetensors")))["latents"]
    assert cached.shape[0] == 8 and torch.isfinite(cached).all()
    assert not [p.name for p in (tiny_run / "work").iterdir() if p.name.startswith(".")]
    with pytest.raises(SystemExit, match="--refine-vae 5 fine-tunes a trained VAE: give it with --init-vae"):
        train.main(["--out", "unused", "--refine-vae", "5"])
    with pytest.raises(SystemExit, match="must be >= 0"):
        train.main(["--out", "unused", "--init-vae", "w", "--refine-vae", "5", "--vae-ring", "-1"])


def test_a_33_frame_run_writes_the_real_layout_and_its_record(tiny_run):
    from blockrt.pipelines.opensora import loading
    from blockrt.pipelines.opensora.pipeline import DIRS

    w = tiny_run / "w"
    for component, directory in DIRS.items():
        loading.LOADERS[component](w / directory)  # every key, shape and dtype checked
    vae_cfg = json.loads((w / DIRS["vae"] / "config.json").read_text())
    assert json.dumps(layout.SPATIAL_SIZES_BY_FRAMES[33]["block_out_channels"]) in json.dumps(vae_cfg)
    record = json.loads((w / layout.RECORD).read_text())
    assert record["frames"] == 33 and record["args"]["tvae_focus"] == 20.0
    assert record["sizes"]["spatial_vae"] == layout.SPATIAL_SIZES_BY_FRAMES[33]
    assert set(record["vae_round_trip_kept"]) == {"shape", "colour", "direction"}
    assert record["stdit3_steps_saved"] == 2
    assert "temporal_vae_mse" in record["losses"] or record["times"].get("temporal_vae_s") is not None


def test_init_vae_reuses_a_trained_vae_unchanged(tiny_run):
    from blockrt.pipelines.opensora.pipeline import DIRS

    first = load_file(tiny_run / "w" / DIRS["vae"] / "model.safetensors")
    second = load_file(tiny_run / "w2" / DIRS["vae"] / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    record = json.loads((tiny_run / "w2" / layout.RECORD).read_text())
    assert record["init_vae"]["file"].endswith("model.safetensors") and len(record["init_vae"]["sha256"]) == 64
    assert "temporal_vae_s" not in record["times"]  # nothing was trained


def test_the_learning_rate_is_an_option_and_recorded(tiny_run):
    first = json.loads((tiny_run / "w" / layout.RECORD).read_text())
    second = json.loads((tiny_run / "w2" / layout.RECORD).read_text())
    assert first["objective"]["lr"] == train.LR and second["objective"]["lr"] == 1e-4
    # and the optimiser runs at it: the same schedule (2 warm-up steps) scaled by the peak rate
    assert second["final_lr"] / first["final_lr"] == pytest.approx(1e-4 / train.LR)
    with pytest.raises(SystemExit, match="--lr must be > 0"):
        train.main(["--out", "unused", "--lr", "0"])


def test_the_probe_measures_every_word_at_every_noise_level(tiny_run):
    gaps = word_gaps(tiny_run / "w", frames=33, clips=4)
    assert set(gaps) == set(WORDS)
    assert all(len(by_s) == 3 and all(np.isfinite(g) for g in by_s.values()) for by_s in gaps.values())


def test_swap_changes_one_word_and_keeps_captions_valid():
    for i in range(60):
        spec = make_clip(0, i).spec
        d, c, s = (swap(spec, w) for w in ("direction", "colour", "shape"))
        assert d != spec.caption and c != spec.caption and s != spec.caption
        assert f"{spec.colour} {spec.shape}" in d  # only the direction moved
        assert spec.background + " background" in c and f" {spec.background} {spec.shape}" not in c
    with pytest.raises(ValueError, match="word must be one of"):
        swap(make_clip(0, 0).spec, "background")
