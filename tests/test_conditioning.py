"""STDiT3's fps/height/width conditioning as Open-Sora v1.2 builds it (``prepare_multi_resolution_info``): in the
model dtype, so bf16 rounds the sizes the same way as the timestep schedule's ratio, and fps 120 for one frame."""

from __future__ import annotations

import pytest
import torch

from blockrt.pipelines.opensora.conditioning import IMG_FPS, model_inputs
from blockrt.pipelines.opensora.pipeline import GenerateConfig
from blockrt.pipelines.opensora.resolution import RESOLUTIONS, resolve

BF16 = torch.bfloat16


@pytest.mark.parametrize("resolution, aspect, exact, rounded", [
    ("240p", "2:3", (262, 393), (262.0, 392.0)),
    ("480p", "9:16", (480, 854), (480.0, 856.0)),
    ("720p", "4:3", (1108, 832), (1104.0, 832.0)),
])
def test_sizes_reach_the_model_in_its_dtype_rounded_as_the_original(resolution, aspect, exact, rounded):
    h, w = resolve(resolution, aspect)
    assert (h, w) == exact
    side = model_inputs(height=h, width=w, frames=51, fps=24, dtype=BF16)
    assert {k: v.dtype for k, v in side.items()} == {"fps": BF16, "height": BF16, "width": BF16}
    assert (side["height"].item(), side["width"].item()) == rounded  # STDiT3 reads height[0].item()
    assert side["fps"].tolist() == [24.0]
    fp32 = model_inputs(height=h, width=w, frames=51, fps=24, dtype=torch.float32)
    assert (fp32["height"].item(), fp32["width"].item()) == (float(h), float(w))  # an fp32 model: exact


def test_33_presets_round_in_bf16_and_the_schedule_sees_the_same_sizes():
    """The model's size and the timestep schedule's ratio now use one rounding (both the bf16 values)."""
    changed = 0
    for table in (t for _, t in RESOLUTIONS.values()):
        for h, w in table.values():
            side = model_inputs(height=h, width=w, frames=51, fps=24, dtype=BF16)
            hb, wb = side["height"], side["width"]
            changed += (hb.item(), wb.item()) != (h, w)
            ratio_space = (hb * wb / (512 * 512)).sqrt()  # sampler._ratio_bf16's spatial factor, from the same tensors
            schedule_h = torch.tensor([float(h)], dtype=BF16)
            assert torch.equal(schedule_h, hb) and torch.equal(ratio_space, (schedule_h * wb / (512 * 512)).sqrt())
    assert changed == 33


def test_a_single_frame_is_conditioned_on_fps_120():
    assert model_inputs(height=64, width=64, frames=1, fps=24, dtype=torch.float32)["fps"].tolist() == [float(IMG_FPS)]
    assert model_inputs(height=64, width=64, frames=1, fps=30, dtype=BF16)["fps"].tolist() == [120.0]
    assert model_inputs(height=64, width=64, frames=17, fps=30, dtype=BF16)["fps"].tolist() == [30.0]


class _Seen(Exception):
    """Raised by the spy once STDiT3's first call's inputs are recorded: the rest of the generation is not needed."""


def _spy(model: torch.nn.Module, seen: list[dict]) -> torch.utils.hooks.RemovableHandle:
    def hook(module, args, kwargs):
        seen.append({k: kwargs[k].clone() for k in ("fps", "height", "width")})
        raise _Seen

    return model.register_forward_pre_hook(hook, with_kwargs=True)


def test_generator_passes_bf16_sizes_and_image_fps_to_a_bf16_model():
    """The shapes generator (the pipeline's maths, models resident) with its STDiT3 cast to bf16, at 240p 2:3:
    the model gets height 262 and width 392 as bf16, and fps 120 for one frame, 24 for a video."""
    from blockrt.pipelines.shapes.generate import ShapesGenerator

    gen = ShapesGenerator()
    gen.stdit = gen.stdit.to(BF16)
    seen: list[dict] = []
    hook = _spy(gen.stdit, seen)
    try:
        for resolution, aspect, frames in (("240p", "2:3", 1), ("64x64", "1:1", 17)):
            with pytest.raises(_Seen):
                gen.generate(GenerateConfig("a red circle moving right on a blue background", resolution=resolution,
                                            aspect=aspect, frames=frames, steps=1, cfg_scale=4.0))
    finally:
        hook.remove()
    image, video = seen
    assert all(v.dtype == BF16 for v in (*image.values(), *video.values()))
    assert (image["height"].item(), image["width"].item(), image["fps"].item()) == (262.0, 392.0, 120.0)
    assert (video["height"].item(), video["width"].item(), video["fps"].item()) == (64.0, 64.0, 24.0)


def test_pipeline_conditions_one_frame_on_fps_120(random_checkpoints, tmp_path_factory, monkeypatch):
    """``OpenSoraPipeline`` passes ``model_inputs``: one frame -> fps 120 (the written file keeps cfg.fps)."""
    from blockrt.pipelines.opensora import loading
    from blockrt.pipelines.opensora.pipeline import OpenSoraPipeline
    from blockrt.pipelines.opensora.t5 import train_tiny_tokenizer

    caption = "a red circle moving left on a blue background"
    tok = train_tiny_tokenizer([caption] * 20, tmp_path_factory.mktemp("tokenizer"), vocab_size=40)
    weights = random_checkpoints(t5_format="safetensors", tokenizer=tok)["t5"].parent
    seen: list[dict] = []
    load = loading.load_stdit3

    def spied(*a, **kw):
        st = load(*a, **kw)
        _spy(st.model, seen)
        return st

    monkeypatch.setattr(loading, "load_stdit3", spied)
    pipe = OpenSoraPipeline(weights, budget="64MB", stream=False)
    for frames in (1, 17):
        with pytest.raises(_Seen):
            pipe.generate(GenerateConfig(caption, resolution="144p", aspect="1:1", frames=frames, steps=1, fps=24))
    assert [s["fps"].item() for s in seen] == [120.0, 24.0]
    assert all(s["height"].dtype == torch.float32 and s["height"].item() == 192.0 for s in seen)  # fp32 weights
