"""Open-Sora's three models streamed block by block: outputs identical to the plain models (CPU fp32)."""

from __future__ import annotations

import pytest
import torch

import blockrt
from blockrt import RunConfig
from partitioners import partition

PASSES = 3


def test_vae_decoders_stream_part_by_part_with_identical_output():
    from pipelines.opensora.vae import VAEConfig, VideoAutoencoderPipeline

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
    from pipelines.opensora.vae import VAEConfig, VideoAutoencoderPipeline

    with torch.device("meta"):
        vae = VideoAutoencoderPipeline(VAEConfig())
    for decoder in (vae.temporal_vae.decoder, vae.spatial_vae.module.decoder):
        plan = partition(decoder)
        n = sum(p.numel() * p.element_size() for p in decoder.parameters())
        assert plan.total_bytes == n
        assert plan.pinned_bytes < 0.02 * n  # the big parts stream
