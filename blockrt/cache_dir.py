"""blockrt's user cache directory: where stores converted from a checkpoint live (never inside the checkpoint).

Order: ``$BLOCKRT_CACHE``, else ``$XDG_CACHE_HOME/blockrt``, else the platform's
user cache (``~/Library/Caches/blockrt`` on macOS, ``~/.cache/blockrt`` elsewhere), as platformdirs resolves it.
A Hugging Face snapshot may be read-only or shared between users, so nothing is written beside it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV = "BLOCKRT_CACHE"


def user_cache_dir() -> Path:
    """The directory blockrt caches converted stores in (see the module docstring); not created here."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "blockrt"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "blockrt"
    return Path.home() / ".cache" / "blockrt"
