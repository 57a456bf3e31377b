"""Shared pytest setup: the tiny-model builders of ``tests/models.py`` as a fixture. The package is imported as
installed (``make .venv/.installed``, an editable install), as ``blockrt``, ``blockrt.partitioners`` and
``blockrt.pipelines``."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["toy", "t5_encoder", "bert", "gpt2", "llama"])
def tiny_model(request: pytest.FixtureRequest):
    """``(name, model, inputs)`` for each tiny model in ``tests/models.py``."""
    from models import BUILDERS

    model, inputs = BUILDERS[request.param]()
    return request.param, model, inputs
