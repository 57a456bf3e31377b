"""blockrt's user cache directory: where stores converted from a checkpoint live (never inside the checkpoint).

Order: the ``cache_dir`` argument, else ``$BLOCKRT_CACHE``, else ``$XDG_CACHE_HOME/blockrt``, else the platform's
user cache (``~/Library/Caches/blockrt`` on macOS, ``~/.cache/blockrt`` elsewhere), as platformdirs resolves it.
A Hugging Face snapshot may be read-only or shared between users, so nothing is written beside it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

ENV = "BLOCKRT_CACHE"


def user_cache_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The directory blockrt caches converted stores in (see the module docstring); not created here."""
    if explicit is not None:
        return Path(explicit).expanduser()
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "blockrt"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "blockrt"
    return Path.home() / ".cache" / "blockrt"


def converted_store_path(weights: str | os.PathLike, what: object, explicit: str | os.PathLike | None = None) -> Path:
    """The store directory for ``weights`` converted as ``what`` (JSON-able: model class, storage dtypes, ...):
    ``<cache>/stores/<checkpoint dir name>-<hash>``. The hash covers the checkpoint's real path, so each hub
    revision (its own snapshot directory) gets its own store; the store itself records the checkpoint's content
    fingerprint (``conversion.py``), so a checkpoint changed in place is caught there."""
    real = Path(weights).resolve()
    key = hashlib.blake2b(json.dumps([str(real), what], sort_keys=True, default=str).encode(), digest_size=8).hexdigest()
    name = (real.parent.name if real.is_file() else real.name) or "checkpoint"
    return user_cache_dir(explicit) / "stores" / f"{name}-{key}"
