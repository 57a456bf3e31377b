"""Random-weight Open-Sora v1.2 checkpoints in exactly the real files' layout, written tensor by tensor.

For benchmarks and tests without the real weights (spec §6): the same directory names, ``config.json``,
file names, sharding, key names, shapes and dtypes as

- ``OpenSora-STDiT-v3/``: ``config.json`` + ``model.safetensors`` (973 fp32 tensors, 4.8 GB);
- ``OpenSora-VAE-v1.2/``: ``config.json`` + ``model.safetensors`` (517 tensors, 1.6 GB; the real
  ``scale``/``shift`` values);
- ``t5-v1_1-xxl/``: ``config.json`` + ``pytorch_model-0000{1,2}-of-00002.bin`` + ``pytorch_model.bin.index.json``
  (fp32 pickles, 19 GB, split where transformers 4.21 split the real ones: 9.45 + 9.60 GB), or the
  safetensors conversion of the hub's ``refs/pr/3`` (``model-0000{1,2}-of-00002.safetensors`` +
  ``model.safetensors.index.json``), plus the tokenizer files when a ``spiece.model`` is given.

Nothing builds a model: each tensor is drawn from its own seeded generator (seed, component, key), written,
and dropped, so memory stays at one tensor (the largest is T5's 526 MB embedding). Values are random but
never degenerate: where Open-Sora zero-initialises (the temporal blocks' output projections, the fps
embedder's second linear, the final linear) they are small and non-zero; the adaLN tables and ``t_block``
follow Open-Sora's own small inits; norm weights are near 1; embeddings N(0, 1); other weights
N(0, 1/sqrt(fan_in)) (T5's query 1/sqrt(fan_in * d_kv), as T5 has no attention scaling), so activations stay
O(1) through all layers (checked at the real depths and at T5's real width). ``.bin`` shards are torch.save's zip format, written record by record through
torch's own zip writer (``torch.load(..., weights_only=True, mmap=True)`` reads them).

Each directory is built under a temporary name and renamed, with a ``.blockrt-random.json`` marker (seed,
size, file sizes): a complete one is reused, so the writer doubles as a benchmark cache; a directory without
the marker (real weights) is never touched.

Example:
    >>> write_random_checkpoints("weights/random", which=("stdit3", "vae", "t5"), seed=0)      # ~25 GB
    >>> write_random_checkpoints(tmp, size="tiny", t5_format="safetensors")                  # tests, seconds
    >>> checkpoint_plan(("t5",))[:1]  # [(file, key, shape, dtype), ...] without writing anything
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from blockrt.files import replace_dir
from blockrt.pipelines.opensora.tensor_files import write_safetensors, write_torch_bin

log = logging.getLogger(__name__)

if sys.byteorder != "little":  # pragma: no cover  (the raw tensor bytes written are the machine's)
    raise ImportError("checkpoints.py writes little-endian files and needs a little-endian machine")

COMPONENTS = ("stdit3", "vae", "t5")
DIRECTORIES = {"stdit3": "OpenSora-STDiT-v3", "vae": "OpenSora-VAE-v1.2", "t5": "t5-v1_1-xxl"}
SIZES = ("full", "tiny")
T5_FORMATS = ("bin", "safetensors")
MARKER = ".blockrt-random.json"
MARKER_FORMAT = "blockrt-random-checkpoint"
GENERATOR_VERSION = 1  # bump when the values drawn for a (seed, key) change: old caches are then rewritten
TOKENIZER_FILES = ("spiece.model", "special_tokens_map.json", "tokenizer_config.json")

# transformers 4.21's shard_checkpoint("10GB"), which cut the real T5 .bin files: decimal bytes, every
# state-dict entry counted (the tied embedding twice), a new shard when the next tensor would pass the limit.
HF_MAX_SHARD_BYTES = 10 * 10**9
XXL_COUNTED_BYTES = 19_575_627_776  # the real index's metadata.total_size (both embedding names counted)

_NORM_STD = 0.02  # norm weights ~ N(1, 0.02); biases ~ N(0, 0.02)
_SMALL_GAIN = 0.25  # tensors Open-Sora zero-initialises: small, but every path still contributes
_REL_BIAS_STD = 0.5  # T5 relative position bias, added to O(1) attention logits

# config.json of hpcai-tech/OpenSora-STDiT-v3 (the kernel switches are false there; inference turns them on).
STDIT3_CONFIG_JSON: dict[str, Any] = {
    "architectures": ["STDiT3"],
    "caption_channels": 4096,
    "class_dropout_prob": 0.1,
    "depth": 28,
    "drop_path": 0.0,
    "enable_flash_attn": False,
    "enable_layernorm_kernel": False,
    "enable_sequence_parallelism": False,
    "freeze_y_embedder": True,
    "hidden_size": 1152,
    "in_channels": 4,
    "input_size": [None, None, None],
    "input_sq_size": 512,
    "mlp_ratio": 4.0,
    "model_max_length": 300,
    "model_type": "STDiT3",
    "num_heads": 16,
    "only_train_temporal": False,
    "patch_size": [1, 2, 2],
    "pred_sigma": True,
    "qk_norm": True,
    "skip_y_embedder": False,
    "torch_dtype": "float32",
    "transformers_version": "4.36.2",
}
STDIT3_TINY = dict(depth=2, hidden_size=64, num_heads=4, caption_channels=64)  # caption = tiny T5's d_model

VAE_SHIFT = (-0.10, 0.34, 0.27, 0.98)
VAE_SCALE = (3.85, 2.32, 2.33, 3.06)
# config.json of hpcai-tech/OpenSora-VAE-v1.2: no architecture fields (the spatial VAE's come from the PixArt
# repo's vae/config.json, the temporal VAE's from the VAE_Temporal_SD registry entry).
VAE_CONFIG_JSON: dict[str, Any] = {
    "architectures": ["VideoAutoencoderPipeline"],
    "cal_loss": False,
    "freeze_vae_2d": False,
    "from_pretrained": None,
    "micro_frame_size": 17,
    "model_type": "VideoAutoencoderPipeline",
    "scale": list(VAE_SCALE),
    "shift": list(VAE_SHIFT),
    "torch_dtype": "float32",
    "transformers_version": "4.36.2",
    "vae_2d": {"from_pretrained": "PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers", "local_files_only": False,
               "micro_batch_size": 4, "subfolder": "vae", "type": "VideoAutoencoderKL"},
    "vae_temporal": {"from_pretrained": None, "type": "VAE_Temporal_SD"},
}
# PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers vae/config.json (diffusers AutoencoderKL arguments).
SDXL_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
    "act_fn": "silu", "latent_channels": 4, "norm_num_groups": 32, "sample_size": 1024, "scaling_factor": 0.13025,
    "force_upcast": True,
}
TEMPORAL_VAE_CONFIG: dict[str, Any] = {
    "in_out_channels": 4, "latent_embed_dim": 4, "embed_dim": 4, "filters": 128, "num_res_blocks": 4,
    "channel_multipliers": [1, 2, 2, 4], "temporal_downsample": [False, True, True], "num_groups": 32,
}
VAE_TINY_SPATIAL = {"block_out_channels": [8, 16, 32, 32], "norm_num_groups": 4}
VAE_TINY_TEMPORAL = {"filters": 8, "num_groups": 4}
# Where a small VAE's config.json records its sizes (the real file has none; loaders default to the real ones).
VAE_ARCH_KEY = "blockrt_architecture"


# -- what to write ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a checkpoint file and how its random values are drawn.

    ``init``: ``("normal", mean, std)``, ``("values", [v, ...])`` (exact, e.g. the VAE's scale), or
    ``("rope", dim)`` (RoPE's frequency constant). ``storage``: the key whose data this tensor shares (a tied
    weight saved under two names), else None.
    """

    key: str
    shape: tuple[int, ...]
    dtype: str
    init: tuple
    storage: str | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * getattr(torch, self.dtype).itemsize


