"""schemathesis against /openapi.json: whatever it sends, the REST layer answers below 500.

The backends answer every RPC with an empty reply (EmptyReplyApp): this is
about how the translation layer handles input, not about the services.
"""
from __future__ import annotations

import asyncio
import tempfile
import threading

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from llmesh.inference.v1 import inference_pb2
from llmesh.orchestrator.v1 import orchestrator_pb2
from llmesh.policy.v1 import policy_pb2
from llmesh.tools.v1 import tools_pb2
from schemathesis import GenerationMode

from services.common.auth import ApiKeyAuthenticator, ApiKeyStore, FailedAttemptLimiter, generate_api_key
from services.common.runtime import running_service
from services.common.settings import ServerSettings
from services.gateway.config import Settings
from services.gateway.server import build_app, running_gateway
from services.store.config import Settings as StoreSettings
from services.store.server import build_app as build_store
from tests.gateway.conftest import TEST_SCRYPT_N
from tests.gateway.fakes import EmptyReplyApp, ScriptedGenerator

SERVICES = {
    "orchestrator": orchestrator_pb2.DESCRIPTOR.services_by_name["AgentService"],
    "inference": inference_pb2.DESCRIPTOR.services_by_name["InferenceService"],
    "tools": tools_pb2.DESCRIPTOR.services_by_name["ToolService"],
    "policy": policy_pb2.DESCRIPTOR.services_by_name["PolicyService"],
}


class GatewayThread:
    """Backend + gateway on their own event loop, so synchronous clients can call them."""

    def __init__(self, key_store: ApiKeyStore) -> None:
        self.key_store = key_store
        self.url = ""
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self.error: BaseException | None = None

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            with tempfile.TemporaryDirectory(prefix="fuzz-store-") as data_dir:
                await self._serve(data_dir)
        except BaseException as exc:  # surfaced to the test thread
            self.error = exc
            self._ready.set()

    async def _serve(self, data_dir: str) -> None:
        assert self._stop is not None
        backend = EmptyReplyApp(SERVICES.values())
        # /v1/responses keeps its chains in a real store (an empty reply is no store).
        store_settings = StoreSettings(port=0, data_dir=data_dir, sqlite_synchronous="OFF")
        async with running_service(backend, ServerSettings(port=0)) as svc, \
                running_service(build_store(store_settings), store_settings) as store:
            target = f"127.0.0.1:{svc.port}"
            auth = ApiKeyAuthenticator(self.key_store, FailedAttemptLimiter(max_failures=10_000))
            app = build_app(Settings(port=0, store_target=f"127.0.0.1:{store.port}",
                                     **{f"{name}_target": target for name in SERVICES}),
                            authenticator=auth, generator=ScriptedGenerator())
            async with running_gateway(app) as url:
                self.url = url
                self._ready.set()
                await self._stop.wait()
            auth.close()

    def __enter__(self) -> GatewayThread:
        self._thread.start()
        self._ready.wait(30)
        if self.error is not None:
            raise self.error
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


@pytest.fixture(scope="module")
def gateway_thread():
    key, record = generate_api_key("acme", n=TEST_SCRYPT_N)
    with GatewayThread(ApiKeyStore([record])) as running:
        running.key = key
        yield running


@pytest.fixture(scope="module")
def api_schema(gateway_thread):
    return schemathesis.openapi.from_url(gateway_thread.url + "/openapi.json")


def test_openapi_document_matches_the_annotations(gateway_thread):
    doc = httpx.get(gateway_thread.url + "/openapi.json").json()
    run = doc["paths"]["/v1/sessions/{session_id}:run"]["post"]
    assert run["operationId"] == "AgentService_Run"
    assert "text/event-stream" in run["responses"]["200"]["content"]
    body = run["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert "userMessage" in body and "sessionId" not in body  # bound by the path instead
    events = doc["paths"]["/v1/sessions/{session_id}/events"]["get"]
    assert {p["name"] for p in events["parameters"]} == {"session_id", "tenant_id", "after_seq", "Last-Event-ID"}
    assert {"/v1/chat/completions", "/v1/models", "/v1/tools",
            "/v1/policy/tenants/{tenant_id}/audit"} <= set(doc["paths"])
    # RPCs the gateway may not call (policy decisions and approvals, running tools) have no route.
    assert not {"/v1/policy:evaluate", "/v1/policy/approvals/{approval_id}:record", "/v1/tools:execute",
                "/v1/tools:executeBatch"} & set(doc["paths"])


def test_no_server_errors(api_schema, gateway_thread):
    """Positive and negative (schema-violating) cases for every operation."""
    headers = {"Authorization": f"Bearer {gateway_thread.key}"}
    failures: list[str] = []
    num_cases = 0
    statuses: set[int] = set()

    for result in api_schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                      database=None)
            def check(case):
                nonlocal num_cases
                num_cases += 1
                response = case.call(headers=headers, timeout=10)
                statuses.add(response.status_code)
                if response.status_code >= 500:
                    failures.append(f"{case.method} {case.formatted_path} {case.query} {case.body!r:.200}"
                                    f" -> {response.status_code} {response.text[:300]}")

            check()
    assert num_cases > 100
    # Both sides were reached: valid requests went through, invalid ones were refused.
    assert 200 in statuses and 400 in statuses, statuses
    assert failures == []
