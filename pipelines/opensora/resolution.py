"""Open-Sora v1.2 video sizes: resolution presets x aspect ratios -> (height, width), frame counts, latent sizes.

Data from Open-Sora v1.2's ``opensora/datasets/aspect.py`` (spec §5): ``--resolution`` picks a table by its pixel
budget, ``--aspect-ratio "H:W"`` a row of it (through ``ASPECT_RATIO_MAP``, or directly by its key "0.56").
Only the trained presets 144p..720p are here, plus the two square sizes of the on-device iPhone app
(``ondevice-sora.md`` §5): "256x256" (its default) and "192x192" (= 144p 1:1), and "64x64", the shapes model's.

Latent size (spec §2.3, ``VideoAutoencoderPipeline.get_latent_size``): time is cut into chunks of 17 frames,
each 5 latents; a remainder r gives ceil(r / 4) latents. Space is floor(x / 8); the decoded video is therefore
8 * floor(x / 8) pixels (240x426 -> 240x424).
"""

from __future__ import annotations

import math

# "H:W" -> row key of the tables below (Open-Sora v1.2's ASPECT_RATIO_MAP; note 50:27 -> "2.08").
ASPECT_RATIO_MAP: dict[str, str] = {
    "3:8": "0.38", "9:21": "0.43", "12:25": "0.48", "1:2": "0.50", "9:17": "0.53", "27:50": "0.54",
    "9:16": "0.56", "5:8": "0.62", "2:3": "0.67", "3:4": "0.75", "1:1": "1.00", "4:3": "1.33", "3:2": "1.50",
    "16:9": "1.78", "17:9": "1.89", "2:1": "2.00", "50:27": "2.08",
}

# resolution -> (pixel budget, {ratio key: (height, width)}).
RESOLUTIONS: dict[str, tuple[int, dict[str, tuple[int, int]]]] = {
    "144p": (36_864, {
        "0.38": (117, 312), "0.43": (125, 291), "0.48": (133, 277), "0.50": (135, 270), "0.53": (139, 262),
        "0.54": (141, 260), "0.56": (144, 256), "0.62": (151, 241), "0.67": (156, 234), "0.75": (166, 221),
        "1.00": (192, 192), "1.33": (221, 165), "1.50": (235, 156), "1.78": (256, 144), "1.89": (263, 139),
        "2.00": (271, 135), "2.08": (277, 132),
    }),
    "240p": (102_240, {
        "0.38": (196, 522), "0.43": (210, 490), "0.48": (222, 462), "0.50": (226, 452), "0.53": (232, 438),
        "0.54": (236, 436), "0.56": (240, 426), "0.62": (252, 404), "0.67": (262, 393), "0.75": (276, 368),
        "1.00": (320, 320), "1.33": (370, 278), "1.50": (392, 262), "1.78": (426, 240), "1.89": (440, 232),
        "2.00": (452, 226), "2.08": (462, 222),
    }),
    "360p": (230_400, {
        "0.38": (294, 784), "0.43": (314, 732), "0.48": (332, 692), "0.50": (340, 680), "0.53": (350, 662),
        "0.54": (352, 652), "0.56": (360, 640), "0.62": (380, 608), "0.67": (392, 588), "0.75": (416, 554),
        "1.00": (480, 480), "1.33": (554, 416), "1.50": (588, 392), "1.78": (640, 360), "1.89": (660, 350),
        "2.00": (678, 340), "2.08": (692, 332),
    }),
    "480p": (409_920, {
        "0.38": (392, 1046), "0.43": (420, 980), "0.48": (444, 925), "0.50": (452, 904), "0.53": (466, 880),
        "0.54": (470, 870), "0.56": (480, 854), "0.62": (506, 810), "0.67": (522, 784), "0.75": (554, 738),
        "1.00": (640, 640), "1.33": (740, 555), "1.50": (784, 522), "1.78": (854, 480), "1.89": (880, 466),
        "2.00": (906, 454), "2.08": (924, 444),
    }),
    "720p": (921_600, {
        "0.38": (588, 1568), "0.43": (628, 1466), "0.48": (666, 1388), "0.50": (678, 1356), "0.53": (698, 1318),
        "0.54": (706, 1306), "0.56": (720, 1280), "0.62": (758, 1212), "0.67": (784, 1176), "0.75": (832, 1110),
        "1.00": (960, 960), "1.33": (1108, 832), "1.50": (1176, 784), "1.78": (1280, 720), "1.89": (1320, 698),
        "2.00": (1358, 680), "2.08": (1386, 666),
    }),
}

# The iPhone app's fixed square sizes (aspect 1:1 only).
# "64x64": the size of the small model trained here on synthetic shapes (pipelines/shapes), square too.
APP_SIZES: dict[str, tuple[int, int]] = {"256x256": (256, 256), "192x192": (192, 192), "64x64": (64, 64)}