@dataclass(frozen=True)
class FileSpec:
    """One weight file: its name in the directory, ``"safetensors"`` or ``"torch"`` (a .bin pickle), tensors."""

    name: str
    format: str
    tensors: tuple[TensorEntry, ...]


@dataclass(frozen=True)
class CheckpointSpec:
    """A whole checkpoint directory: JSON files (name -> content) and weight files."""

    component: str
    directory: str
    json_files: dict[str, Any]
    files: tuple[FileSpec, ...]


class PlannedTensor(NamedTuple):
    """One tensor the writer would write: file path relative to the root, key, shape, dtype."""

    file: str
    key: str
    shape: tuple[int, ...]
    dtype: str


def _normal(mean: float, std: float) -> tuple:
    return ("normal", float(mean), float(std))


def _fan_in(shape: Sequence[int]) -> int:
    return max(1, math.prod(shape[1:]))


def _generic_init(key: str, shape: tuple[int, ...]) -> tuple:
    if key.endswith(".bias"):
        return _normal(0.0, _NORM_STD)
    if len(shape) == 1:  # every 1-D weight in these models is a norm's (RMSNorm, GroupNorm)
        return _normal(1.0, _NORM_STD)
    return _normal(0.0, 1.0 / math.sqrt(_fan_in(shape)))


