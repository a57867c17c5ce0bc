"""Bad keys from one address never lock out a key that verifies, and stay cheap to refuse.

Failures are still counted per client address (10 per 60 s by default):
past the limit, unknown keys get 429 before any hash is computed. A valid
key from the same address passes, on REST and on gRPC, whether or not it
was used before.
"""
from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import httpx
import pytest
from llmesh.orchestrator.v1 import orchestrator_pb2 as pb
from llmesh.orchestrator.v1 import orchestrator_pb2_grpc

from services.common import errors
from services.common.auth import (
    ApiKeyAuthenticator,
    ApiKeyStore,
    FailedAttemptLimiter,
    generate_api_key,
)
from services.common.interceptors import AuthInterceptor, ErrorInterceptor, error_info
from services.common.runtime import running_service
from services.common.settings import ServerSettings
from services.gateway.config import Settings
from services.gateway.server import build_app, running_gateway
from tests.gateway.conftest import TEST_SCRYPT_N
from tests.gateway.fakes import FakeAgentApp, FakeAgentService, ScriptedGenerator

DEFAULTS = Settings()
NUM_BAD = DEFAULTS.auth_max_failures + 5


@pytest.fixture
def keys() -> dict[str, str]:
    return {tenant: generate_api_key(tenant, n=TEST_SCRYPT_N) for tenant in ("acme", "globex")}


@pytest.fixture
async def authenticator(keys) -> AsyncIterator[ApiKeyAuthenticator]:
    limiter = FailedAttemptLimiter(DEFAULTS.auth_max_failures, DEFAULTS.auth_failure_window_s)
    auth = ApiKeyAuthenticator(ApiKeyStore(record for _, record in keys.values()), limiter)
    yield auth
    auth.close()


def wrong_secret(key: str) -> str:
    """The same key_id with another secret: a guess that does cost a hash to refuse."""
    prefix, key_id, secret = key.split("_", 2)
    return f"{prefix}_{key_id}_{'A' if secret[0] != 'A' else 'B'}{secret[1:]}"


async def test_rest_valid_key_passes_after_bad_keys_from_the_same_address(keys, authenticator):
    acme = keys["acme"][0]
    async with running_service(FakeAgentApp(), ServerSettings(port=0)) as agent:
        app = build_app(Settings(port=0, orchestrator_target=f"127.0.0.1:{agent.port}"),
                        authenticator=authenticator, generator=ScriptedGenerator())
        async with running_gateway(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
            async def get(key: str | None) -> httpx.Response:
                headers = {"Authorization": f"Bearer {key}"} if key else {}
                return await client.get("/v1/sessions", headers=headers)

            bad = ["lmk_nokey_guess", "not-a-key"]
            codes = [(await get(bad[i % len(bad)])).status_code for i in range(NUM_BAD)]
            assert codes == [401] * DEFAULTS.auth_max_failures + [429] * (NUM_BAD - DEFAULTS.auth_max_failures)
            # Sending no key guesses nothing: it is not a counted failure, just a plain 401.
            assert (await get(None)).status_code == 401
            assert authenticator.num_kdf_runs == 0  # keys nobody holds never cost a hash

            first = await get(acme)  # never used before: verified now, despite the address's failures
            again = await get(acme)
            assert (first.status_code, again.status_code) == (200, 200), first.text
            assert authenticator.num_kdf_runs == 1

            still_bad = await get("lmk_nokey_guess")
            assert still_bad.status_code == 429 and int(still_bad.headers["retry-after"]) >= 1
            assert still_bad.json()["error"]["status"] == "RESOURCE_EXHAUSTED"
            forged = await get(wrong_secret(acme))  # its key_id exists, but its secret is wrong
            assert forged.status_code == 401 and authenticator.num_kdf_runs == 2


async def test_guessing_one_key_id_does_not_lock_out_another(keys, authenticator):
    acme, globex = keys["acme"][0], keys["globex"][0]
    address = "10.1.2.3"
    for _ in range(DEFAULTS.auth_max_failures):
        with pytest.raises(errors.Unauthenticated):
            await authenticator.authenticate(f"Bearer {wrong_secret(globex)}", address)
    runs = authenticator.num_kdf_runs
    # More guesses at globex's key from this address are refused without hashing.
    for _ in range(5):
        with pytest.raises(errors.ResourceExhausted):
            await authenticator.authenticate(f"Bearer {wrong_secret(globex)}", address)
    assert authenticator.num_kdf_runs == runs
    assert (await authenticator.authenticate(f"Bearer {acme}", address)).tenant_id == "acme"
    # Another address is not affected at all, even for globex.
    assert (await authenticator.authenticate(f"Bearer {globex}", "10.9.9.9")).tenant_id == "globex"


async def test_a_recently_verified_key_passes_even_while_its_id_is_being_guessed(keys, authenticator):
    acme = keys["acme"][0]
    address = "10.1.2.4"
    assert (await authenticator.authenticate(f"Bearer {acme}", address)).tenant_id == "acme"
    for _ in range(DEFAULTS.auth_max_failures):
        with pytest.raises(errors.Unauthenticated):
            await authenticator.authenticate(f"Bearer {wrong_secret(acme)}", address)
    with pytest.raises(errors.ResourceExhausted):
        await authenticator.authenticate(f"Bearer {wrong_secret(acme)}", address)
    runs = authenticator.num_kdf_runs
    assert (await authenticator.authenticate(f"Bearer {acme}", address)).tenant_id == "acme"
    assert authenticator.num_kdf_runs == runs  # recognised by its digest, no hash


async def test_grpc_valid_key_passes_after_bad_keys_from_the_same_address(keys, authenticator):
    acme = keys["acme"][0]
    server = grpc.aio.server(interceptors=[AuthInterceptor(authenticator), ErrorInterceptor()])
    orchestrator_pb2_grpc.add_AgentServiceServicer_to_server(FakeAgentService(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = orchestrator_pb2_grpc.AgentServiceStub(channel)
            request = pb.CreateSessionRequest(tenant_id="acme", title="x")
            refusals = []
            for i in range(NUM_BAD):
                metadata = (("authorization", f"Bearer lmk_guess{i}_x"),)
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.CreateSession(request, metadata=metadata)
                refusals.append((caught.value.code(), error_info(caught.value).reason))
            reply = await stub.CreateSession(request, metadata=(("authorization", f"Bearer {acme}"),))
            with pytest.raises(grpc.aio.AioRpcError) as still_bad:
                await stub.CreateSession(request, metadata=(("authorization", "Bearer lmk_guess_x"),))
    finally:
        await server.stop(0)
    limit = DEFAULTS.auth_max_failures
    assert refusals == ([(grpc.StatusCode.UNAUTHENTICATED, "API_KEY_INVALID")] * limit
                        + [(grpc.StatusCode.RESOURCE_EXHAUSTED, "AUTH_RATE_LIMITED")] * (NUM_BAD - limit))
    assert reply.session.tenant_id == "acme"
    assert still_bad.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
