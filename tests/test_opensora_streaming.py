"""Open-Sora's three models streamed block by block: outputs identical to the plain models (CPU fp32)."""

from __future__ import annotations

import pytest
import torch

import blockrt
from blockrt import RunConfig
from models import stdit3_feed
from blockrt.partitioners import partition

PASSES = 3


def test_vae_decoders_stream_part_by_part_with_identical_output():
    from blockrt.pipelines.opensora.vae import VAEConfig, VideoAutoencoderPipeline

    torch.manual_seed(0)
    vae = VideoAutoencoderPipeline(VAEConfig.tiny()).eval()
    z = torch.randn(1, 4, 10, 8, 8)  # 2 temporal chunks of 5 latents -> 34 frames
    with torch.no_grad():
        ref = vae.decode(z, num_frames=34)
    t_plan = partition(vae.temporal_vae.decoder)
    s_plan = partition(vae.spatial_vae.module.decoder)
    assert t_plan.partitioner == "vae-temporal-decoder" and s_plan.partitioner == "vae-spatial-decoder"
    assert [b.name for b in s_plan.blocks] == ["mid_block", "up_blocks.0", "up_blocks.1", "up_blocks.2", "up_blocks.3"]
    with torch.no_grad():
        with blockrt.run(vae.temporal_vae.decoder, budget="64MB") as rt_t, \
                blockrt.run(vae.spatial_vae.module.decoder, budget="64MB") as rt_s:
            for _ in range(PASSES):
                assert torch.equal(vae.decode(z, num_frames=34), ref)
            # the temporal decoder ran once per chunk, the spatial one once per micro-batch of frames
            assert rt_t.profile.summary().passes == 2 * PASSES
            assert rt_s.profile.summary().passes == PASSES * -(-34 // vae.spatial_vae.micro_batch_size)
            assert rt_t.ledger.peak <= rt_t.budget and rt_s.ledger.peak <= rt_s.budget


def test_vae_decoder_parts_cover_every_weight_at_full_size():
    from blockrt.pipelines.opensora.vae import VAEConfig, VideoAutoencoderPipeline

    with torch.device("meta"):
        vae = VideoAutoencoderPipeline(VAEConfig())
    for decoder in (vae.temporal_vae.decoder, vae.spatial_vae.module.decoder):
        plan = partition(decoder)
        n = sum(p.numel() * p.element_size() for p in decoder.parameters())
        assert plan.total_bytes == n
        assert plan.pinned_bytes < 0.02 * n  # the big parts stream


def test_stdit3_streams_from_a_checkpoint_in_the_real_layout(random_checkpoints):
    """A random checkpoint written by ``random_weights.py`` (tiny sizes, real names and files), streamed onto a meta
    skeleton, equals the same weights loaded whole."""
    import json

    from safetensors.torch import load_file

    from blockrt.pipelines.opensora.stdit3 import STDiT3, STDiT3Config

    weights = random_checkpoints(("stdit3",))["stdit3"]
    assert (weights / "model.safetensors").exists() and (weights / "config.json").exists()
    cfg = STDiT3Config.from_dict(json.loads((weights / "config.json").read_text()))
    plain = STDiT3(cfg).eval()
    plain.load_state_dict(load_file(weights / "model.safetensors"))
    feed = stdit3_feed(plain)
    with torch.no_grad():
        ref = plain(**feed)
    with blockrt.meta_weights():
        skeleton = STDiT3(cfg).eval()
    plan = partition(skeleton)
    assert plan.partitioner == "stdit3" and len(plan.blocks) == cfg.depth
    assert plan.blocks[0].modules == ("spatial_blocks.0", "temporal_blocks.0")
    with blockrt.run(skeleton, budget="64MB", weights=weights, config=RunConfig(prefetch_depth=1)) as rt:
        for _ in range(PASSES):
            assert torch.equal(rt(**feed), ref)


def test_vae_decoders_stream_from_the_vae_checkpoint_by_prefix(random_checkpoints):
    """Each decoder streams straight out of ``OpenSora-VAE-v1.2/model.safetensors`` (517 keys, real layout)."""
    from safetensors.torch import load_file

    from blockrt.errors import StoreError
    from blockrt.pipelines.opensora.vae import VAEConfig, VideoAutoencoderPipeline

    weights = random_checkpoints(("vae",))["vae"]
    plain = VideoAutoencoderPipeline(VAEConfig.tiny()).eval()
    plain.load_state_dict(load_file(weights / "model.safetensors"))
    z = torch.randn(1, 4, 5, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = plain.decode(z, num_frames=17)
    with blockrt.meta_weights():
        vae = VideoAutoencoderPipeline(VAEConfig.tiny()).eval()
    for name, module in (("temporal_vae", vae.temporal_vae), ("spatial_vae.module", vae.spatial_vae.module)):
        # the small parts around each decoder (post_quant_conv) are loaded whole, as the pipeline would
        prefix = f"{name}.post_quant_conv."
        module.post_quant_conv.load_state_dict(
            {k[len(prefix):]: v for k, v in load_file(weights / "model.safetensors").items() if k.startswith(prefix)},
            assign=True)
    vae.load_state_dict({k: v for k, v in plain.state_dict().items() if k in ("scale", "shift")}, strict=False,
                        assign=True)
    with torch.no_grad(), \
            blockrt.run(vae.temporal_vae.decoder, budget="64MB", weights=weights,
                        config=RunConfig(weights_prefix="temporal_vae.decoder.")) as rt_t, \
            blockrt.run(vae.spatial_vae.module.decoder, budget="64MB", weights=weights,
                        config=RunConfig(weights_prefix="spatial_vae.module.decoder.")) as rt_s:
        for _ in range(2):
            assert torch.equal(vae.decode(z, num_frames=17), ref)
        assert rt_t.plan.partitioner == "vae-temporal-decoder" and rt_s.plan.partitioner == "vae-spatial-decoder"
    with blockrt.meta_weights():
        other = VideoAutoencoderPipeline(VAEConfig.tiny())
    with pytest.raises(StoreError, match="no key starting with"):
        blockrt.run(other.temporal_vae.decoder, budget="64MB", weights=weights,
                    config=RunConfig(weights_prefix="temporal_vae.decoderX."))
