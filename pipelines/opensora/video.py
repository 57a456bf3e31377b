"""Saving Open-Sora videos: decoded tensor -> uint8 frames -> H.264 mp4 (spec §0 step 5, §5: save_fps 24).

- ``to_uint8_frames``: Open-Sora's ``save_sample`` conversion of a ``[3, N, H, W]`` video in [-1, 1]:
  clamp to [-1, 1], ``(x + 1) / 2``, ``* 255 + 0.5``, clamp to [0, 255], cast to uint8 (truncation), with the
  arithmetic in the tensor's own dtype as the original (bf16 there: the VAE output is not cast first).
- ``write_mp4``: libx264, yuv420p, CRF 23 / preset medium (libx264's defaults, which Open-Sora gets through
  ``torchvision.io.write_video(..., video_codec="h264")``), piped as raw RGB to imageio-ffmpeg's bundled
  ffmpeg (its messages are captured, not printed, and reported if it fails), written to a temporary name
  in the target directory, fsynced and moved into place (``blockrt.files.atomic_path``: readers never see a
  half-written file).
  The bytes differ from Open-Sora's PyAV writer (container / encoder settings); the pixels agree to coding
  noise. Open-Sora writes a single frame as PNG instead; here it is a one-frame mp4.
- yuv420p needs an even width and height. An odd size is padded by one row / column repeating the last one
  (``odd="pad"``, the default: no content lost, the file is one pixel larger) or cropped by one
  (``odd="crop"``). Open-Sora's sizes are multiples of 8 after decoding, so this only concerns other inputs.
- ``read_mp4``: frames and fps back, for tests and tools.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
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

    Example:
        >>> write_mp4("out.mp4", to_uint8_frames(video[0]), fps=24)  # doctest: +SKIP
    """
    import imageio_ffmpeg

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
    rate = Fraction(fps).limit_denominator(1001)  # 24 -> "24", 29.97 -> "2997/100"
    # ffmpeg writes the file by name: a temporary one beside the target, fsynced and renamed on success
    with atomic_path(path, suffix=".tmp.mp4") as tmp:
        cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-hide_banner", "-nostats", "-loglevel", "error",
               "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", str(rate), "-i", "-",
               "-an", "-c:v", "libx264", "-preset", preset, "-crf", str(crf), "-pix_fmt", "yuv420p",
               "-f", "mp4", tmp]
        # ffmpeg's messages go to a temporary file (nothing is printed) and into the error if it fails.
        with tempfile.TemporaryFile() as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log)
            try:
                for frame in frames:  # [H, W, 3] uint8, one rawvideo frame each
                    proc.stdin.write(frame.tobytes())
            except BrokenPipeError:  # ffmpeg exited early; its exit status and log say why
                pass
            except BaseException:  # e.g. KeyboardInterrupt: do not leave ffmpeg waiting for input
                proc.kill()
                raise
            finally:
                try:
                    proc.stdin.close()
                except BrokenPipeError:
                    pass
                returncode = proc.wait()
            if returncode != 0:
                log.seek(0)
                message = log.read().decode(errors="replace").strip()[-2000:]
                raise RuntimeError(f"ffmpeg failed to write {str(path)!r} (exit status {returncode}): {message}")
    return path


def save_video(path: str | os.PathLike[str], video: torch.Tensor, fps: float = DEFAULT_FPS, **kwargs) -> Path:
    """``write_mp4(path, to_uint8_frames(video), fps)``: a decoded ``[3, N, H, W]`` video in [-1, 1] to mp4."""
    return write_mp4(path, to_uint8_frames(video), fps, **kwargs)


def read_mp4(path: str | os.PathLike[str]) -> tuple[np.ndarray, float]:
    """Decode an mp4 to ``([N, H, W, 3] uint8 RGB frames, fps)``."""
    import imageio_ffmpeg

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no video at {str(path)!r}")
    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    try:
        meta = next(reader)
        w, h = meta["size"]
        frames = [np.frombuffer(buf, dtype=np.uint8).reshape(h, w, 3) for buf in reader]
    finally:
        reader.close()
    if not frames:
        raise ValueError(f"{str(path)!r} holds no video frames")
    return np.stack(frames), float(meta["fps"])
