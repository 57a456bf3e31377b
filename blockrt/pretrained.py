"""``blockrt.from_pretrained``: a transformers or diffusers model streamed from its saved checkpoint in one call.

The model is built on ``meta`` from its ``config.json`` (``meta_weights``: parameters and persistent buffers on
``meta``, computed buffers such as rotary frequencies real), then streamed with ``blockrt.run(..., weights=...)``
straight out of the checkpoint's safetensors (one file, or shards with their ``*.safetensors.index.json``): the
whole model is never in memory. Where the files are: ``hub.py`` (a directory, or a repo id in the local Hugging
Face cache, offline). A store converted for a ``storage_dtype`` goes where ``blockrt.run`` puts every converted
store: blockrt's user cache (``cache_dir.py``, ``conversion.py``), never into the checkpoint.

Which class: ``model_class`` if given (a concrete class or a transformers ``Auto*`` class), else the checkpoint's
own: diffusers' ``config.json`` names it (``_class_name``), transformers' lists ``architectures``.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import RunConfig
from .device import DeviceProfile
from .errors import BlockrtError, StoreError
from .hub import checkpoint_file, resolve_model_dir
from .partitioners.plan import FLOAT_DTYPES, dtype_from_name
from .runtime import Runtime, run
from .skeleton import meta_weights
from .sources import CheckpointSource


def from_pretrained(name_or_path: str | os.PathLike, budget: int | str | DeviceProfile, *, subfolder: str = "",
                    revision: str | None = None, variant: str | None = None, model_class: Any = None,
                    config: RunConfig | None = None, partitioner: Any = None,
                    hf_cache_dir: str | os.PathLike | None = None, dtype: torch.dtype | str | None = None) -> Runtime:
    """Build a transformers or diffusers model on ``meta`` and stream it from its checkpoint under ``budget``.

    Args:
        name_or_path: a local model directory, or a Hugging Face repo id already in the local cache (read
            offline; blockrt never downloads: ``huggingface-cli download <id>`` does).
        budget: as ``blockrt.run`` (``"3.3GB"``, bytes, ``"iphone15pro"``).
        subfolder: the model's folder inside a diffusers pipeline (``"transformer"``, ``"unet"``, ``"text_encoder"``).
        revision: branch, tag or commit of a cached repo (default ``"main"``).
        variant: weight-file variant (``"fp16"`` reads ``*.fp16.safetensors``).
        model_class: the class to build (default: the one the checkpoint's config names), e.g.
            ``transformers.AutoModelForCausalLM`` to get a head another config does not list.
        config, partitioner: as ``blockrt.run``. ``config.store_path`` unset and a ``storage_dtype`` the
            checkpoint does not hold: the converted store goes to blockrt's user cache (``$BLOCKRT_CACHE``, else
            ``$XDG_CACHE_HOME/blockrt``, else ``~/.cache/blockrt``).
        hf_cache_dir: the Hugging Face hub cache to read (default ``$HF_HUB_CACHE``, else huggingface_hub's).
        dtype: the dtype to compute in (``torch.bfloat16`` or ``"bfloat16"``), as transformers' and diffusers'
            ``from_pretrained(dtype=...)``. Default: a transformers model in the dtype its config records (as
            transformers does by default), a diffusers model in float32. A narrower checkpoint widens as it loads;
            a wider one (float32 weights, ``dtype=torch.bfloat16``) is converted once into a store in that dtype,
            in blockrt's user cache, unless ``config.storage_dtype`` asks for another storage.
    A transformers base model (``model_class=GPT2Model``) reads a checkpoint saved with a head under its
    ``base_model_prefix`` (``transformer.``), as transformers does. An autoencoder is called through ``decode()``,
    which no hook sees: stream its decoder (``blockrt.run(vae.decoder, ..., RunConfig(weights_prefix="decoder."))``)
    or the whole pipeline with ``blockrt.offload``.

    Returns:
        The ``Runtime`` streaming the model: call it like the model (``rt(input_ids)``), or use the model itself,
        ``rt.model``, wherever it is called through ``__call__`` (``rt.model.generate(...)`` under the runtime's
        hooks, which ``generate`` calls with gradients off). Close it (or use ``with``); the model is a skeleton
        afterwards.

    Example:
        >>> with blockrt.from_pretrained("gpt2", budget="200MB") as rt:
        ...     tokens = rt.model.generate(input_ids, max_new_tokens=20)
    """
    directory = resolve_model_dir(name_or_path, subfolder=subfolder, revision=revision, cache_dir=hf_cache_dir)
    model = build_skeleton(directory, model_class, dtype)
    weights = checkpoint_file(directory, variant)
    stored = CheckpointSource(weights).segments  # the checkpoint's headers: its keys and dtypes
    config = config or RunConfig()
    if dtype is not None and config.storage_dtype is None and _narrower(model, stored):
        config = replace(config, storage_dtype=str(_dtype(dtype)).removeprefix("torch."))  # converted once, cached
    base = getattr(model, "base_model_prefix", "")
    if base and not config.weights_prefix and not hasattr(model, base) and \
            any(k.startswith(base + ".") for k in stored):
        config = replace(config, weights_prefix=base + ".")  # a base model out of a checkpoint with a head
    return run(model, budget, weights=weights, partitioner=partitioner, config=config)


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    found = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(found, torch.dtype) or not found.is_floating_point:
        raise ValueError(f"dtype: expected a floating torch dtype such as torch.bfloat16 or 'float16', found {dtype!r}")
    return found


def _narrower(model: nn.Module, stored: dict[str, Any]) -> bool:
    """Whether some floating tensor of ``model`` is narrower than the checkpoint (``stored``: key -> segment)
    holds it, so it must be converted."""
    return any(t.is_floating_point() and k in stored and stored[k].dtype in FLOAT_DTYPES
               and dtype_from_name(stored[k].dtype).itemsize > t.element_size()
               for k, t in model.state_dict(keep_vars=True).items())


def build_skeleton(directory: str | os.PathLike, model_class: Any = None,
                   dtype: torch.dtype | str | None = None) -> nn.Module:
    """The model a checkpoint directory's ``config.json`` describes, its weights on ``meta``, in eval mode (in
    ``dtype`` if given, see ``from_pretrained``)."""
    dtype = None if dtype is None else _dtype(dtype)
    directory = Path(directory)
    path = directory / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise StoreError(f"{directory}: expected a readable config.json (a transformers or diffusers model folder); "
                         f"found {type(e).__name__}: {e}; fix: pass the folder that holds config.json (for a "
                         "diffusers pipeline, subfolder='transformer' or the model's own folder)") from e
    if not isinstance(raw, dict):
        raise StoreError(f"{path}: expected a JSON object, found {type(raw).__name__}")
    if "_class_name" in raw and "architectures" not in raw:
        model = _diffusers_model(directory, raw, model_class)
        if dtype is not None:
            model = model.to(dtype)  # on meta: nothing is allocated
    else:
        model = _transformers_model(directory, raw, model_class, dtype)
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()  # a tied head shares its embedding's Parameter: one tensor in the plan, stored once
    return model.eval()


def _require(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise BlockrtError(f"this checkpoint is a {name} model and {name} is not installed ({e}); "
                         "fix: pip install 'blockrt[hf]'") from e


def _diffusers_model(directory: Path, raw: dict, model_class: Any) -> nn.Module:
    diffusers = _require("diffusers")

    cls = model_class or getattr(diffusers, str(raw["_class_name"]), None)
    if cls is None:
        raise StoreError(f"{directory}/config.json names class {raw['_class_name']!r}, which diffusers "
                         f"{diffusers.__version__} does not have; fix: upgrade diffusers or pass model_class=")
    with meta_weights():
        return cls.from_config(cls.load_config(directory))


def _transformers_model(directory: Path, raw: dict, model_class: Any, dtype: torch.dtype | None) -> nn.Module:
    transformers = _require("transformers")

    cfg = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    cls = model_class
    if cls is None:
        names = cfg.architectures or []
        cls = next((getattr(transformers, n) for n in names if hasattr(transformers, n)), None)
        if cls is None:
            raise StoreError(f"{directory}/config.json lists architectures {names or 'none'}, none of them in "
                             f"transformers {transformers.__version__}; fix: pass model_class= (e.g. "
                             "transformers.AutoModelForCausalLM)")
    kwargs = {} if dtype is None else {"dtype": dtype}  # as transformers' from_pretrained(dtype=...) builds it
    with meta_weights():
        if hasattr(cls, "from_config"):  # the Auto* classes
            return cls.from_config(cfg, **kwargs)
        if hasattr(cls, "_from_config"):
            return cls._from_config(cfg, **kwargs)
        model = cls(cfg)
        return model if dtype is None else model.to(dtype)
