"""Open-Sora v1.2's components from local Hugging Face-style directories, as skeletons to stream (spec §6).

``load_t5``, ``load_stdit3`` and ``load_vae`` read ``config.json``, build the model with its weights on the
``meta`` device (``blockrt.meta_weights()``: computed buffers stay real), check the weight files against the
model, and return ``Loaded(model, weights)``: pass ``weights`` to ``blockrt.run(model, budget, weights=...)``.
With ``meta=False`` the weights are read into the model instead (small models, references in tests).

Weight files, in order of preference:

- safetensors, one file or sharded with ``*.safetensors.index.json``: streamed in place;
- ``pytorch_model.bin`` or ``pytorch_model-*.bin`` + ``pytorch_model.bin.index.json`` (the real T5 repo):
  converted once to safetensors in a cache directory and reused (``bin_checkpoint.py``).

Every problem of one kind comes back as one ``CheckpointError`` listing all of it: files (missing
``config.json``, missing shards, truncated or refused files), then keys (missing, unexpected, wrong
shape or dtype). ``shared.weight`` and ``encoder.embed_tokens.weight`` of T5 are one tensor: either name, or
both, may be stored.

Example:
    >>> t5, weights = load_t5("weights/t5-v1_1-xxl")
    >>> with blockrt.run(t5, budget="3GB", weights=weights) as rt:
    ...     y, mask = encode_prompts(load_tokenizer("weights/t5-v1_1-xxl"), rt, ["a cat"])
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from blockrt.errors import StoreError
from blockrt.pipelines.opensora.bin_checkpoint import bin_shards, convert_bin_checkpoint
from blockrt.pipelines.opensora.checkpoint_error import CheckpointError, contents, listing
from blockrt.skeleton import meta_weights
from blockrt.sources import CheckpointSource

__all__ = ["CheckpointError", "Loaded", "LOADERS", "check_weights", "find_weights", "load_stdit3", "load_t5",
           "load_vae", "materialize", "vae_config_from_json"]


class Loaded(NamedTuple):
    """A model (weights on ``meta`` unless loaded with ``meta=False``) and the checkpoint to stream from."""

    model: nn.Module
    weights: Path


# -- finding and checking weights -------------------------------------------------------------------------


def _safetensors_path(d: Path) -> Path | None:
    """What ``CheckpointSource`` should open in ``d``, if ``d`` holds a safetensors checkpoint."""
    for name in ("model.safetensors.index.json", "model.safetensors"):
        if (d / name).is_file():
            return d / name
    indexes = sorted(d.glob("*.safetensors.index.json"))
    files = sorted(d.glob("*.safetensors"))
    if len(indexes) == 1:
        return indexes[0]
    if not indexes and len(files) == 1:
        return files[0]
    if indexes or files:
        raise CheckpointError(f"{d}: several safetensors checkpoints ({', '.join(p.name for p in indexes + files)}); "
                              "expected model.safetensors or one *.safetensors.index.json")
    return None


def find_weights(directory: str | Path, *, cache_dir: str | Path | None = None) -> Path:
    """The safetensors checkpoint of a directory, converting a ``.bin`` one first (see ``convert_bin_checkpoint``).

    Returns a ``.safetensors`` file or ``*.safetensors.index.json`` for ``blockrt.run(weights=...)``; its
    headers are checked (missing shards, truncated files) before it is returned.
    """
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"expected a checkpoint directory at {d}, but it does not exist")
    path = _safetensors_path(d)
    if path is None:
        if not bin_shards(d)[1]:
            raise CheckpointError(f"{d}: no weights: expected model.safetensors, model.safetensors.index.json, "
                                  f"pytorch_model.bin or pytorch_model.bin.index.json; found {contents(d)}")
        path = _safetensors_path(convert_bin_checkpoint(d, cache_dir))
        assert path is not None
    try:
        CheckpointSource(path)
    except StoreError as e:
        raise CheckpointError(f"{d}: {e}") from None
    return path


def _tied_groups(model: nn.Module) -> list[tuple[list[str], torch.Tensor]]:
    """Every distinct state-dict tensor with all its names (tied weights are one Parameter object)."""
    groups: dict[int, tuple[list[str], torch.Tensor]] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), ([], t))[0].append(key)
    return list(groups.values())


def check_weights(model: nn.Module, weights: str | Path) -> None:
    """Raise one ``CheckpointError`` listing every missing, unexpected, or wrongly shaped or typed key.

    A tied tensor (several state-dict names, one Parameter) is satisfied by any of its names.
    """
    try:
        segments = CheckpointSource(weights).segments
    except StoreError as e:
        raise CheckpointError(str(e)) from None
    missing, wrong, known = [], [], set()
    for names, t in _tied_groups(model):
        known.update(names)
        found = [n for n in names if n in segments]
        if not found:
            missing.append(" = ".join(names))
        want = (tuple(t.shape), str(t.dtype).removeprefix("torch."))
        for n in found:
            got = (segments[n].shape, segments[n].dtype)
            if got != want:
                wrong.append(f"{n}: expected {want[1]}{list(want[0])}, found {got[1]}{list(got[0])}")
    unexpected = sorted(set(segments) - known)
    if missing or wrong or unexpected:
        parts = [f"{weights} does not match {type(model).__name__}:"]
        for title, items in (("missing keys", missing), ("wrong shape or dtype", wrong), ("unexpected keys", unexpected)):
            if items:
                parts.append(listing(title, items))
        parts.append("fix: check that config.json describes these weights, and that the files are complete")
        raise CheckpointError("\n".join(parts))


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor | nn.Parameter) -> None:
    path, _, attr = name.rpartition(".")
    module = model.get_submodule(path)
    if attr in module._parameters:
        module._parameters[attr] = value  # type: ignore[assignment]
    elif attr in module._buffers:
        module._buffers[attr] = value.detach() if isinstance(value, nn.Parameter) else value
    else:
        raise KeyError(f"{type(model).__name__} has no parameter or buffer {name!r}")


def materialize(model: nn.Module, weights: str | Path) -> nn.Module:
    """Read every tensor of ``weights`` into ``model`` (tied names get one shared Parameter); returns ``model``."""
    check_weights(model, weights)
    source = CheckpointSource(weights)
    for names, old in _tied_groups(model):
        stored = next(n for n in names if n in source.segments)
        t = source.read_tensor(stored)
        value: torch.Tensor = nn.Parameter(t, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else t
        for n in names:
            _set_tensor(model, n, value)
    return model


# -- the components ---------------------------------------------------------------------------------------


def _read_config(d: Path, model_types: tuple[str, ...], problems: list[str]) -> dict[str, Any] | None:
    path = d / "config.json"
    if not path.is_file():
        problems.append(f"missing config.json (found {contents(d)})")
        return None
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        problems.append(f"{path} is not valid JSON ({e})")
        return None
    if not isinstance(cfg, dict) or cfg.get("model_type") not in model_types:
        got = cfg.get("model_type") if isinstance(cfg, dict) else type(cfg).__name__
        problems.append(f"{path}: model_type {got!r}, expected {' or '.join(map(repr, model_types))}")
        return None
    return cfg


def _open(directory: str | Path, what: str, model_types: tuple[str, ...],
          cache_dir: str | Path | None) -> tuple[dict[str, Any], Path]:
    """config.json and the weights to stream, or one CheckpointError listing every file-level problem."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"cannot load {what}: {d} is not a directory")
    problems: list[str] = []
    cfg = _read_config(d, model_types, problems)
    weights = None
    try:
        weights = find_weights(d, cache_dir=cache_dir)
    except CheckpointError as e:
        problems.append(str(e))
    if problems or cfg is None or weights is None:
        raise CheckpointError(f"cannot load {what} from {d}:\n" + "\n".join(f"  - {p}" for p in problems))
    return cfg, weights


