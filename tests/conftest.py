"""Fixtures shared by the whole suite."""
from __future__ import annotations

from pathlib import Path

import pytest

from services.gemma.model_cache import ensure_model


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The bundled Gemma 3 270M GGUF, assembled once into the shared cache."""
    return ensure_model()
