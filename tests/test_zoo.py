"""The zoo: the default (whole-model) partitioner streams many architectures bit-exact under half their bytes,
and at real size (on ``meta``) pins little and keeps every block under an eighth of the model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import blockrt
from blockrt import RunConfig
from blockrt.errors import BlockrtError
from blockrt.partitioners import partition
from blockrt.partitioners.registry import lookup
from blockrt.partitioners.whole_model import whole_model_partition
from zoo_models import SLOW, ZOO, build, output

BUDGET_FRACTION = 0.5  # of the model's bytes
CALLS = 2
MAX_PINNED_SHARE = 0.10  # real size, default target
MAX_BLOCK_SHARE = 1 / 8  # real size, default target


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in ZOO])
def test_streams_bit_exact_under_half_the_bytes(name: str) -> None:
    model, kwargs = build(name)
    with torch.no_grad():
        ref = output(model(**kwargs)).clone()  # before the run: streamed weights stay meta after close
    plan = partition(model)
    assert len(plan.blocks) >= 2
    if lookup(type(model)) is whole_model_partition:  # no hint registered for the class (T5EncoderModel has one)
        assert plan.partitioner == "whole-model"
    budget = int(plan.total_bytes * BUDGET_FRACTION)
    with blockrt.run(model, budget=budget) as rt:
        for _ in range(CALLS):
            assert torch.equal(output(rt(**kwargs)), ref), name
        assert rt.profile.summary().peak_ledger_bytes <= budget
        assert rt.ledger.peak <= budget


class _CallsPeer(nn.Module):
    """A layer whose forward may call another layer's norm (kept as a plain attribute: not a submodule)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.norm = nn.Linear(64, 64), nn.LayerNorm(64)
        self.peer: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.peer is not None:
            x = self.peer(x)
        return self.norm(self.lin(x))


class _Nested(nn.Module):
    """Layer 1 calls layer 0's norm inside its own forward: a nested use of another block's module."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_CallsPeer() for _ in range(4))
        object.__setattr__(self.layers[1], "peer", self.layers[0].norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class _Reader(nn.Module):
    """Reads layer 0's weight directly after layer 1 ran: a stray use of an evicted weight."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(64, 64) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x @ self.layers[0].weight


def test_nested_use_names_module_blocks_and_fix() -> None:
    from blockrt.partitioners.generic import generic_partition  # a layer a block: layer 1 runs as one module

    torch.manual_seed(0)
    model, x = _Nested().eval(), torch.randn(2, 64)
    with torch.no_grad():
        ref = model(x)
    with blockrt.run(model, budget=1 << 20, partitioner=generic_partition) as rt, pytest.raises(
            BlockrtError, match=r"'layers\.0\.norm'.*block 'layers\.0'.*block 'layers\.1'.*RunConfig\(pin="):
        rt(x)
    with blockrt.run(model, budget=1 << 20, partitioner=generic_partition,
                     config=RunConfig(pin=["layers.0.norm"])) as rt:
        assert "layers.0.norm.weight" in [t.key for t in rt.plan.pinned]
        assert torch.equal(rt(x), ref)


def test_stray_use_of_evicted_weight_is_a_blockrt_error() -> None:
    model, x = _Reader().eval(), torch.randn(2, 64)
    """torch 2.13's CPU matmul with a plain ``meta`` operand returns uninitialised memory instead of raising: the
    evicted placeholder (``blockrt/placeholder.py``) must catch the direct read of an evicted weight."""
    with blockrt.run(model, budget=1 << 20) as rt, pytest.raises(
            BlockrtError, match=r"'layers\.0\.weight' \(block .*evicted meta placeholder.*pin=\['layers\.0'\]"):
        rt(x)


def _real(name: str) -> nn.Module:
    if name == "flux-dev":
        from diffusers import FluxTransformer2DModel
        return FluxTransformer2DModel(num_layers=19, num_single_layers=38, guidance_embeds=True)
    if name == "hunyuan-video":
        from diffusers import HunyuanVideoTransformer3DModel
        return HunyuanVideoTransformer3DModel(num_layers=20, num_single_layers=40)
    if name == "sd15-unet":
        from diffusers import UNet2DConditionModel
        return UNet2DConditionModel(cross_attention_dim=768)
    if name == "sdxl-unet":  # SDXL base's UNet config
        from diffusers import UNet2DConditionModel
        return UNet2DConditionModel(
            sample_size=128, block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    if name == "t5-large":
        from transformers import T5Config, T5ForConditionalGeneration
        return T5ForConditionalGeneration(T5Config(d_model=1024, d_ff=4096, num_layers=24, num_heads=16, d_kv=64))
    from transformers import WhisperConfig, WhisperForConditionalGeneration
    return WhisperForConditionalGeneration(WhisperConfig(
        d_model=1280, encoder_layers=32, decoder_layers=32, encoder_attention_heads=20, decoder_attention_heads=20,
        encoder_ffn_dim=5120, decoder_ffn_dim=5120, num_mel_bins=128, vocab_size=51866))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["flux-dev", "hunyuan-video", "sd15-unet", "sdxl-unet", "t5-large", "whisper-large"])
def test_real_size_plan_on_meta(name: str) -> None:
    with torch.device("meta"):
        model = _real(name)
    plan = partition(model)
    total = plan.total_bytes
    assert plan.pinned_bytes <= MAX_PINNED_SHARE * total, name
    assert plan.largest_block().nbytes <= MAX_BLOCK_SHARE * total, (name, plan.largest_block().name)