def _entries(pairs: Iterable[tuple[str, tuple[int, ...]]], rule: Callable[[str, tuple[int, ...]], tuple]) -> list[TensorEntry]:
    return [TensorEntry(k, tuple(s), "float32", rule(k, tuple(s))) for k, s in pairs]


# STDiT3 ----------------------------------------------------------------------------------------------------


def stdit3_config_json(size: str = "full", **overrides: Any) -> dict[str, Any]:
    """``config.json`` of OpenSora-STDiT-v3 (``size="tiny"``: 2+2 blocks of width 64) with ``overrides``."""
    _check_size(size)
    d = {**STDIT3_CONFIG_JSON, **(STDIT3_TINY if size == "tiny" else {}), **overrides}
    unknown = set(d) - set(STDIT3_CONFIG_JSON)
    if unknown:
        raise ValueError(f"unknown STDiT3 config fields {sorted(unknown)}; known: {sorted(STDIT3_CONFIG_JSON)}")
    return d


def stdit3_keys(cfg: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """Every state-dict key and shape of STDiT3 for a config.json dict, in module order (spec §1.5)."""
    C, heads = int(cfg["hidden_size"]), int(cfg["num_heads"])
    pt, ph, pw = (int(p) for p in cfg["patch_size"])
    cin, cap, L = int(cfg["in_channels"]), int(cfg["caption_channels"]), int(cfg["model_max_length"])
    cout = 2 * cin if cfg["pred_sigma"] else cin
    hidden, hd = int(C * float(cfg["mlp_ratio"])), C // heads
    keys: list[tuple[str, tuple[int, ...]]] = [
        ("rope.freqs", (hd // 2,)),
        ("x_embedder.proj.weight", (C, cin, pt, ph, pw)), ("x_embedder.proj.bias", (C,)),
    ]
    for emb in ("t_embedder", "fps_embedder"):
        keys += [(f"{emb}.mlp.0.weight", (C, 256)), (f"{emb}.mlp.0.bias", (C,)),
                 (f"{emb}.mlp.2.weight", (C, C)), (f"{emb}.mlp.2.bias", (C,))]
    keys += [("t_block.1.weight", (6 * C, C)), ("t_block.1.bias", (6 * C,)),
             ("y_embedder.y_embedding", (L, cap)),
             ("y_embedder.y_proj.fc1.weight", (C, cap)), ("y_embedder.y_proj.fc1.bias", (C,)),
             ("y_embedder.y_proj.fc2.weight", (C, C)), ("y_embedder.y_proj.fc2.bias", (C,))]
    for kind in ("spatial_blocks", "temporal_blocks"):
        for i in range(int(cfg["depth"])):
            p = f"{kind}.{i}"
            keys += [(f"{p}.scale_shift_table", (6, C)),
                     (f"{p}.attn.qkv.weight", (3 * C, C)), (f"{p}.attn.qkv.bias", (3 * C,))]
            if cfg["qk_norm"]:
                keys += [(f"{p}.attn.q_norm.weight", (hd,)), (f"{p}.attn.k_norm.weight", (hd,))]
            keys += [(f"{p}.attn.proj.weight", (C, C)), (f"{p}.attn.proj.bias", (C,)),
                     (f"{p}.cross_attn.q_linear.weight", (C, C)), (f"{p}.cross_attn.q_linear.bias", (C,)),
                     (f"{p}.cross_attn.kv_linear.weight", (2 * C, C)), (f"{p}.cross_attn.kv_linear.bias", (2 * C,)),
                     (f"{p}.cross_attn.proj.weight", (C, C)), (f"{p}.cross_attn.proj.bias", (C,)),
                     (f"{p}.mlp.fc1.weight", (hidden, C)), (f"{p}.mlp.fc1.bias", (hidden,)),
                     (f"{p}.mlp.fc2.weight", (C, hidden)), (f"{p}.mlp.fc2.bias", (C,))]
    keys += [("final_layer.scale_shift_table", (2, C)),
             ("final_layer.linear.weight", (pt * ph * pw * cout, C)), ("final_layer.linear.bias", (pt * ph * pw * cout,))]
    return keys


def _stdit3_rule(cfg: dict[str, Any]) -> Callable[[str, tuple[int, ...]], tuple]:
    C = int(cfg["hidden_size"])
    # Open-Sora zero-initialises these (temporal blocks start as identities); here: small, not zero.
    small = ("fps_embedder.mlp.2.weight", "final_layer.linear.weight")
    small_temporal = (".attn.proj.weight", ".cross_attn.proj.weight", ".mlp.fc2.weight")

    def rule(key: str, shape: tuple[int, ...]) -> tuple:
        if key == "rope.freqs":
            return ("rope", 2 * shape[0])
        if key == "y_embedder.y_embedding":  # the null caption stands in for T5 outputs, which are O(1)
            return _normal(0.0, 1.0)
        if key.endswith("scale_shift_table"):  # Open-Sora's own init: randn / sqrt(hidden)
            return _normal(0.0, 1.0 / math.sqrt(C))
        if key == "t_block.1.weight":  # Open-Sora's own init: N(0, 0.02)
            return _normal(0.0, 0.02)
        if key in small or (key.startswith("temporal_blocks.") and key.endswith(small_temporal)):
            return _normal(0.0, _SMALL_GAIN / math.sqrt(_fan_in(shape)))
        return _generic_init(key, shape)

    return rule


def stdit3_spec(size: str = "full", **overrides: Any) -> CheckpointSpec:
    """What ``OpenSora-STDiT-v3/`` holds: config.json and the single ``model.safetensors``."""
    cfg = stdit3_config_json(size, **overrides)
    tensors = _entries(stdit3_keys(cfg), _stdit3_rule(cfg))
    return CheckpointSpec("stdit3", DIRECTORIES["stdit3"], {"config.json": cfg},
                          (FileSpec("model.safetensors", "safetensors", tuple(tensors)),))


# VAE -------------------------------------------------------------------------------------------------------


def vae_architecture(size: str = "full", spatial: dict[str, Any] | None = None,
                     temporal: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(spatial AutoencoderKL config, temporal VAE config)`` for a size, with field overrides."""
    _check_size(size)
    tiny = size == "tiny"
    s = {**SDXL_VAE_CONFIG, **(VAE_TINY_SPATIAL if tiny else {}), **(spatial or {})}
    t = {**TEMPORAL_VAE_CONFIG, **(VAE_TINY_TEMPORAL if tiny else {}), **(temporal or {})}
    for name, d, known in (("spatial", s, SDXL_VAE_CONFIG), ("temporal", t, TEMPORAL_VAE_CONFIG)):
        unknown = set(d) - set(known)
        if unknown:
            raise ValueError(f"unknown {name} VAE config fields {sorted(unknown)}; known: {sorted(known)}")
    return s, t


def vae_config_json(size: str = "full", spatial: dict[str, Any] | None = None,
                    temporal: dict[str, Any] | None = None) -> dict[str, Any]:
    """``config.json`` of OpenSora-VAE-v1.2; other sizes also record their architecture under ``blockrt_architecture``."""
    d = json.loads(json.dumps(VAE_CONFIG_JSON))
    s, t = vae_architecture(size, spatial, temporal)
    if (s, t) != (SDXL_VAE_CONFIG, TEMPORAL_VAE_CONFIG):
        d[VAE_ARCH_KEY] = {"spatial": s, "temporal": t}
    return d


def spatial_vae_keys(config: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """diffusers ``AutoencoderKL``'s state-dict keys and shapes for ``config`` (built on the meta device)."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        model = AutoencoderKL(**config)
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def temporal_vae_keys(cfg: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """``VAE_Temporal_SD``'s state-dict keys and shapes (spec §2.2), in module order."""
    f0, mult, n_res = int(cfg["filters"]), [int(m) for m in cfg["channel_multipliers"]], int(cfg["num_res_blocks"])
    down = [bool(d) for d in cfg["temporal_downsample"]]
    cio, lat, emb = int(cfg["in_out_channels"]), int(cfg["latent_embed_dim"]), int(cfg["embed_dim"])
    k3 = (3, 3, 3)
    k1 = (1, 1, 1)

    def res(p: str, cin: int, c: int) -> list[tuple[str, tuple[int, ...]]]:
        out = [(f"{p}.norm1.weight", (cin,)), (f"{p}.norm1.bias", (cin,)), (f"{p}.conv1.conv.weight", (c, cin, *k3)),
               (f"{p}.norm2.weight", (c,)), (f"{p}.norm2.bias", (c,)), (f"{p}.conv2.conv.weight", (c, c, *k3))]
        return out + ([(f"{p}.conv3.conv.weight", (c, cin, *k1))] if cin != c else [])

    keys: list[tuple[str, tuple[int, ...]]] = [("encoder.conv_in.conv.weight", (f0, cio, *k3))]
    convs: list[tuple[str, tuple[int, ...]]] = []
    prev = f0
    for i, m in enumerate(mult):
        c = f0 * m
        for j in range(n_res):
            keys += res(f"encoder.block_res_blocks.{i}.{j}", prev, c)
            prev = c
        if i < len(mult) - 1 and down[i]:
            convs += [(f"encoder.conv_blocks.{i}.conv.weight", (c, c, *k3)), (f"encoder.conv_blocks.{i}.conv.bias", (c,))]
    keys += convs
    for j in range(n_res):
        keys += res(f"encoder.res_blocks.{j}", prev, prev)
    keys += [("encoder.norm1.weight", (prev,)), ("encoder.norm1.bias", (prev,)),
             ("encoder.conv2.conv.weight", (2 * lat, prev, *k1)), ("encoder.conv2.conv.bias", (2 * lat,)),
             ("quant_conv.conv.weight", (2 * emb, 2 * lat, *k1)), ("quant_conv.conv.bias", (2 * emb,)),
             ("post_quant_conv.conv.weight", (lat, emb, *k1)), ("post_quant_conv.conv.bias", (lat,))]
    top = f0 * mult[-1]
    keys += [("decoder.conv1.conv.weight", (top, lat, *k3)), ("decoder.conv1.conv.bias", (top,))]
    for j in range(n_res):
        keys += res(f"decoder.res_blocks.{j}", top, top)
    stages: dict[int, list[tuple[str, tuple[int, ...]]]] = {}
    dconvs: dict[int, list[tuple[str, tuple[int, ...]]]] = {}
    prev = top
    for i in reversed(range(len(mult))):
        c = f0 * mult[i]
        stages[i] = []
        for j in range(n_res):
            stages[i] += res(f"decoder.block_res_blocks.{i}.{j}", prev, c)
            prev = c
        if i > 0 and down[i - 1]:
            dconvs[i - 1] = [(f"decoder.conv_blocks.{i - 1}.conv.weight", (2 * c, c, *k3)),
                             (f"decoder.conv_blocks.{i - 1}.conv.bias", (2 * c,))]
    for i in range(len(mult)):  # ModuleLists hold stage 0 first
        keys += stages[i]
    for i in sorted(dconvs):
        keys += dconvs[i]
    keys += [("decoder.norm1.weight", (f0 * mult[0],)), ("decoder.norm1.bias", (f0 * mult[0],)),
             ("decoder.conv_out.conv.weight", (cio, f0 * mult[0], *k3)), ("decoder.conv_out.conv.bias", (cio,))]
    return keys


def vae_spec(size: str = "full", spatial: dict[str, Any] | None = None,
             temporal: dict[str, Any] | None = None) -> CheckpointSpec:
    """What ``OpenSora-VAE-v1.2/`` holds: config.json and ``model.safetensors`` (spatial, temporal, scale, shift).

    ``spatial`` / ``temporal``: overrides of the AutoencoderKL / temporal VAE config fields.
    """
    config_json = vae_config_json(size, spatial, temporal)
    spatial, temporal = vae_architecture(size, spatial, temporal)
    pairs = [(f"spatial_vae.module.{k}", s) for k, s in spatial_vae_keys(spatial)]
    pairs += [(f"temporal_vae.{k}", s) for k, s in temporal_vae_keys(temporal)]
    tensors = _entries(pairs, _generic_init)
    c = int(temporal["embed_dim"])
    if c != len(VAE_SCALE):
        raise ValueError(f"the VAE's scale/shift have {len(VAE_SCALE)} channels, the config has embed_dim {c}")
    tensors += [TensorEntry("scale", (1, c, 1, 1, 1), "float32", ("values", list(VAE_SCALE))),
                TensorEntry("shift", (1, c, 1, 1, 1), "float32", ("values", list(VAE_SHIFT)))]
    return CheckpointSpec("vae", DIRECTORIES["vae"], {"config.json": config_json},
                          (FileSpec("model.safetensors", "safetensors", tuple(tensors)),))


# T5 --------------------------------------------------------------------------------------------------------


def t5_keys(config: Any) -> list[tuple[str, tuple[int, ...]]]:
    """``T5EncoderModel``'s state-dict keys and shapes (both names of the tied embedding), built on meta."""
    from transformers import T5EncoderModel

    with torch.device("meta"):
        model = T5EncoderModel(config)
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def _t5_rule(config: Any) -> Callable[[str, tuple[int, ...]], tuple]:
    def rule(key: str, shape: tuple[int, ...]) -> tuple:
        if key in ("shared.weight", "encoder.embed_tokens.weight"):
            return _normal(0.0, 1.0)
        if key.endswith("relative_attention_bias.weight"):
            return _normal(0.0, _REL_BIAS_STD)
        if key.endswith("SelfAttention.q.weight"):  # T5 does not scale q.k by 1/sqrt(d_kv): the init does
            return _normal(0.0, 1.0 / math.sqrt(_fan_in(shape) * config.d_kv))
        return _generic_init(key, shape)

    return rule


def hf_shards(entries: Sequence[TensorEntry], max_shard_bytes: int) -> list[list[TensorEntry]]:
    """transformers 4.21's ``shard_checkpoint``: in state-dict order, start a new shard when the next tensor
    would pass ``max_shard_bytes``; every entry counts, tied names included."""
    shards: list[list[TensorEntry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def t5_spec(size: str = "full", fmt: str = "bin", **overrides: Any) -> CheckpointSpec:
    """What ``t5-v1_1-xxl/`` holds: config.json, two shards (``fmt`` "bin" or "safetensors") and their index.

    The split is the real one (transformers 4.21, 10 GB): shard 1 ends inside block 11 after ``wi_0``. Other
    sizes scale the limit by the same ratio, so they split at about the same relative place. ``overrides``:
    config.json fields (e.g. ``num_layers=24``).
    """
    from blockrt.pipelines.opensora.t5 import TINY_SIZES, _config, t5_config_json

    _check_size(size)
    if fmt not in T5_FORMATS:
        raise ValueError(f"t5_format must be one of {T5_FORMATS}, got {fmt!r}")
    cfg_json = t5_config_json(**{**(TINY_SIZES if size == "tiny" else {}), **overrides})
    config = _config(cfg_json)
    entries = _entries(t5_keys(config), _t5_rule(config))
    # The tied embedding: one storage saved under both names, as torch.save stores a tied state dict.
    entries = [TensorEntry(e.key, e.shape, e.dtype, e.init, "shared.weight") if e.key == "encoder.embed_tokens.weight"
               else e for e in entries]
    counted = sum(e.nbytes for e in entries)
    limit = HF_MAX_SHARD_BYTES if counted == XXL_COUNTED_BYTES else max(1, counted * HF_MAX_SHARD_BYTES // XXL_COUNTED_BYTES)
    shards = hf_shards(entries, limit)
    n = len(shards)
    if fmt == "bin":
        names = [f"pytorch_model-{i + 1:05d}-of-{n:05d}.bin" for i in range(n)]
        files = tuple(FileSpec(name, "torch", tuple(s)) for name, s in zip(names, shards))
        index_name = "pytorch_model.bin.index.json"
    else:  # the safetensors conversion stores a tied tensor once, under its owner's name
        names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        files = tuple(FileSpec(name, "safetensors", tuple(e for e in s if e.storage is None)) for name, s in zip(names, shards))
        index_name = "model.safetensors.index.json"
    index = {"metadata": {"total_size": counted},
             "weight_map": {e.key: f.name for f in files for e in f.tensors}}
    json_files: dict[str, Any] = {"config.json": cfg_json, index_name: index}
    return CheckpointSpec("t5", DIRECTORIES["t5"], json_files, files)


def component_spec(component: str, size: str = "full", t5_format: str = "bin",
                   overrides: dict[str, Any] | None = None) -> CheckpointSpec:
    """The spec of one component ("stdit3", "vae" or "t5"); ``overrides``: its config fields (for the VAE:
    ``{"spatial": {...}, "temporal": {...}}``)."""
    o = dict(overrides or {})
    if component == "stdit3":
        return stdit3_spec(size, **o)
    if component == "vae":
        unknown = set(o) - {"spatial", "temporal"}
        if unknown:
            raise ValueError(f"VAE overrides take 'spatial' and 'temporal' dicts, got {sorted(unknown)}")
        return vae_spec(size, o.get("spatial"), o.get("temporal"))
    if component == "t5":
        return t5_spec(size, t5_format, **o)
    raise ValueError(f"unknown component {component!r}; expected one of {COMPONENTS}")


def checkpoint_plan(which: Sequence[str] = COMPONENTS, *, size: str = "full", t5_format: str = "bin",
                    overrides: dict[str, dict[str, Any]] | None = None) -> list[PlannedTensor]:
    """Every (file, key, shape, dtype) ``write_random_checkpoints`` would write, without writing anything."""
    out = []
    for comp in _which(which):
        spec = component_spec(comp, size, t5_format, (overrides or {}).get(comp))
        out += [PlannedTensor(f"{spec.directory}/{f.name}", e.key, e.shape, e.dtype) for f in spec.files for e in f.tensors]
    return out


# -- drawing values ---------------------------------------------------------------------------------------


def _seed_for(seed: int, component: str, key: str) -> int:
    h = hashlib.sha256(f"{GENERATOR_VERSION}:{seed}:{component}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def random_tensor(component: str, entry: TensorEntry, seed: int) -> torch.Tensor:
    """The values of one tensor: a function of (seed, component, key) only, whatever else is written."""
    kind = entry.init[0]
    dtype = getattr(torch, entry.dtype)
    if kind == "values":
        return torch.tensor(entry.init[1], dtype=dtype).reshape(entry.shape)
    if kind == "rope":  # rotary_embedding_torch 0.5.3: 1 / 10000^(2i/dim)
        dim = entry.init[1]
        return (1.0 / (10000 ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))).to(dtype).reshape(entry.shape)
    if kind == "normal":
        _, mean, std = entry.init
        g = torch.Generator().manual_seed(_seed_for(seed, component, entry.key))
        t = torch.randn(entry.shape, generator=g, dtype=torch.float32).mul_(std)
        if mean:
            t.add_(mean)
        return t.to(dtype)
    raise ValueError(f"unknown init {entry.init!r} for {entry.key}")


# -- writing a directory ----------------------------------------------------------------------------------


def _check_size(size: str) -> None:
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")


def _which(which: Sequence[str] | str) -> list[str]:
    items = [which] if isinstance(which, str) else list(which)
    bad = [w for w in items if w not in COMPONENTS]
    if bad or not items:
        raise ValueError(f"which must name components among {COMPONENTS}, got {which!r}")
    return items


def _write_json(path: Path, content: Any, index: bool) -> None:
    # transformers writes indexes with indent 2 and sorted keys, configs with indent 2 (+ newline)
    path.write_text(json.dumps(content, indent=2, sort_keys=index) + "\n")


def _tokenizer_files(tokenizer: str | Path | None) -> dict[str, Path]:
    if tokenizer is None:
        return {}
    t = Path(tokenizer)
    d = t.parent if t.name == "spiece.model" else t
    if not (d / "spiece.model").is_file():
        raise FileNotFoundError(f"tokenizer= must be a spiece.model or a directory holding one; {d} has none")
    return {name: d / name for name in TOKENIZER_FILES if (d / name).is_file()}


def _marker(spec: CheckpointSpec, seed: int, size: str, variant: str, files: dict[str, int]) -> dict[str, Any]:
    return {"format": MARKER_FORMAT, "generator_version": GENERATOR_VERSION, "component": spec.component,
            "seed": seed, "size": size, "variant": variant, "files": files}


def _complete(directory: Path, expect: dict[str, Any], json_files: dict[str, Any]) -> bool | None:
    """True: a complete random checkpoint as asked; False: ours but other (or damaged); None: not ours.

    The sizes, overrides and sharding asked for are those of the JSON files (config, index): compared by content.
    """
    marker = directory / MARKER
    if not marker.is_file():
        return None
    try:
        m = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return False
    if m.get("format") != MARKER_FORMAT:
        return None
    same = all(m.get(k) == expect[k] for k in ("generator_version", "component", "seed", "size", "variant"))
    if not same or not isinstance(m.get("files"), dict):
        return False
    for name, size in m["files"].items():
        p = directory / name
        if not p.is_file() or p.stat().st_size != size:
            return False
    for name, content in json_files.items():
        try:
            if json.loads((directory / name).read_text()) != json.loads(json.dumps(content)):
                return False
        except (OSError, json.JSONDecodeError):
            return False
    return set(m["files"]) >= set(expect["files"])


def write_checkpoint(root: str | Path, spec: CheckpointSpec, *, seed: int = 0, size: str = "full",
                     tokenizer: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write one checkpoint directory ``root/spec.directory`` atomically (skipped when already complete)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / spec.directory
    tok_files = _tokenizer_files(tokenizer) if spec.component == "t5" else {}
    tok_id = ",".join(f"{n}:{hashlib.sha256(p.read_bytes()).hexdigest()[:16]}" for n, p in sorted(tok_files.items()))
    variant = "+".join([f.format for f in spec.files[:1]] + ([f"tokenizer({tok_id})"] if tok_files else []))
    expect_files = {f.name: 0 for f in spec.files} | {n: 0 for n in spec.json_files} | {n: 0 for n in tok_files}
    expect = _marker(spec, seed, size, variant, expect_files)
    if final.exists():
        state = _complete(final, expect, spec.json_files)
        if state is True:
            log.info("random checkpoint %s is complete (seed %d, %s): reused", final, seed, size)
            return final
        if state is None:
            raise FileExistsError(f"{final} exists and is not a random checkpoint written by blockrt (no {MARKER}); "
                                  "refusing to touch it; fix: choose another root")
        if not overwrite:
            raise FileExistsError(f"{final} holds a random checkpoint with other parameters or damaged files "
                                  f"(asked: seed {seed}, size {size!r}, {variant}); fix: pass overwrite=True or another root")
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{spec.directory}-", dir=root))
    try:
        sizes: dict[str, int] = {}
        for name, content in spec.json_files.items():
            _write_json(tmp / name, content, index=name.endswith(".index.json"))
        for name, src in tok_files.items():
            shutil.copyfile(src, tmp / name)
        for f in spec.files:
            by_key = {e.key: e for e in f.tensors}

            def produce(key: str, by_key: dict[str, TensorEntry] = by_key) -> torch.Tensor:
                return random_tensor(spec.component, by_key[key], seed)

            log.info("writing %s/%s (%d tensors, %.2f GB)", final, f.name, len(f.tensors),
                     sum(e.nbytes for e in f.tensors if e.storage is None) / 1e9)
            if f.format == "safetensors":
                write_safetensors(tmp / f.name, [(e.key, e.shape, e.dtype) for e in f.tensors], produce)
            else:
                write_torch_bin(tmp / f.name, [(e.key, e.shape, e.dtype, e.storage) for e in f.tensors], produce)
        for p in tmp.iterdir():
            sizes[p.name] = p.stat().st_size
        (tmp / MARKER).write_text(json.dumps(_marker(spec, seed, size, variant, sizes), indent=2) + "\n")
        os.chmod(tmp, 0o755)
        try:
            replace_dir(tmp, final)  # over an existing one of ours: other parameters, overwrite=True
        except OSError:
            if _complete(final, expect, spec.json_files) is not True:  # another writer finished first: fine
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def write_random_checkpoints(root: str | Path, which: Sequence[str] = COMPONENTS, seed: int = 0, *,
                             size: str = "full", t5_format: str = "bin", tokenizer: str | Path | None = None,
                             overrides: dict[str, dict[str, Any]] | None = None, overwrite: bool = False,
                             dry_run: bool = False) -> dict[str, Path] | list[PlannedTensor]:
    """Write random-weight checkpoints of Open-Sora v1.2's components in the real layout under ``root``.

    Args:
        root: parent directory; each component goes to its real directory name (``OpenSora-STDiT-v3``,
            ``OpenSora-VAE-v1.2``, ``t5-v1_1-xxl``).
        which: components among ``("stdit3", "vae", "t5")``.
        seed: every tensor's values depend on (seed, component, key) only.
        size: ``"full"`` (the real sizes: 4.8 + 1.6 + 19.1 GB) or ``"tiny"`` (same layout, test sizes).
        t5_format: ``"bin"`` (the real repo's pickles) or ``"safetensors"`` (the hub's ``refs/pr/3`` layout).
        tokenizer: a ``spiece.model`` (or its directory, with its JSON files) to copy into the T5 directory.
        overrides: per component, config fields replacing the size's (``{"t5": {"num_layers": 24}}``,
            ``{"vae": {"temporal": {"filters": 32}}}``); recorded in config.json, so loaders build the same.
        overwrite: replace a random checkpoint written with other parameters (never a directory without
            the marker, such as real weights).
        dry_run: return the ``checkpoint_plan`` instead of writing.

    Returns:
        ``{component: directory}``, or with ``dry_run`` the list of ``(file, key, shape, dtype)``.

    Example:
        >>> write_random_checkpoints("weights/random", which=("stdit3",), seed=0)
        {'stdit3': PosixPath('weights/random/OpenSora-STDiT-v3')}
    """
    comps = _which(which)
    _check_size(size)
    unknown = set(overrides or {}) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"overrides name unknown components {sorted(unknown)}; expected among {COMPONENTS}")
    if dry_run:
        return checkpoint_plan(comps, size=size, t5_format=t5_format, overrides=overrides)
    out = {}
    for comp in comps:
        spec = component_spec(comp, size, t5_format, (overrides or {}).get(comp))
        out[comp] = write_checkpoint(root, spec, seed=seed, size=size, tokenizer=tokenizer, overwrite=overwrite)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m blockrt.pipelines.opensora.checkpoints ROOT [--which stdit3,vae,t5] [--seed 0] [--size full]``."""
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root")
    ap.add_argument("--which", default=",".join(COMPONENTS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", choices=SIZES, default="full")
    ap.add_argument("--t5-format", choices=T5_FORMATS, default="bin")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = write_random_checkpoints(args.root, args.which.split(","), args.seed, size=args.size,
                                   t5_format=args.t5_format, tokenizer=args.tokenizer, overwrite=args.overwrite)
    for comp, path in out.items():  # type: ignore[union-attr]
        print(f"{comp}: {path}")


if __name__ == "__main__":
    main()
