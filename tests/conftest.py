"""Shared pytest setup: the tiny-model builders of ``tests/models.py`` as a fixture, and tiny random Open-Sora
checkpoints written once per session. blockrt's user cache (converted stores) is a per-test temporary directory,
so no test writes into the home directory or sees another test's stores. The package is imported as installed (``make .venv/.installed``, an
editable install), as ``blockrt``, ``blockrt.partitioners`` and ``blockrt.pipelines``."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(autouse=True)
def blockrt_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``$BLOCKRT_CACHE`` for this test: where stores converted from a checkpoint go (``blockrt/cache_dir.py``)."""
    cache = tmp_path / "blockrt-cache"
    monkeypatch.setenv("BLOCKRT_CACHE", str(cache))
    return cache


@pytest.fixture(params=["toy", "t5_encoder", "bert", "gpt2", "llama"])
def tiny_model(request: pytest.FixtureRequest):
    """``(name, model, inputs)`` for each tiny model in ``tests/models.py``."""
    from models import BUILDERS

    model, inputs = BUILDERS[request.param]()
    return request.param, model, inputs


@pytest.fixture(scope="session")
def random_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., dict[str, Path]]:
    """``random_checkpoints(which, seed=0, *, t5_format="bin", tokenizer=None, overrides=None)``: tiny random
    Open-Sora checkpoints in the real layout, ``{component: directory}`` as ``write_random_checkpoints(root,
    which, seed, size="tiny", ...)`` returns them, each written once per session for each set of arguments.

    The components asked for with the same other arguments sit side by side under one weights root
    (``d["t5"].parent``, what ``OpenSoraPipeline`` reads). The directories are shared: a test that changes
    files copies the directory first.

    Example:
        >>> stdit3 = random_checkpoints(("stdit3",))["stdit3"]
        >>> root = random_checkpoints(t5_format="safetensors", tokenizer=tok)["t5"].parent
    """
    from blockrt.pipelines.opensora.checkpoint_layout import COMPONENTS
    from blockrt.pipelines.opensora.random_weights import write_random_checkpoints

    base = tmp_path_factory.mktemp("random_checkpoints")
    roots: dict[str, Path] = {}  # the arguments but `which` (as JSON) -> the weights root written under
    written: dict[tuple[str, str], Path] = {}  # (arguments, component) -> its directory

    def get(which: Sequence[str] = COMPONENTS, seed: int = 0, *, t5_format: str = "bin",
            tokenizer: str | Path | None = None, overrides: dict[str, dict[str, Any]] | None = None) -> dict[str, Path]:
        args = json.dumps({"seed": seed, "t5_format": t5_format, "overrides": overrides or {},
                           "tokenizer": str(Path(tokenizer).resolve()) if tokenizer else None}, sort_keys=True)
        root = roots.setdefault(args, base / f"weights-{len(roots)}")
        missing = [c for c in which if (args, c) not in written]
        if missing:
            out = write_random_checkpoints(root, missing, seed, size="tiny", t5_format=t5_format, tokenizer=tokenizer,
                                           overrides=overrides)
            written.update({(args, c): d for c, d in out.items()})
        return {c: written[(args, c)] for c in which}

    return get
