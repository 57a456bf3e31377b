"""Tests of Open-Sora's prompt preprocessing (prompt.py), sizes (resolution.py) and mp4 saving (video.py).

Caption-cleaning expectations follow the original ``clean_caption``'s steps applied twice (traced by hand);
videos are small synthetic clips encoded with the bundled ffmpeg, checked for frame count, size, fps and PSNR.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from blockrt.pipelines.opensora.prompt import (
    AESTHETIC_SUFFIX,
    append_scores,
    clean_caption,
    loop_prompt,
    merge_loop_prompts,
    preprocess,
    split_loop_prompts,
)
from blockrt.pipelines.opensora.resolution import (
    ASPECT_RATIO_MAP,
    RESOLUTIONS,
    decoded_size,
    latent_frames,
    latent_size,
    num_frames,
    resolve,
)
from blockrt.pipelines.opensora.video import read_mp4, save_video, to_uint8_frames, write_mp4

MIN_PSNR_DB = 30.0  # smooth synthetic clip through libx264 CRF 23, yuv420p


def clean2(text: str) -> str:
    return clean_caption(clean_caption(text))


# -- prompt ------------------------------------------------------------------------------------------------


def test_suffix_and_spec_example():
    assert AESTHETIC_SUFFIX == " aesthetic score: 6.5."
    assert preprocess("A beautiful waterfall") == "a beautiful waterfall aesthetic score: 6.5."
    # appended before cleaning, then survives both passes unchanged
    assert preprocess("A cat.") == "a cat." + AESTHETIC_SUFFIX
    assert preprocess("a cat", aes=None) == "a cat"
    assert preprocess("a cat", aes=5) == "a cat aesthetic score: 5.0."
    # not appended twice (Open-Sora checks the raw prompt)
    assert preprocess("a cat aesthetic score: 7.0.") == "a cat aesthetic score: 7.0."
    assert append_scores("a", 6.5, flow=2, camera_motion="pan right") == \
        "a aesthetic score: 6.5. motion score: 2.0. camera motion: pan right."


@pytest.mark.parametrize("raw, cleaned", [
    # case and whitespace
    ("  A Red   BALLOON\tfloating\n ", "a red balloon floating"),
    # HTML tags and entities
    ("A <b>bold</b> <i>move</i> &amp; more", "a bold move more"),
    ("fish &amp; chips &quot;fresh&quot;", 'fish chips "fresh"'),
    ("<p>Sunset</p><!-- note --> over the sea", "sunset over the sea"),
    # URLs, @mentions, hashtags of digits
    ("a dog https://www.example.com/x/y running", "a dog running"),
    ("see http://foo.io/a?b=1", "see foo. io a?b=1"),  # only the scheme goes for hosts outside .com/.org/...
    ("photo by @john_doe on flickr.com/photos", "photo by on"),
    ("#1 best view #123456 #2024", "best view 2024"),
    # punctuation
    ("wow!!! a cat ... on a mat (really) [sic] {x} | * ~", "wow!!! a cat on a mat really sic x"),
    ("hello,world.nice", "hello, world. nice"),
    ('"a quoted caption"', "a quoted caption"),
    ("-leading dash and trailing colon:", "leading dash and trailing colon"),
    ("this-is-my-cute-cat", "this is my cute cat"),
    ("well-known a-b", "well-known a-b"),
    # unicode quotes, dashes, width, ligatures, CJK ideographs (kana stay)
    ("“Curly” and ‘single’", "curly\" and 'single"),
    ("a — b – c", "a - b - c"),
    ("ＦＵＬＬ width ﬁsh", "full width fish"),
    ("a cat 東京 in tokyo ひらがな", "a cat in tokyo ひらがな"),
    # percent-encoding, file names, codes, sizes, boilerplate
    ("a+b%20c", "a b c"),
    ("image.jpg of a dog jc6640 1920x1080 free shipping", "of a dog"),
    ("click for details page 3 download", ""),
    ("ip 192.168.0.1 ok", "ip ok"),
])
def test_clean_caption_examples(raw, cleaned):
    assert clean2(raw) == cleaned


def test_clean_caption_is_lowercase_and_stable():
    text = clean2("A Quick BROWN Fox, jumps over: the LAZY dog.")
    assert text == "a quick brown fox, jumps over: the lazy dog."
    assert clean_caption(text) == text
    with pytest.raises(TypeError):
        clean_caption(None)  # type: ignore[arg-type]


def test_clean_caption_fixes_text_with_ftfy(monkeypatch):
    import sys

    import ftfy

    seen = []
    real = ftfy.fix_text
    monkeypatch.setattr(ftfy, "fix_text", lambda text: seen.append(text) or real(text))
    assert clean_caption("A “quoted” ﬁsh\r\nline") == "a \"quoted\" fish line"
    assert seen == ['a "quoted" ﬁsh\r\nline']  # step 8: after the quotes step, before the codes step
    monkeypatch.setitem(sys.modules, "ftfy", None)  # not installed
    with pytest.raises(ImportError, match=r"pip install 'blockrt\[hf\]'"):
        clean_caption("a cat")


@pytest.mark.parametrize("bad", ["", "   ", "\n\t"])
def test_empty_prompt_raises(bad):
    with pytest.raises(ValueError, match="prompt is empty"):
        preprocess(bad)


def test_prompt_empty_after_cleaning_raises():
    with pytest.raises(ValueError, match="empty after caption cleaning"):
        preprocess("https://example.com/ #12")
    with pytest.raises(ValueError, match="finite number"):
        preprocess("a cat", aes=float("nan"))


def test_loop_prompts():
    assert split_loop_prompts("a cat") == (["a cat"], None)
    texts, starts = split_loop_prompts("|0| A day |2| a night")
    assert (texts, starts) == (["A day", "a night"], [0, 2])
    merged = preprocess("|0| A day |2| a night")
    assert merged == "|0|a day aesthetic score: 6.5.|2|a night aesthetic score: 6.5."
    assert merge_loop_prompts(*split_loop_prompts(merged)) == merged
    assert [loop_prompt(merged, i) for i in range(4)] == [
        "a day aesthetic score: 6.5."] * 2 + ["a night aesthetic score: 6.5."] * 2
    for bad in ("|0| a |x| b", "|0| a |1|", "|0| a |0| b", "|0||1| b"):
        with pytest.raises(ValueError, match="loop prompt"):
            split_loop_prompts(bad)


# -- resolution --------------------------------------------------------------------------------------------


def test_resolution_presets():
    assert resolve("240p", "9:16") == (240, 426)
    assert resolve("240p") == (240, 426)  # Open-Sora's defaults
    assert resolve("144p", "3:4") == (166, 221)
    assert resolve("144p", "1:1") == (192, 192)
    assert resolve("360p", "16:9") == (640, 360)
    assert resolve("480p", "9:16") == (480, 854)
    assert resolve("480p", "4:3") == (740, 555)
    assert resolve("720p", "9:16") == (720, 1280)
    assert resolve("720p", "0.75") == (832, 1110)  # a row key directly
    assert resolve("256x256") == (256, 256) and resolve("192x192", "1:1") == (192, 192)
    for name, (pixels, table) in RESOLUTIONS.items():
        assert set(table) == set(ASPECT_RATIO_MAP.values()), name
        for h, w in table.values():
            assert abs(h * w - pixels) / pixels < 0.03, (name, h, w)


def test_resolution_errors_list_accepted_names():
    with pytest.raises(ValueError, match="240p.*720p.*256x256"):
        resolve("1080p", "9:16")
    with pytest.raises(ValueError, match="9:16"):
        resolve("240p", "7:5")
    with pytest.raises(ValueError, match="1:1"):
        resolve("256x256", "9:16")


def test_frames_and_latent_sizes():
    assert [latent_frames(n) for n in (1, 4, 5, 16, 17, 34, 51, 68, 102, 816)] == [1, 1, 2, 4, 5, 10, 15, 20, 30, 240]
    assert latent_size(51, 240, 426) == (15, 30, 53)
    assert latent_size(68, 256, 256) == (20, 32, 32)
    assert latent_size(68, 166, 221) == (20, 20, 27)
    assert decoded_size(240, 426) == (240, 424)
    assert num_frames("2s") == 51 and num_frames("4s") == 102 and num_frames(68) == 68 and num_frames("68") == 68
    for bad in (0, -1, "x", 2.5, True):
        with pytest.raises(ValueError, match="num_frames"):
            num_frames(bad)
    with pytest.raises(ValueError, match="height"):
        latent_size(51, 4, 426)


def test_latent_size_matches_vae():
    from blockrt.pipelines.opensora.vae import VAEConfig, VideoAutoencoderPipeline

    with torch.device("meta"):
        vae = VideoAutoencoderPipeline(VAEConfig.tiny())
    for n in (1, 5, 16, 17, 18, 51, 68, 100):
        assert list(latent_size(n, 240, 426)) == vae.get_latent_size([n, 240, 426]), n


# -- video -------------------------------------------------------------------------------------------------


def smooth_video(n: int, h: int, w: int) -> torch.Tensor:
    """[3, n, h, w] in [-1, 1]: slowly moving sinusoidal gradients (compressible, like natural video)."""
    t = torch.arange(n, dtype=torch.float32).view(n, 1, 1)
    y = torch.linspace(0, 1, h).view(1, h, 1)
    x = torch.linspace(0, 1, w).view(1, 1, w)
    r = torch.sin(2 * math.pi * (x + 0.05 * t))
    g = torch.cos(2 * math.pi * (y - 0.03 * t))
    b = torch.sin(math.pi * (x + y) + 0.1 * t)
    return 0.9 * torch.stack(torch.broadcast_tensors(r, g, b))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def test_to_uint8_frames_formula():
    v = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0]).view(1, 7, 1, 1).repeat(3, 1, 1, 1)
    before = v.clone()
    out = to_uint8_frames(v)
    assert out.shape == (7, 1, 1, 3) and out.dtype == np.uint8
    # clamp -> (x+1)/2 -> *255 + 0.5 -> uint8 (truncation): -0.5 -> 64.25 -> 64, 0 -> 128.0, 0.5 -> 191.75 -> 191
    assert out[:, 0, 0, 0].tolist() == [0, 0, 64, 128, 191, 255, 255]
    assert torch.equal(v, before)  # not modified in place (Open-Sora's save_sample is)
    # the arithmetic is in the input dtype, as Open-Sora does with its bf16 VAE output
    vb = smooth_video(3, 8, 10).bfloat16()
    ref = vb.clamp(-1, 1).sub(-1).div(2).mul(255).add(0.5).clamp(0, 255).permute(1, 2, 3, 0).to(torch.uint8)
    assert np.array_equal(to_uint8_frames(vb), ref.numpy())
    with pytest.raises(ValueError, match=r"\[3, N, H, W\]"):
        to_uint8_frames(torch.zeros(1, 3, 2, 4, 4))


def test_mp4_roundtrip(tmp_path):
    video = smooth_video(17, 64, 96)
    frames = to_uint8_frames(video)
    path = write_mp4(tmp_path / "clip.mp4", frames, fps=24)
    assert path == tmp_path / "clip.mp4"
    assert sorted(os.listdir(tmp_path)) == ["clip.mp4"]  # no temporary file left behind
    back, fps = read_mp4(path)
    assert back.shape == (17, 64, 96, 3) and back.dtype == np.uint8
    assert fps == pytest.approx(24.0)
    assert psnr(back, frames) > MIN_PSNR_DB
    # replacing an existing file, another fps, through save_video
    save_video(path, video[:, :5], fps=30)
    back, fps = read_mp4(path)
    assert back.shape[0] == 5 and fps == pytest.approx(30.0)
    assert sorted(os.listdir(tmp_path)) == ["clip.mp4"]


def test_mp4_odd_sizes(tmp_path):
    frames = to_uint8_frames(smooth_video(4, 33, 47))
    back, _ = read_mp4(write_mp4(tmp_path / "pad.mp4", frames))
    assert back.shape == (4, 34, 48, 3)
    assert psnr(back[:, :33, :47], frames) > MIN_PSNR_DB
    back, _ = read_mp4(write_mp4(tmp_path / "crop.mp4", frames, odd="crop"))
    assert back.shape == (4, 32, 46, 3)
    assert psnr(back, frames[:, :32, :46]) > MIN_PSNR_DB
    one, _ = read_mp4(write_mp4(tmp_path / "one.mp4", frames[:1]))  # a single frame
    assert one.shape == (1, 34, 48, 3)


def test_mp4_failure_leaves_no_files(tmp_path):
    frames = to_uint8_frames(smooth_video(3, 16, 16))
    (tmp_path / "keep.mp4").write_bytes(b"old")
    with pytest.raises(RuntimeError, match="ffmpeg failed.*no-such-preset"):
        write_mp4(tmp_path / "keep.mp4", frames, preset="no-such-preset")
    assert sorted(os.listdir(tmp_path)) == ["keep.mp4"]
    assert (tmp_path / "keep.mp4").read_bytes() == b"old"  # the old file is untouched
    with pytest.raises(ValueError, match="uint8"):
        write_mp4(tmp_path / "x.mp4", frames.astype(np.float32))
    with pytest.raises(ValueError, match="fps"):
        write_mp4(tmp_path / "x.mp4", frames, fps=0)
    with pytest.raises(FileNotFoundError):
        write_mp4(tmp_path / "missing" / "x.mp4", frames)
    assert sorted(os.listdir(tmp_path)) == ["keep.mp4"]
