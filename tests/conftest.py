"""Shared pytest setup: the repository root on sys.path (so ``blockrt``, ``partitioners`` and ``pipelines``
import without installation) and the tiny-model builders of ``tests/models.py`` as a fixture."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(params=["toy", "t5_encoder", "bert", "gpt2", "llama"])
def tiny_model(request: pytest.FixtureRequest):
    """``(name, model, inputs)`` for each tiny model in ``tests/models.py``."""
    from models import BUILDERS

    model, inputs = BUILDERS[request.param]()
    return request.param, model, inputs
