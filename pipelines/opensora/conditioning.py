"""STDiT3's size and fps conditioning as Open-Sora v1.2 builds it: ``fps``, ``height``, ``width`` in the model dtype.

The original's ``prepare_multi_resolution_info`` (``opensora/utils/inference_utils.py``, the ``"OpenSora"`` branch)
makes each of them a ``torch.tensor([value], dtype=dtype)`` in the *model* dtype, and STDiT3 reads
``height[0].item()``/``width[0].item()`` back for the position-embedding scale. In bf16 that rounds every size
that bf16 cannot hold (8 significant bits: 393 -> 392 at 240p 2:3, 854 -> 856 at 480p 9:16), the same rounding
the timestep schedule's ``ratio`` already gets (``sampler._ratio_bf16``). A single image (``num_frames == 1``) is
conditioned on ``IMG_FPS`` = 120 whatever the requested fps (the saved file keeps its own fps).

Example:
    >>> side = model_inputs(height=262, width=393, frames=51, fps=24, dtype=torch.bfloat16)
    >>> side["width"], side["fps"]
    (tensor([392.], dtype=torch.bfloat16), tensor([24.], dtype=torch.bfloat16))
"""

from __future__ import annotations

import torch

IMG_FPS = 120  # Open-Sora's fps conditioning for a single image (opensora/datasets: IMG_FPS)


def conditioning_fps(frames: int, fps: int | float) -> float:
    """The fps the model is conditioned on: ``fps`` for a video, ``IMG_FPS`` (120) for one frame, as the original."""
    return float(fps if frames > 1 else IMG_FPS)


def model_inputs(*, height: int, width: int, frames: int, fps: int | float, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """``{"fps", "height", "width"}`` for ``STDiT3.forward``, each a ``(1,)`` tensor in the model ``dtype``.

    Args:
        height, width: the video size in pixels (the preset's, e.g. 262 x 393).
        frames: video frames (1 = an image: fps conditioning 120).
        fps: frames per second of the video.
        dtype: the model's dtype (``STDiT3.dtype``): bf16 rounds the sizes as the original does; fp32 keeps them.
    """
    return {"fps": torch.tensor([conditioning_fps(frames, fps)], dtype=dtype, device=device),
            "height": torch.tensor([float(height)], dtype=dtype, device=device),
            "width": torch.tensor([float(width)], dtype=dtype, device=device)}
