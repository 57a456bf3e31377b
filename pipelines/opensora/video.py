"""Saving Open-Sora videos: decoded tensor -> uint8 frames -> H.264 mp4 (spec §0 step 5, §5: save_fps 24).

- ``to_uint8_frames``: Open-Sora's ``save_sample`` conversion of a ``[3, N, H, W]`` video in [-1, 1]:
  clamp to [-1, 1], ``(x + 1) / 2``, ``* 255 + 0.5``, clamp to [0, 255], cast to uint8 (truncation), with the
  arithmetic in the tensor's own dtype as the original (bf16 there: the VAE output is not cast first).
- ``write_mp4``: libx264, yuv420p, CRF 23 / preset medium (libx264's defaults, which Open-Sora gets through
  ``torchvision.io.write_video(..., video_codec="h264")``), encoded in process by PyAV (FFmpeg's libraries, the
  same route torchvision takes: an FFmpeg error is a Python exception, nothing is printed), written to a
  temporary name in the target directory, fsynced and moved into place (``blockrt.files.atomic_path``: readers
  never see a half-written file). Open-Sora writes a single frame as PNG instead; here it is a one-frame mp4.
- yuv420p needs an even width and height. An odd size is padded by one row / column repeating the last one
  (``odd="pad"``, the default: no content lost, the file is one pixel larger) or cropped by one
  (``odd="crop"``). Open-Sora's sizes are multiples of 8 after decoding, so this only concerns other inputs.
- ``read_mp4``: frames and fps back (PyAV), for tests and tools.
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from blockrt.files import atomic_path

DEFAULT_FPS = 24  # Open-Sora v1.2's save_fps
DEFAULT_CRF = 23  # libx264's default
DEFAULT_PRESET = "medium"


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """``[3, N, H, W]`` in [-1, 1] -> ``[N, H, W, 3]`` uint8 exactly as Open-Sora's ``save_sample``; input unchanged."""
    if not isinstance(video, torch.Tensor):
        raise TypeError(f"video must be a torch.Tensor [3, N, H, W], got {type(video).__name__}")
    if video.ndim != 4 or video.shape[0] != 3:
        hint = " (take one sample of the batch: video[i])" if video.ndim == 5 else ""
        raise ValueError(f"video must be [3, N, H, W] (RGB channels first), got shape {tuple(video.shape)}{hint}")
    if not video.is_floating_point():
        raise ValueError(f"video must be a floating-point tensor in [-1, 1], got {video.dtype}")
    x = video.detach().clamp(-1, 1)
    x = x.sub(-1).div(2)  # [0, 1]: (x - low) / (high - low)
    x = x.mul(255).add(0.5).clamp(0, 255)
    return x.permute(1, 2, 3, 0).to("cpu", torch.uint8).numpy()  # [N, H, W, 3]


def _even(frames: np.ndarray, odd: str) -> np.ndarray:
    n, h, w, _ = frames.shape
    if h % 2 == 0 and w % 2 == 0:
        return frames
    if odd == "pad":  # repeat the last row / column
        return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    if h < 2 or w < 2:
        raise ValueError(f"cannot crop a {h}x{w} frame to an even size; use odd='pad'")
    return frames[:, : h - h % 2, : w - w % 2]


def write_mp4(path: str | os.PathLike[str], frames: np.ndarray, fps: float = DEFAULT_FPS, *,
              crf: int = DEFAULT_CRF, preset: str = DEFAULT_PRESET,
              odd: Literal["pad", "crop"] = "pad") -> Path:
    """Write ``[N, H, W, 3]`` uint8 RGB frames as an H.264 (yuv420p) mp4, atomically.

    Args:
        path: the .mp4 file; its directory must exist. An existing file is replaced.
        frames: ``[N, H, W, 3]`` uint8 (``to_uint8_frames`` output), N >= 1.
        fps: frames per second stored in the file (Open-Sora saves at 24).
        crf: libx264 constant rate factor, 0 (lossless) .. 51; 23 is libx264's and Open-Sora's default.
        preset: libx264 speed preset ("ultrafast" .. "veryslow").
        odd: how an odd height / width is made even: "pad" repeats the last row / column, "crop" drops it.

    Returns:
        The path written.

    Raises:
        RuntimeError: FFmpeg refused the settings or failed to write (its message included); nothing is left.

    Example:
        >>> write_mp4("out.mp4", to_uint8_frames(video[0]), fps=24)  # doctest: +SKIP
    """
    av = _av()
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [N, H, W, 3] (use to_uint8_frames), got {frames.dtype} "
                         f"{tuple(frames.shape)}")
    if frames.shape[0] < 1 or frames.shape[1] < 1 or frames.shape[2] < 1:
        raise ValueError(f"frames must hold at least one non-empty frame, got shape {tuple(frames.shape)}")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps < 1000:
        raise ValueError(f"fps must be a number in (0, 1000), got {fps!r}")
    if isinstance(crf, bool) or not isinstance(crf, int) or not 0 <= crf <= 51:
        raise ValueError(f"crf must be an int in [0, 51] (libx264), got {crf!r}")
    if odd not in ("pad", "crop"):
        raise ValueError(f"odd must be 'pad' or 'crop', got {odd!r}")
    frames = np.ascontiguousarray(_even(frames, odd))
    _, h, w, _ = frames.shape

    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"directory {str(path.parent)!r} of {str(path)!r} does not exist")
    rate = Fraction(fps).limit_denominator(1001)  # 24 -> 24, 29.97 -> 2997/100
    # written under a temporary name beside the target, fsynced and renamed on success, removed on failure
    with atomic_path(path, suffix=".tmp.mp4") as tmp:
        try:
            with av.open(tmp, mode="w", format="mp4") as container:
                stream = container.add_stream("libx264", rate=rate)
                stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
                stream.options = {"crf": str(crf), "preset": preset}
                for frame in frames:  # [H, W, 3] uint8
                    container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
                container.mux(stream.encode(None))  # flush the encoder's delayed frames
        except av.FFmpegError as e:
            raise RuntimeError(f"ffmpeg failed to write {str(path)!r} with libx264 (preset {preset!r}, crf {crf}, "
                               f"{w}x{h} at {rate} fps): {e}") from e
    return path


def save_video(path: str | os.PathLike[str], video: torch.Tensor, fps: float = DEFAULT_FPS, **kwargs) -> Path:
    """``write_mp4(path, to_uint8_frames(video), fps)``: a decoded ``[3, N, H, W]`` video in [-1, 1] to mp4."""
    return write_mp4(path, to_uint8_frames(video), fps, **kwargs)


def read_mp4(path: str | os.PathLike[str]) -> tuple[np.ndarray, float]:
    """Decode an mp4 to ``([N, H, W, 3] uint8 RGB frames, fps)``."""
    av = _av()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no video at {str(path)!r}")
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate)
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    if not frames:
        raise ValueError(f"{str(path)!r} holds no video frames")
    return np.stack(frames), fps


def _av():
    try:
        import av
    except ImportError:
        raise ImportError("writing and reading mp4 needs PyAV; fix: pip install 'blockrt[video]'") from None
    return av
