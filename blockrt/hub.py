"""Finding a model's files on this machine: a local directory, or a repo id in the local Hugging Face cache.

blockrt never downloads. A repo id (``"gpt2"``, ``"black-forest-labs/FLUX.1-dev"``) is resolved OFFLINE through
``huggingface_hub.snapshot_download(..., local_files_only=True)``, which reads the cache's own layout
(``models--org--name/refs/<revision>`` -> ``snapshots/<commit>/``); fetching a model when a network exists is the
hub library's job (``huggingface-cli download <id>``). Snapshots are only read, never written (they may be
read-only or shared between users).

``blockrt.run(..., weights="org/name")`` resolves a repo id the same way (``resolve_weights``).

The cache searched: ``hf_cache_dir`` if given, else the environment's ``HF_HUB_CACHE``, else ``$HF_HOME/hub``,
else huggingface_hub's default (read when called, so a changed environment is seen).
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import NotCachedError, StoreError

STEMS = ("model", "diffusion_pytorch_model")  # transformers' and diffusers' weight file names


def hf_cache_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The Hugging Face hub cache directory to read (see the module docstring for the order)."""
    if explicit is not None:
        return Path(explicit)
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def resolve_model_dir(name_or_path: str | os.PathLike, *, subfolder: str = "", revision: str | None = None,
                      cache_dir: str | os.PathLike | None = None) -> Path:
    """The local directory holding a model's ``config.json`` and weights.

    Args:
        name_or_path: a local directory, or a Hugging Face repo id already in the local cache.
        subfolder: a folder inside it (a diffusers pipeline's ``"transformer"``, ``"text_encoder"``, ...).
        revision: a branch, tag or commit of a cached repo (default ``"main"``).
        cache_dir: the hub cache to search (default: see the module docstring).

    Raises:
        NotCachedError: a repo id that is not in the cache (the message says how to fetch it).
        StoreError: a directory or subfolder that does not exist.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise StoreError(f"{path} is a file; expected a model directory (config.json and *.safetensors) or a "
                             "Hugging Face repo id; fix: pass the directory that holds the file")
        root = path
    elif _looks_local(str(name_or_path)):
        raise StoreError(f"{path} does not exist; expected a model directory (config.json and *.safetensors) or a "
                         "Hugging Face repo id such as 'gpt2' or 'org/name'; fix: check the path")
    else:
        root = _cached_snapshot(str(name_or_path), revision, hf_cache_dir(cache_dir))
    if subfolder:
        sub = root / subfolder
        if not sub.is_dir():
            found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
            raise StoreError(f"{root} has no subfolder {subfolder!r}; found {found or 'none'}; fix: pass one of "
                             "those as subfolder= (a diffusers pipeline keeps each model in its own folder)")
        root = sub
    return root


def _looks_local(name: str) -> bool:
    """A path rather than a repo id: absolute, relative with ./ or ../, ~, or more than one '/'."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def _cached_snapshot(repo_id: str, revision: str | None, cache: Path) -> Path:
    fetch = (f"fix: download it first (with a network): `huggingface-cli download {repo_id}` "
             f"(or `hf download {repo_id}`, or huggingface_hub.snapshot_download({repo_id!r})), then call again; "
             "or pass a local directory")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as e:
        raise NotCachedError(f"{repo_id!r} is not a local directory, and reading the Hugging Face cache needs "
                             f"huggingface_hub ({e}); fix: pip install 'blockrt[hf]', or pass a local directory") from e
    try:
        found = snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError) as e:
        # ValueError: not a valid repo id (the hub library validates it)
        at = f" at revision {revision!r}" if revision else ""
        raise NotCachedError(f"{repo_id!r}{at} is not in the local Hugging Face cache ({cache}) and is not a local "
                             f"directory; blockrt reads models offline and never downloads; {fetch}") from e
    return Path(found)


def checkpoint_file(directory: str | os.PathLike, variant: str | None = None) -> Path:
    """The safetensors checkpoint of a model folder: its sharded index if there is one, else its single file
    (``model`` for transformers, ``diffusion_pytorch_model`` for diffusers; ``variant`` as ``model.fp16``)."""
    directory = Path(directory)
    suffix = f".{variant}" if variant else ""
    for stem in STEMS:
        for name in (f"{stem}.safetensors.index{suffix}.json", f"{stem}{suffix}.safetensors.index.json",
                     f"{stem}{suffix}.safetensors"):
            if (directory / name).is_file():
                return directory / name
    found = sorted(p.name for p in directory.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".json"))
    pickled = [n for n in found if n.endswith((".bin", ".pt"))]
    fix = ("fix: convert it to safetensors once (load it with transformers/diffusers and save_pretrained(..., "
           "safe_serialization=True)); blockrt never unpickles checkpoints" if pickled and not variant else
           "fix: pass variant= to match the files" if found else "fix: download the weights too")
    raise StoreError(f"{directory}: expected {STEMS[0]}{suffix}.safetensors(.index.json) or "
                     f"{STEMS[1]}{suffix}.safetensors(.index.json); found {found or 'no weight files'}; {fix}")


def resolve_weights(weights: str | os.PathLike) -> str | os.PathLike:
    """``blockrt.run(weights=...)``: a path as given; a repo id (not a path, and nothing there) as its checkpoint
    in the local Hugging Face cache (``NotCachedError`` if it is not there, saying how to fetch it)."""
    if Path(weights).expanduser().exists() or _looks_local(str(weights)):
        return weights
    return checkpoint_file(resolve_model_dir(weights))
