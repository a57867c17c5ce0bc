"""Fixtures shared by the whole suite."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.common.identity import init_tls
from services.common.settings import ServerSettings
from services.gemma.model_cache import ensure_model
from tests.support.auth import CREDENTIALS, TLS, forced_tls

if TLS:
    # `make test-tls`: every service of the suite serves and calls with mutual TLS.
    init_tls(CREDENTIALS)
    os.environ["LLMESH_TLS_ENABLED"] = "true"  # services the tests start as processes
    os.environ["TLS"] = "1"  # meshes started by the launcher (make run)
    _validate = ServerSettings.__post_init__

    def _with_tls(self: ServerSettings) -> None:
        _validate(self)
        if forced_tls():  # tests of one transport or the other opt out (tests.support.auth.own_transport)
            object.__setattr__(self, "tls_enabled", True)

    ServerSettings.__post_init__ = _with_tls  # type: ignore[method-assign]


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The bundled Gemma 3 270M GGUF, assembled once into the shared cache."""
    return ensure_model()
