"""The Open-Sora pipeline end to end on tiny random weights in the real layout (T5 -> STDiT3 -> VAE -> mp4)."""

from __future__ import annotations

import pytest
import torch

from blockrt.pipelines.opensora.pipeline import GenerateConfig, OpenSoraPipeline

CAPTIONS = ["a red circle moving left on a blue background", "a green square moving up on a white background",
            "a yellow triangle moving right on a black background", "a blue circle moving down"]
BUDGET = "64MB"


@pytest.fixture(scope="module")
def weights(tmp_path_factory, random_checkpoints):
    """The weights root: the three components side by side."""
    from blockrt.pipelines.opensora.t5 import train_tiny_tokenizer

    tok = train_tiny_tokenizer(CAPTIONS * 20, tmp_path_factory.mktemp("tokenizer"), vocab_size=60)
    return random_checkpoints(t5_format="safetensors", tokenizer=tok)["t5"].parent


def small(**kw) -> GenerateConfig:
    return GenerateConfig(**{"prompt": CAPTIONS[0], "resolution": "144p", "aspect": "1:1", "frames": 17,
                             "steps": 4, "seed": 7, **kw})


def test_streamed_equals_not_streamed_and_writes_an_mp4(weights, tmp_path):
    from blockrt.pipelines.opensora.resolution import resolve
    from blockrt.pipelines.opensora.video import read_mp4

    streamed = OpenSoraPipeline(weights, budget=BUDGET).generate(small(lpl=3, merge_steps=2), out=tmp_path / "a.mp4")
    whole = OpenSoraPipeline(weights, budget=BUDGET, stream=False).generate(small(lpl=3, merge_steps=2))
    assert torch.equal(streamed.video, whole.video)
    assert streamed.steps_run == 3 and streamed.leapt_at == 2
    h, w = resolve("144p", "1:1")
    frames, fps = read_mp4(tmp_path / "a.mp4")
    assert frames.shape[0] == 17 and fps == 24
    assert frames.shape[1] == h // 8 * 8 + (h // 8 * 8) % 2 and frames.shape[2] == w // 8 * 8 + (w // 8 * 8) % 2
    for name, stage in streamed.stages.items():
        assert stage["peak_ledger_bytes"] <= 64e6, name
    assert set(streamed.stages) == {"t5", "stdit3", "vae_temporal", "vae_spatial"}
    assert streamed.profile.summary().passes > 4


def test_same_seed_same_video(weights):
    pipe = OpenSoraPipeline(weights, budget=BUDGET)
    a = pipe.generate(small(steps=2)).video
    b = pipe.generate(small(steps=2)).video
    c = pipe.generate(small(steps=2, seed=8)).video
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("kw, match", [
    ({"prompt": "   "}, "empty"),
    ({"resolution": "1080p"}, "144p"),
    ({"frames": 0}, "frames|>= 1|at least"),
    ({"steps": 0}, "steps"),
    ({"lpl": 5}, "lpl"),
    ({"lpl": 0}, "lpl"),
    ({"merge_steps": 5}, "merge_steps"),
])
def test_bad_input_fails_before_any_work(kw, match):
    with pytest.raises(ValueError, match=match):
        small(**kw)


def test_missing_weights_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="OpenSora-STDiT-v3"):
        OpenSoraPipeline(tmp_path)
