"""API keys: hashing, the failed-attempt limit, and refusal on REST and gRPC before anything runs."""
from __future__ import annotations

import json

import grpc
import pytest
from llmesh.orchestrator.v1 import orchestrator_pb2 as pb
from llmesh.orchestrator.v1 import orchestrator_pb2_grpc

from services.common import errors
from services.common.auth import (
    ApiKeyAuthenticator,
    ApiKeyStore,
    FailedAttemptLimiter,
    generate_api_key,
    hash_api_key,
    principal_var,
    verify_api_key,
)
from services.common.interceptors import AuthInterceptor, ErrorInterceptor, error_info, peer_host
from tests.gateway.conftest import TEST_SCRYPT_N, Mesh
from tests.gateway.fakes import FakeAgentService


def test_hash_is_salted_and_verifies_only_the_right_key():
    first, second = hash_api_key("k", n=TEST_SCRYPT_N), hash_api_key("k", n=TEST_SCRYPT_N)
    assert first != second and first.startswith(f"scrypt${TEST_SCRYPT_N}$")
    assert verify_api_key("k", first) and verify_api_key("k", second)
    assert not verify_api_key("k2", first)
    assert not verify_api_key("k", "garbage")


def test_key_file_holds_no_plain_keys(tmp_path):
    key, record = generate_api_key("acme", n=TEST_SCRYPT_N)
    path = tmp_path / "keys.json"
    ApiKeyStore([record]).save(path)
    text = path.read_text()
    assert key not in text and key.split("_", 2)[2] not in text
    loaded = ApiKeyStore.load(path).get(record.key_id)
    assert loaded is not None and loaded.tenant_id == "acme" and verify_api_key(key, loaded.key_hash)


async def test_authenticator_caches_verified_keys_and_rejects_others(keys, authenticator: ApiKeyAuthenticator):
    principal = await authenticator.authenticate(f"Bearer {keys.acme}", "10.0.0.1")
    again = await authenticator.authenticate(f"bearer {keys.acme}", "10.0.0.1")
    assert principal == again and principal.tenant_id == "acme"
    assert authenticator.num_kdf_runs == 1  # the slow hash ran once
    forged = keys.acme[:-2] + ("aa" if not keys.acme.endswith("aa") else "bb")
    for header, reason in [(None, "API_KEY_MISSING"), ("Basic abc", "API_KEY_MISSING"),
                           (f"Bearer {forged}", "API_KEY_INVALID"), ("Bearer lmk_nokey_x", "API_KEY_INVALID")]:
        with pytest.raises(errors.Unauthenticated) as caught:
            await authenticator.authenticate(header, "10.0.0.2")
        assert caught.value.reason == reason


async def test_failed_attempts_are_rate_limited_per_client(keys):
    now = [0.0]
    limiter = FailedAttemptLimiter(max_failures=3, window_s=10, clock=lambda: now[0])
    auth = ApiKeyAuthenticator(keys.store, limiter)
    try:
        for _ in range(3):
            with pytest.raises(errors.Unauthenticated):
                await auth.authenticate("Bearer lmk_x_y", "1.2.3.4")
        runs = auth.num_kdf_runs
        with pytest.raises(errors.ResourceExhausted) as caught:
            await auth.authenticate("Bearer lmk_x_z", "1.2.3.4")  # a fourth guess waits, unhashed
        assert caught.value.retry_after_ms == 10_000 and auth.num_kdf_runs == runs
        # A key that verifies is never refused for the address's failures.
        assert (await auth.authenticate(f"Bearer {keys.acme}", "1.2.3.4")).tenant_id == "acme"
        assert (await auth.authenticate(f"Bearer {keys.acme}", "5.6.7.8")).tenant_id == "acme"
        now[0] = 10.5
        with pytest.raises(errors.Unauthenticated):
            await auth.authenticate("Bearer lmk_x_z", "1.2.3.4")
    finally:
        auth.close()


async def test_rest_without_a_valid_key_is_401_and_touches_nothing(mesh: Mesh):
    async with mesh.client(key=None) as anonymous, mesh.client(key="lmk_abc_wrong") as wrong:
        replies = [await anonymous.post("/v1/sessions", json={"title": "x"}),
                   await wrong.get("/v1/sessions"),
                   await anonymous.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})]
        public = await anonymous.get("/openapi.json")
    for reply in replies:
        assert reply.status_code == 401, reply.text
        assert reply.headers["www-authenticate"].startswith("Bearer")
        assert reply.json()["error"]["status"] == "UNAUTHENTICATED"
    assert mesh.agent.calls == [] and mesh.generator.requests == []
    assert public.status_code == 200


async def test_rest_failed_attempts_get_429_but_a_valid_key_passes(mesh: Mesh):
    async with mesh.client(key="lmk_abc_wrong") as wrong, mesh.client() as good:
        codes = [(await wrong.get("/v1/sessions")).status_code for _ in range(6)]
        still_refused = await wrong.get("/v1/sessions")
        admitted = await good.get("/v1/sessions")  # same client address, a key that verifies
    assert codes == [401] * 5 + [429]
    assert still_refused.status_code == 429 and int(still_refused.headers["retry-after"]) >= 1
    assert admitted.status_code == 200, admitted.text


async def test_grpc_interceptor_refuses_before_the_servicer(keys, authenticator):
    service = FakeAgentService()
    seen_principals = []
    original = service.CreateSession

    async def create(request, context):
        seen_principals.append(principal_var.get())
        return await original(request, context)

    service.CreateSession = create
    server = grpc.aio.server(interceptors=[AuthInterceptor(authenticator), ErrorInterceptor()])
    orchestrator_pb2_grpc.add_AgentServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = orchestrator_pb2_grpc.AgentServiceStub(channel)
            request = pb.CreateSessionRequest(tenant_id="acme", title="x")
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await stub.CreateSession(request)
            with pytest.raises(grpc.aio.AioRpcError) as wrong:
                await stub.CreateSession(request, metadata=(("authorization", "Bearer lmk_abc_nope"),))
            with pytest.raises(grpc.aio.AioRpcError) as stream_refused:
                async for _ in stub.Resume(pb.ResumeRequest(tenant_id="acme", session_id="s1")):
                    pass
            assert service.calls == []
            ok = await stub.CreateSession(request, metadata=(("authorization", f"Bearer {keys.acme}"),))
    finally:
        await server.stop(0)
    for err, reason in [(missing, "API_KEY_MISSING"), (wrong, "API_KEY_INVALID"), (stream_refused, "API_KEY_MISSING")]:
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error_info(err.value).reason == reason
    assert ok.session.tenant_id == "acme"
    assert seen_principals[0].tenant_id == "acme"
    assert [name for name, _ in service.calls] == ["CreateSession"]


def test_cli_creates_a_key_that_verifies(tmp_path, capsys):
    from services.common.auth import _cli, split_api_key

    path = tmp_path / "k.json"
    assert _cli(["create-key", "--tenant", "acme", "--keys-file", str(path)]) == 0
    key = capsys.readouterr().out.strip()
    record = ApiKeyStore.load(path).get(split_api_key(key))
    assert record is not None and record.tenant_id == "acme"
    assert json.loads(path.read_text())["keys"][0]["hash"].startswith("scrypt$")


def test_failures_count_per_peer_host_whatever_the_port():
    assert peer_host("ipv4:10.1.2.3:50051") == peer_host("ipv4:10.1.2.3:6000") == "10.1.2.3"
    assert peer_host("ipv6:[::1]:5000") == "::1"
    assert peer_host("unix:/tmp/socket") == "unix:/tmp/socket"
