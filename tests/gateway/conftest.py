"""Fixtures of the REST layer tests: a fake orchestrator, keys, a served gateway."""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest

from services.common.auth import ApiKeyAuthenticator, ApiKeyStore, FailedAttemptLimiter, generate_api_key
from services.common.runtime import running_service
from services.common.settings import ServerSettings
from services.gateway.config import Settings
from services.gateway.server import build_app, running_gateway
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