def _finish(model: nn.Module, weights: Path, meta: bool) -> Loaded:
    model.eval()
    if meta:
        check_weights(model, weights)
    else:
        materialize(model, weights)
    return Loaded(model, weights)


def load_t5(directory: str | Path, *, meta: bool = True, cache_dir: str | Path | None = None) -> Loaded:
    """The T5 encoder of a local directory (DeepFloyd/t5-v1_1-xxl layout: config.json + .bin or safetensors).

    Args:
        directory: holds ``config.json`` and the weights (``pytorch_model*.bin`` + index, or safetensors).
        meta: build the ``T5EncoderModel`` with its weights on ``meta`` (to stream); False reads them in.
        cache_dir: where ``.bin`` weights are converted (default ``<directory>/.blockrt-safetensors``).

    Returns:
        ``Loaded(model, weights)``: a ``transformers.T5EncoderModel`` in eval mode and the safetensors path.
    """
    from transformers import T5Config, T5EncoderModel

    cfg, weights = _open(directory, "the T5 encoder", ("t5",), cache_dir)
    config = T5Config.from_dict(cfg)
    with meta_weights():
        model = T5EncoderModel(config)
    return _finish(model, weights, meta)


def load_stdit3(directory: str | Path, *, meta: bool = True, cache_dir: str | Path | None = None) -> Loaded:
    """STDiT3 from a local OpenSora-STDiT-v3 directory (config.json with model_type "STDiT3" + weights)."""
    cfg, weights = _open(directory, "STDiT3", ("STDiT3",), cache_dir)
    from blockrt.pipelines.opensora.stdit3 import STDiT3, STDiT3Config

    with meta_weights():
        model = STDiT3(STDiT3Config.from_dict(cfg))
    return _finish(model, weights, meta)


