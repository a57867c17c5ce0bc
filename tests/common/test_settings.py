from __future__ import annotations

from dataclasses import dataclass

import pytest

from services.common.errors import InvalidArgument
from services.common.settings import ServerSettings, load_settings


@dataclass(frozen=True)
class DemoSettings(ServerSettings):
    port: int = 1234
    workers: int = 2
    ratio: float = 0.8
    enabled: bool = False
    nodes: tuple[str, ...] = ()


def test_defaults_then_env_then_cli() -> None:
    env = {"LLMESH_DEMO_WORKERS": "4", "LLMESH_GRACE_S": "2.5", "LLMESH_DEMO_NODES": "a:1, b:2"}
    settings = load_settings(DemoSettings, "demo", ["--workers", "6", "--enabled", "yes"], env)
    assert settings.port == 1234
    assert settings.workers == 6  # CLI beats env
    assert settings.grace_s == 2.5  # global env applies to every service
    assert settings.enabled is True
    assert settings.nodes == ("a:1", "b:2")


def test_service_env_beats_global_env() -> None:
    env = {"LLMESH_DEMO_RATIO": "0.5", "LLMESH_RATIO": "0.9"}
    assert load_settings(DemoSettings, "demo", [], env).ratio == 0.5


def test_bad_value_names_the_field() -> None:
    with pytest.raises(InvalidArgument) as caught:
        load_settings(DemoSettings, "demo", ["--workers", "many"], {})
    assert caught.value.field == "workers"
    assert "workers" in str(caught.value)
