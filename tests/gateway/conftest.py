"""Fixtures of the REST layer tests: a fake orchestrator, keys, a served gateway."""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from services.common.auth import ApiKeyAuthenticator, ApiKeyStore, FailedAttemptLimiter, generate_api_key
from services.common.runtime import running_service
from services.common.settings import ServerSettings
from services.gateway.config import Settings
from services.gateway.server import build_app, running_gateway
from services.store.config import Settings as StoreSettings
from services.store.server import build_app as build_store
from tests.gateway.fakes import FakeAgentApp, FakeAgentService, ScriptedGenerator
from tests.support.mesh import TEST_SCRYPT_N


@dataclass
class Keys:
    store: ApiKeyStore
    acme: str
    globex: str


@pytest.fixture
def keys() -> Keys:
    acme, acme_record = generate_api_key("acme", n=TEST_SCRYPT_N)
    globex, globex_record = generate_api_key("globex", n=TEST_SCRYPT_N)
    return Keys(ApiKeyStore([acme_record, globex_record]), acme, globex)


@pytest.fixture
def authenticator(keys: Keys) -> ApiKeyAuthenticator:
    auth = ApiKeyAuthenticator(keys.store, FailedAttemptLimiter(max_failures=5, window_s=60))
    yield auth
    auth.close()


@dataclass
class Mesh:
    url: str
    agent: FakeAgentService
    generator: ScriptedGenerator
    keys: Keys

    def client(self, key: str | None = "acme", **kwargs) -> httpx.AsyncClient:
        token = {"acme": self.keys.acme, "globex": self.keys.globex}.get(key, key) if key else None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=10, **kwargs)


@pytest.fixture
async def mesh(keys: Keys, authenticator: ApiKeyAuthenticator) -> AsyncIterator[Mesh]:
    agent_app = FakeAgentApp()
    generator = ScriptedGenerator()
    async with running_service(agent_app, ServerSettings(port=0)) as agent:
        settings = Settings(port=0, orchestrator_target=f"127.0.0.1:{agent.port}")
        app = build_app(settings, authenticator=authenticator, generator=generator)
        async with running_gateway(app) as url:
            yield Mesh(url, agent_app.service, generator, keys)


@dataclass
class ResponsesMesh:
    """The gateway with a real store service (for /v1/responses) and a scripted generator; no orchestrator."""
    url: str
    generator: ScriptedGenerator
    keys: Keys
    app: Any = None

    @property
    def responses(self) -> Any:
        """The gateway's /v1/responses service (its running background responses)."""
        return self.app.state.openai.responses

    def client(self, key: str | None = None) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=key or self.keys.acme, max_retries=0)

    def http(self, key: str | None = None) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=20,
                                 headers={"Authorization": f"Bearer {key or self.keys.acme}"})


@pytest.fixture
async def rmesh(tmp_path: Path, keys: Keys, authenticator: ApiKeyAuthenticator) -> AsyncIterator[ResponsesMesh]:
    generator = ScriptedGenerator()
    store_settings = StoreSettings(port=0, data_dir=str(tmp_path / "store"), sqlite_synchronous="NORMAL")
    async with running_service(build_store(store_settings), store_settings) as store:
        app = build_app(Settings(port=0, store_target=f"127.0.0.1:{store.port}"), authenticator=authenticator,
                        generator=generator)
        async with running_gateway(app) as url:
            yield ResponsesMesh(url, generator, keys, app)