def _known(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


def vae_config_from_json(cfg: dict[str, Any]) -> Any:
    """``VAEConfig`` from OpenSora-VAE-v1.2's config.json: shift, scale, micro sizes from the file; the
    architecture is the real one unless the file records another under ``blockrt_architecture``."""
    from blockrt.pipelines.opensora.checkpoint_layout import VAE_ARCH_KEY
    from blockrt.pipelines.opensora.vae import SpatialVAEConfig, VAEConfig
    from blockrt.pipelines.opensora.vae_temporal import TemporalVAEConfig

    arch = cfg.get(VAE_ARCH_KEY) or {}
    spatial = _known(SpatialVAEConfig, arch.get("spatial", {}))
    if "micro_batch_size" in (cfg.get("vae_2d") or {}):
        spatial["micro_batch_size"] = cfg["vae_2d"]["micro_batch_size"]
    extra: dict[str, Any] = {k: tuple(cfg[k]) for k in ("shift", "scale") if k in cfg}
    if "micro_frame_size" in cfg:
        extra["micro_frame_size"] = int(cfg["micro_frame_size"])
    return VAEConfig(spatial=SpatialVAEConfig(**spatial),
                     temporal=TemporalVAEConfig(**_known(TemporalVAEConfig, arch.get("temporal", {}))), **extra)


def load_vae(directory: str | Path, *, meta: bool = True, cache_dir: str | Path | None = None) -> Loaded:
    """The VAE pipeline from a local OpenSora-VAE-v1.2 directory (model_type "VideoAutoencoderPipeline")."""
    cfg, weights = _open(directory, "the VAE", ("VideoAutoencoderPipeline",), cache_dir)
    from blockrt.pipelines.opensora.vae import VideoAutoencoderPipeline

    config = vae_config_from_json(cfg)
    with meta_weights():
        model = VideoAutoencoderPipeline(config)
    return _finish(model, weights, meta)


LOADERS: dict[str, Callable[..., Loaded]] = {"t5": load_t5, "stdit3": load_stdit3, "vae": load_vae}
