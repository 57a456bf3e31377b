"""What Open-Sora v1.2's real checkpoints look like: directory names, ``config.json`` contents, file names,
sharding, index files, and every tensor's key, shape and dtype, at the real sizes and at tiny test sizes.

- ``OpenSora-STDiT-v3/``: ``config.json`` + ``model.safetensors`` (973 fp32 tensors, 4.8 GB);
- ``OpenSora-VAE-v1.2/``: ``config.json`` + ``model.safetensors`` (517 tensors, 1.6 GB, with the real
  ``scale``/``shift``);
- ``t5-v1_1-xxl/``: ``config.json`` + ``pytorch_model-0000{1,2}-of-00002.bin`` + ``pytorch_model.bin.index.json``
  (fp32 pickles, 19 GB, split where transformers 4.21 split the real ones: 9.45 + 9.60 GB), or the
  safetensors conversion of the hub's ``refs/pr/3`` (``model-0000{1,2}-of-00002.safetensors`` +
  ``model.safetensors.index.json``), plus the tokenizer files.

A description only: nothing here reads or writes weights. The loaders (``loading.py``) read the config fields
named here; ``random_weights.py`` writes random values in this layout.

Example:
    >>> checkpoint_plan(("t5",))[:1]  # [(file, key, shape, dtype), ...] of the 19 GB, nothing written
    >>> t5_spec("full", "bin").files[0].name
    'pytorch_model-00001-of-00002.bin'
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

COMPONENTS = ("stdit3", "vae", "t5")
DIRECTORIES = {"stdit3": "OpenSora-STDiT-v3", "vae": "OpenSora-VAE-v1.2", "t5": "t5-v1_1-xxl"}
SIZES = ("full", "tiny")
T5_FORMATS = ("bin", "safetensors")

# transformers 4.21's shard_checkpoint("10GB"), which cut the real T5 .bin files: decimal bytes, every
# state-dict entry counted (the tied embedding twice), a new shard when the next tensor would pass the limit.
HF_MAX_SHARD_BYTES = 10 * 10**9
XXL_COUNTED_BYTES = 19_575_627_776  # the real index's metadata.total_size (both embedding names counted)

# config.json of hpcai-tech/OpenSora-STDiT-v3 (the kernel switches are false there; inference turns them on).
STDIT3_CONFIG_JSON: dict[str, Any] = {
    "architectures": ["STDiT3"], "caption_channels": 4096, "class_dropout_prob": 0.1, "depth": 28, "drop_path": 0.0,
    "enable_flash_attn": False, "enable_layernorm_kernel": False, "enable_sequence_parallelism": False,
    "freeze_y_embedder": True, "hidden_size": 1152, "in_channels": 4, "input_size": [None, None, None],
    "input_sq_size": 512, "mlp_ratio": 4.0, "model_max_length": 300, "model_type": "STDiT3", "num_heads": 16,
    "only_train_temporal": False, "patch_size": [1, 2, 2], "pred_sigma": True, "qk_norm": True,
    "skip_y_embedder": False, "torch_dtype": "float32", "transformers_version": "4.36.2",
}
STDIT3_TINY = dict(depth=2, hidden_size=64, num_heads=4, caption_channels=64)  # caption = tiny T5's d_model

VAE_SHIFT = (-0.10, 0.34, 0.27, 0.98)
VAE_SCALE = (3.85, 2.32, 2.33, 3.06)
# config.json of hpcai-tech/OpenSora-VAE-v1.2: no architecture fields (the spatial VAE's come from the PixArt
# repo's vae/config.json, the temporal VAE's from the VAE_Temporal_SD registry entry).
VAE_CONFIG_JSON: dict[str, Any] = {
    "architectures": ["VideoAutoencoderPipeline"], "cal_loss": False, "freeze_vae_2d": False, "from_pretrained": None,
    "micro_frame_size": 17, "model_type": "VideoAutoencoderPipeline", "scale": list(VAE_SCALE),
    "shift": list(VAE_SHIFT), "torch_dtype": "float32", "transformers_version": "4.36.2",
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


# -- the description ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a checkpoint file. ``storage``: the key whose data this tensor shares (a tied weight saved
    under two names), else None."""

    key: str
    shape: tuple[int, ...]
    dtype: str
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
    """One tensor of the layout: file path relative to the weights root, key, shape, dtype."""

    file: str
    key: str
    shape: tuple[int, ...]
    dtype: str