DEFAULT_RESOLUTION = "240p"
DEFAULT_ASPECT = "9:16"

# Open-Sora's num_frames aliases (NUM_FRAMES_MAP).
NUM_FRAMES_MAP: dict[str, int] = {"1x": 51, "2x": 102, "4x": 204, "8x": 408, "16x": 816,
                                  "2s": 51, "4s": 102, "8s": 204, "16s": 408, "32s": 816}

MICRO_FRAME_SIZE = 17  # pixel frames per temporal-VAE chunk
MICRO_Z_FRAME_SIZE = 5  # latent frames per chunk
TIME_COMPRESSION = 4  # temporal VAE: 4 frames -> 1 latent (front-padded)
SPATIAL_COMPRESSION = 8  # SDXL VAE


def resolve(resolution: str = DEFAULT_RESOLUTION, aspect: str | None = None) -> tuple[int, int]:
    """(height, width) in pixels of a preset, as Open-Sora's ``get_image_size``.

    Args:
        resolution: "144p", "240p", "360p", "480p", "720p", or the app's "256x256" / "192x192".
        aspect: "H:W" such as "9:16" (portrait, Open-Sora's default), "1:1", "16:9", or a row key such as
            "0.56"; None means "9:16" for the p-presets and "1:1" for the app sizes.

    Example:
        >>> resolve("240p", "9:16")
        (240, 426)
    """
    if resolution in APP_SIZES:
        if aspect not in (None, "1:1", "1.00"):
            raise ValueError(f"resolution {resolution!r} is the iPhone app's square size: aspect must be '1:1', "
                             f"got {aspect!r}")
        return APP_SIZES[resolution]
    if resolution not in RESOLUTIONS:
        raise ValueError(f"unknown resolution {resolution!r}; accepted: {', '.join([*RESOLUTIONS, *APP_SIZES])}")
    aspect = DEFAULT_ASPECT if aspect is None else aspect
    key = ASPECT_RATIO_MAP.get(aspect, aspect)
    table = RESOLUTIONS[resolution][1]
    if key not in table:
        raise ValueError(f"unknown aspect ratio {aspect!r} for {resolution}; accepted (H:W): "
                         f"{', '.join(ASPECT_RATIO_MAP)} (or their keys {', '.join(table)})")
    return table[key]


def num_frames(value: int | str) -> int:
    """Open-Sora's ``get_num_frames``: "2s"/"1x" -> 51, "4s" -> 102, ... ; an int (or digit string) as is; >= 1."""
    if isinstance(value, str) and value in NUM_FRAMES_MAP:
        return NUM_FRAMES_MAP[value]
    if isinstance(value, bool):
        raise ValueError(f"num_frames must be an int >= 1 or one of {', '.join(NUM_FRAMES_MAP)}, got {value!r}")
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"num_frames must be an int >= 1 or one of {', '.join(NUM_FRAMES_MAP)}, "
                         f"got {value!r}") from None
    if n != value and not isinstance(value, str):  # 2.5 -> reject rather than truncate
        raise ValueError(f"num_frames must be a whole number, got {value!r}")
    if n < 1:
        raise ValueError(f"num_frames must be >= 1 (1 = a single image), got {n}")
    return n


def latent_frames(frames: int) -> int:
    """Latent length of ``frames`` video frames: 5 per full 17-frame chunk + ceil(rest / 4).

    17 -> 5, 51 -> 15, 68 -> 20 (as ``VideoAutoencoderPipeline.get_latent_size``)."""
    frames = num_frames(frames)
    full, rest = divmod(frames, MICRO_FRAME_SIZE)
    return full * MICRO_Z_FRAME_SIZE + math.ceil(rest / TIME_COMPRESSION)


def latent_size(frames: int, height: int, width: int) -> tuple[int, int, int]:
    """(T, h, w) of the VAE latent for a ``frames x height x width`` video: (latent_frames, H // 8, W // 8).

    Example:
        >>> latent_size(51, 240, 426)
        (15, 30, 53)
    """
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v < SPATIAL_COMPRESSION:
            raise ValueError(f"{name} must be an int >= {SPATIAL_COMPRESSION} pixels (one latent), got {v!r}")
    return latent_frames(frames), height // SPATIAL_COMPRESSION, width // SPATIAL_COMPRESSION


def decoded_size(height: int, width: int) -> tuple[int, int]:
    """(H, W) of the decoded video: 8 * floor(x / 8) (240x426 is generated as 240x424)."""
    _, h, w = latent_size(1, height, width)
    return h * SPATIAL_COMPRESSION, w * SPATIAL_COMPRESSION
