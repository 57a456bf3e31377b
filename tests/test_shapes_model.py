"""The shipped shapes model: real checkpoint layout, recognisable samples, and a judge that random weights fail."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from blockrt.pipelines.opensora import loading
from blockrt.pipelines.opensora.pipeline import DIRS, GenerateConfig, OpenSoraPipeline
from blockrt.pipelines.opensora.video import to_uint8_frames
from blockrt.pipelines.shapes.dataset import FRAMES
from blockrt.pipelines.shapes.judge import judge, matches
from blockrt.pipelines.shapes.layout import CFG_SCALE, RECORD, WEIGHTS_DIR

PROMPT = "a red circle moving right on a blue background"
PROMPTS = [PROMPT, "a green square moving left on a white background", "a blue triangle moving up on a gray background",
           "a yellow circle moving down on a black background"]  # every colour and direction once
SEED = 42  # the CLI's default seed
BUDGET = "64MB"
MAX_SHIPPED_BYTES = 16 * 2**20  # "a few MB": everything under pipelines/shapes/weights


def shapes_config(prompt: str = PROMPT, **kw) -> GenerateConfig:
    return GenerateConfig(prompt, resolution="64x64", aspect="1:1", frames=FRAMES, seed=kw.pop("seed", SEED),
                          cfg_scale=kw.pop("cfg_scale", CFG_SCALE), **kw)


def test_shipped_weights_are_the_real_layout_and_small():
    for component, directory in DIRS.items():
        d = WEIGHTS_DIR / directory
        assert (d / "config.json").is_file()
        loaded = loading.LOADERS[component](d)  # builds on meta and checks every key, shape and dtype
        assert loaded.weights.is_file()
    assert (WEIGHTS_DIR / DIRS["t5"] / "spiece.model").is_file()
    size = sum(p.stat().st_size for p in WEIGHTS_DIR.rglob("*") if p.is_file())
    assert size <= MAX_SHIPPED_BYTES
    record = json.loads((WEIGHTS_DIR / RECORD).read_text())
    # the shipped record was written before the module moved under blockrt.pipelines
    assert record["command"].split()[2] in ("pipelines.shapes.train", "blockrt.pipelines.shapes.train")
    assert "seed" in record["args"]
    assert record["losses"]["stdit3_loss"][-1][1] < record["losses"]["stdit3_loss"][0][1]


def test_the_shipped_tokenizer_keeps_every_caption_word_whole():
    from blockrt.pipelines.shapes.train import check_whole_words

    check_whole_words(WEIGHTS_DIR / DIRS["t5"])  # raises if any shape, colour, direction or background is split


def test_a_tokenizer_trained_on_the_captions_alone_splits_words_and_is_refused(tmp_path):
    from blockrt.pipelines.opensora.t5 import train_tiny_tokenizer
    from blockrt.pipelines.shapes.train import check_whole_words, pipeline_texts, tokenizer_corpus

    with pytest.raises(ValueError, match="must be one token"):
        check_whole_words(train_tiny_tokenizer(pipeline_texts() * 4, tmp_path / "captions", vocab_size=64))
    check_whole_words(train_tiny_tokenizer(tokenizer_corpus(), tmp_path / "corpus", vocab_size=64))


def test_a_30_step_sample_scores_as_the_prompt_says(tmp_path):
    pipe = OpenSoraPipeline(WEIGHTS_DIR, budget=BUDGET)
    result = pipe.generate(shapes_config(steps=30), out=tmp_path / "v.mp4")
    frames = to_uint8_frames(result.video)
    assert frames.shape == (FRAMES, 64, 64, 3) and (tmp_path / "v.mp4").stat().st_size > 0
    verdicts = [judge(frames)] + [judge(to_uint8_frames(pipe.generate(shapes_config(p, steps=30)).video))
                                  for p in PROMPTS[1:]]  # same seed, streamed under the budget
    # colour and direction in every video; shape in at least 3 of the 4: the model draws all three right in 96.9% of
    # the benchmark's videos (run 4's weights, 87.5%, drew this seed's blue triangle round), a model of round blobs
    # in 2 of these 4
    assert all(matches(v, p, shape=False) for v, p in zip(verdicts, PROMPTS)), verdicts
    assert sum(matches(v, p) for v, p in zip(verdicts, PROMPTS)) >= 3, verdicts


def test_the_judge_rejects_random_weights(tmp_path, random_checkpoints):
    from blockrt.pipelines.opensora.t5 import train_tiny_tokenizer

    tok = train_tiny_tokenizer([PROMPT + " aesthetic score: 6.5."] * 20, tmp_path / "tok", vocab_size=40)
    weights = random_checkpoints(t5_format="safetensors", tokenizer=tok)["t5"].parent
    video = OpenSoraPipeline(weights, budget=BUDGET).generate(shapes_config(steps=30)).video
    assert not matches(judge(to_uint8_frames(video)), PROMPT)


def test_the_resident_generator_equals_the_pipeline():
    from blockrt.pipelines.shapes.generate import ShapesGenerator

    cfg = shapes_config(steps=6, lpl=4, merge_steps=2)
    ours = ShapesGenerator().generate(cfg)
    ref = OpenSoraPipeline(WEIGHTS_DIR, stream=False).generate(cfg)
    assert torch.equal(ours.video, ref.video) and ours.steps_run == ref.steps_run == 4 and ours.leapt_at == 3
    assert np.array_equal(ours.frames, to_uint8_frames(ref.video))


def test_round_trip_attributes_reads_what_a_vae_keeps():
    """A lossless round trip keeps every attribute; a blur that rounds corners off (as the first shipped VAE
    did) keeps colour and direction and loses the squares' and triangles' shape."""
    from blockrt.pipelines.shapes.dataset import make_batch
    from blockrt.pipelines.shapes.train_vae import round_trip_attributes

    frames, specs = make_batch(5, 0, 12, frames=17)  # the 17-frame set's small shapes (radius 7..10 px)
    assert round_trip_attributes(frames, frames.copy(), specs) == {"shape": 1.0, "colour": 1.0, "direction": 1.0}
    x = torch.from_numpy(frames).float().permute(0, 1, 4, 2, 3).flatten(0, 1)  # (n*T, 3, H, W)
    blurred = torch.nn.functional.avg_pool2d(x, 9, 1, 4, count_include_pad=False)
    blurred = blurred.unflatten(0, frames.shape[:2]).permute(0, 1, 3, 4, 2).round().to(torch.uint8).numpy()
    kept = round_trip_attributes(frames, blurred, specs)
    assert kept["colour"] == 1.0 and kept["direction"] == 1.0
    circles = sum(s.shape == "circle" for s in specs) / len(specs)
    assert kept["shape"] < 0.5 and kept["shape"] >= circles  # 9-pixel blur: every shape reads as a circle or worse
    with pytest.raises(ValueError, match="as many originals"):
        round_trip_attributes(frames, frames[:3], specs)