def _tensors(pairs: Iterable[tuple[str, tuple[int, ...]]]) -> list[TensorEntry]:
    return [TensorEntry(k, tuple(s), "float32") for k, s in pairs]


def check_size(size: str) -> None:
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")


def check_components(which: Sequence[str] | str) -> list[str]:
    """``which`` as a list of component names, each among ``COMPONENTS``."""
    items = [which] if isinstance(which, str) else list(which)
    bad = [w for w in items if w not in COMPONENTS]
    if bad or not items:
        raise ValueError(f"which must name components among {COMPONENTS}, got {which!r}")
    return items


# STDiT3 ----------------------------------------------------------------------------------------------------


def stdit3_config_json(size: str = "full", **overrides: Any) -> dict[str, Any]:
    """``config.json`` of OpenSora-STDiT-v3 (``size="tiny"``: 2+2 blocks of width 64) with ``overrides``."""
    check_size(size)
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


def stdit3_spec(size: str = "full", **overrides: Any) -> CheckpointSpec:
    """What ``OpenSora-STDiT-v3/`` holds: config.json and the single ``model.safetensors``."""
    cfg = stdit3_config_json(size, **overrides)
    tensors = _tensors(stdit3_keys(cfg))
    return CheckpointSpec("stdit3", DIRECTORIES["stdit3"], {"config.json": cfg},
                          (FileSpec("model.safetensors", "safetensors", tuple(tensors)),))


# VAE -------------------------------------------------------------------------------------------------------


def vae_architecture(size: str = "full", spatial: dict[str, Any] | None = None,
                     temporal: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(spatial AutoencoderKL config, temporal VAE config)`` for a size, with field overrides."""
    check_size(size)
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
    tensors = _tensors(pairs)
    c = int(temporal["embed_dim"])
    if c != len(VAE_SCALE):
        raise ValueError(f"the VAE's scale/shift have {len(VAE_SCALE)} channels, the config has embed_dim {c}")
    tensors += [TensorEntry("scale", (1, c, 1, 1, 1), "float32"), TensorEntry("shift", (1, c, 1, 1, 1), "float32")]
    return CheckpointSpec("vae", DIRECTORIES["vae"], {"config.json": config_json},
                          (FileSpec("model.safetensors", "safetensors", tuple(tensors)),))


# T5 --------------------------------------------------------------------------------------------------------


def t5_keys(config: Any) -> list[tuple[str, tuple[int, ...]]]:
    """``T5EncoderModel``'s state-dict keys and shapes (both names of the tied embedding), built on meta."""
    from transformers import T5EncoderModel

    with torch.device("meta"):
        model = T5EncoderModel(config)
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


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

    check_size(size)
    if fmt not in T5_FORMATS:
        raise ValueError(f"t5_format must be one of {T5_FORMATS}, got {fmt!r}")
    cfg_json = t5_config_json(**{**(TINY_SIZES if size == "tiny" else {}), **overrides})
    config = _config(cfg_json)
    entries = _tensors(t5_keys(config))
    # The tied embedding: one storage saved under both names, as torch.save stores a tied state dict.
    entries = [TensorEntry(e.key, e.shape, e.dtype, "shared.weight") if e.key == "encoder.embed_tokens.weight"
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
    """Every (file, key, shape, dtype) of the components' files: what ``random_weights`` writes."""
    out = []
    for comp in check_components(which):
        spec = component_spec(comp, size, t5_format, (overrides or {}).get(comp))
        out += [PlannedTensor(f"{spec.directory}/{f.name}", e.key, e.shape, e.dtype) for f in spec.files for e in f.tensors]
    return out
