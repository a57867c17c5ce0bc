"""The authorisation table, principal forwarding, role narrowing and key management, in one process."""
from __future__ import annotations

import asyncio
import subprocess
import sys

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from llmesh.inference.v1 import inference_pb2
from llmesh.tools.v1 import tools_pb2, tools_pb2_grpc

from services.common import authz, errors
from services.common.auth import ApiKeyAuthenticator, ApiKeyStore, Principal, generate_api_key, principal_var
from services.common.clients import make_channel
from services.common.identity import client_key, init_tls
from services.common.interceptors import error_info
from services.common.runtime import running_service
from services.common.settings import ServerSettings
from tests.support.auth import TLS, client_identity, open_channel, service_identity
from tests.support.waiting import wait_until

TOOLS = "llmesh.tools.v1.ToolService"
CLIENT_A = Principal("tenant-a", "k1", "developer")


def test_every_rpc_of_every_contract_has_a_row_in_the_table() -> None:
    import llmesh.inference.v1.inference_pb2
    import llmesh.orchestrator.v1.orchestrator_pb2
    import llmesh.policy.v1.policy_pb2
    import llmesh.store.v1.store_pb2
    import llmesh.tools.v1.tools_pb2  # noqa: F401
    from google.protobuf import descriptor_pool

    pool = descriptor_pool.Default()
    for name in ("llmesh.inference.v1.InferenceService", "llmesh.orchestrator.v1.AgentService",
                 "llmesh.policy.v1.PolicyService", "llmesh.store.v1.StoreService", TOOLS):
        for method in pool.FindServiceByName(name).methods:
            assert authz.allowed_callers(f"/{name}/{method.name}"), f"/{name}/{method.name} is in no row"


@pytest.mark.parametrize(("method", "caller", "allowed"), [
    ("/llmesh.store.v1.StoreService/ListSessions", "client", False),
    ("/llmesh.store.v1.StoreService/ListSessions", "service:orchestrator", True),
    ("/llmesh.store.v1.StoreService/ListSessions", "service:gateway", False),
    ("/llmesh.policy.v1.PolicyService/Evaluate", "service:tools", True),
    ("/llmesh.policy.v1.PolicyService/Evaluate", "service:orchestrator", False),
    ("/llmesh.policy.v1.PolicyService/RecordApproval", "service:orchestrator", True),
    ("/llmesh.policy.v1.PolicyService/RecordApproval", "client", False),
    ("/llmesh.policy.v1.PolicyService/ListAudit", "client", True),
    ("/llmesh.tools.v1.ToolService/ListTools", "client", True),
    ("/llmesh.tools.v1.ToolService/ExecuteTool", "client", False),
    ("/llmesh.inference.v1.InferenceService/Generate", "client", True),
    ("/llmesh.inference.v1.InferenceService/ReleaseSession", "client", False),
    ("/llmesh.orchestrator.v1.AgentService/Run", "client", True),
    ("/llmesh.orchestrator.v1.AgentService/Run", "service:store", False),
    ("/llmesh.unknown.v1.X/Y", "service:orchestrator", False),
])
def test_the_table(method, caller, allowed) -> None:
    principal = Principal("", "k", service=caller.split(":")[1]) if ":" in caller else CLIENT_A
    if allowed:
        authz.authorize(method, principal)
    else:
        with pytest.raises(errors.PermissionDenied) as caught:
            authz.authorize(method, principal)
        assert caught.value.reason == "RPC_NOT_ALLOWED" and method in caught.value.message


def test_a_clients_tenant_is_filled_or_must_match() -> None:
    request = inference_pb2.GenerateRequest()
    authz.bind_request(request, CLIENT_A)
    assert request.tenant_id == "tenant-a"
    with pytest.raises(errors.PermissionDenied) as caught:
        authz.bind_request(inference_pb2.GenerateRequest(tenant_id="tenant-b"), CLIENT_A)
    assert caught.value.reason == "TENANT_MISMATCH" and caught.value.field == "tenant_id"
    # A service acting for no client names the tenant it works for.
    service_request = inference_pb2.GenerateRequest(tenant_id="tenant-b")
    authz.bind_request(service_request, Principal("", "s", service="orchestrator"))
    assert service_request.tenant_id == "tenant-b"


@pytest.mark.parametrize(("asked", "granted", "runs_as"), [
    ("", "developer", "developer"), ("viewer", "developer", "viewer"), ("developer", "developer", "developer"),
    ("admin", "developer", None), ("admin", "viewer", None), ("custom", "developer", None),
    ("custom", "custom", "custom"), ("viewer", "admin", "viewer"),
])
def test_a_role_may_only_narrow_the_keys(asked, granted, runs_as) -> None:
    request = tools_pb2.ExecuteToolRequest(role=asked)
    principal = Principal("tenant-a", "k", granted)
    if runs_as is None:
        with pytest.raises(errors.PermissionDenied) as caught:
            authz.bind_request(request, principal)
        assert caught.value.reason == "ROLE_NOT_GRANTED" and caught.value.field == "role"
    else:
        authz.bind_request(request, principal)
        assert request.role == runs_as


def test_only_services_may_forward_a_principal_and_it_must_be_well_formed() -> None:
    forwarded = authz.encode_principal(CLIENT_A)
    assert authz.effective_principal(Principal("", "s", service="gateway"), forwarded) == \
        Principal("tenant-a", "k1", "developer", via="gateway")
    with pytest.raises(errors.PermissionDenied) as caught:
        authz.effective_principal(CLIENT_A, forwarded)
    assert caught.value.reason == "PRINCIPAL_FORWARD_NOT_ALLOWED"
    for bad in ["", "{", "[]", '{"tenant_id": "a"}', '{"tenant_id": "", "key_id": "k", "role": "r"}',
                '{"tenant_id": 1, "key_id": "k", "role": "r"}']:
        with pytest.raises(errors.InvalidArgument):
            authz.effective_principal(Principal("", "s", service="gateway"), bad)


class RecordingTools(tools_pb2_grpc.ToolServiceServicer):
    """Records the principal and request each call reached the handler with."""

    def __init__(self) -> None:
        self.seen: list[tuple[Principal | None, str, str]] = []

    async def ListTools(self, request, context):
        self.seen.append((principal_var.get(), "", ""))
        return tools_pb2.ListToolsResponse()

    async def ExecuteTool(self, request, context):
        self.seen.append((principal_var.get(), request.tenant_id, request.role))
        return tools_pb2.ExecuteToolResponse()


class RecordingApp:
    service_names = (TOOLS,)

    def __init__(self) -> None:
        self.servicer = RecordingTools()

    def register(self, server: grpc.aio.Server) -> None:
        tools_pb2_grpc.add_ToolServiceServicer_to_server(self.servicer, server)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass


@pytest.fixture
async def tools_service(tmp_path):
    app = RecordingApp()
    settings = ServerSettings(port=0, data_dir=str(tmp_path), credentials_dir=str(tmp_path / "credentials"))
    if TLS:
        init_tls(tmp_path / "credentials")
    async with running_service(app, settings) as svc:
        yield app.servicer, svc.address, tmp_path / "credentials"


async def test_a_service_forwards_its_clients_principal_and_the_role_is_the_keys(tools_service) -> None:
    servicer, target, credentials = tools_service
    orchestrator = service_identity("orchestrator", credentials)
    async with make_channel(target, orchestrator) as channel:
        stub = tools_pb2_grpc.ToolServiceStub(channel)
        # Acting for no client: the tenant named in the body is the service's to name.
        await stub.ExecuteTool(tools_pb2.ExecuteToolRequest(tenant_id="tenant-x"))
        # Acting for a developer of tenant-a (as while handling that client's call).
        token = principal_var.set(Principal("tenant-a", "k1", "developer"))
        try:
            await stub.ExecuteTool(tools_pb2.ExecuteToolRequest())
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.ExecuteTool(tools_pb2.ExecuteToolRequest(role="admin"))
            assert error_info(caught.value).reason == "ROLE_NOT_GRANTED"
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.ExecuteTool(tools_pb2.ExecuteToolRequest(tenant_id="tenant-x"))
            assert error_info(caught.value).reason == "TENANT_MISMATCH"
        finally:
            principal_var.reset(token)
    assert [(p.tenant_id, p.via, t, r) for p, t, r in servicer.seen] == [
        ("", "", "tenant-x", ""), ("tenant-a", "orchestrator", "tenant-a", "developer")]


async def test_a_client_sending_a_forwarded_principal_is_refused(tools_service) -> None:
    servicer, target, credentials = tools_service
    async with make_channel(target, client_identity("tenant-a", credentials=credentials)) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await tools_pb2_grpc.ToolServiceStub(channel).ListTools(
                tools_pb2.ListToolsRequest(),
                metadata=((authz.PRINCIPAL_HEADER, authz.encode_principal(Principal("tenant-b", "k", "admin"))),))
    assert error_info(caught.value).reason == "PRINCIPAL_FORWARD_NOT_ALLOWED"
    assert servicer.seen == []


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=st.one_of(st.text(max_size=300), st.binary(max_size=120).map(lambda b: "Bearer " + b.hex()),
                       st.text(alphabet="lmk_0123456789abcdef", max_size=80).map(lambda t: "Bearer " + t)))
def test_fuzzed_credentials_never_reach_a_handler(tmp_path_factory, value) -> None:
    asyncio.run(_fuzz_one(tmp_path_factory.mktemp("fuzz"), value))


async def _fuzz_one(tmp_path, value: str) -> None:
    app = RecordingApp()
    settings = ServerSettings(port=0, data_dir=str(tmp_path), credentials_dir=str(tmp_path / "credentials"))
    client_key(tmp_path / "credentials", "tenant-a")  # a real key exists; the fuzzed value is not it
    if TLS:
        init_tls(tmp_path / "credentials", names=("tools", "client"))
    async with running_service(app, settings) as svc, open_channel(svc.address, tmp_path / "credentials") as channel:
        # Only what a gRPC client can put on the wire (printable ASCII) is sent.
        sendable = value.isascii() and value.isprintable() and value.strip() == value and value
        metadata = (("authorization", value),) if sendable else ()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await tools_pb2_grpc.ToolServiceStub(channel).ListTools(tools_pb2.ListToolsRequest(), metadata=metadata)
    assert caught.value.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert app.servicer.seen == []


def _cli(*args: str, keys_file) -> str:
    return subprocess.run([sys.executable, "-m", "services.common.auth", "--keys-file", str(keys_file), *args],
                          check=True, capture_output=True, text=True).stdout


async def test_keys_are_created_listed_rotated_and_disabled_through_the_cli(tmp_path) -> None:
    keys_file = tmp_path / "api_keys.json"
    old = _cli("create-key", "--tenant", "acme", "--role", "viewer", keys_file=keys_file).strip()
    store = ApiKeyStore.load(keys_file, reload_interval_s=0.05)
    auth = ApiKeyAuthenticator(store, cache_ttl_s=300)
    try:
        principal = await auth.authenticate(f"Bearer {old}", "127.0.0.1")
        assert (principal.tenant_id, principal.role) == ("acme", "viewer")
        new = _cli("rotate-key", principal.key_id, "--grace-s", "3600", keys_file=keys_file).strip()
        # During a rotation both keys are valid.
        assert (await auth.authenticate(f"Bearer {old}", "127.0.0.1")).key_id == principal.key_id
        renewed = await auth.authenticate(f"Bearer {new}", "127.0.0.1")
        assert (renewed.tenant_id, renewed.role) == ("acme", "viewer") and renewed.key_id != principal.key_id
        listing = _cli("list-keys", keys_file=keys_file)
        assert principal.key_id in listing and "expires" in listing and old not in listing and new not in listing
        _cli("disable-key", principal.key_id, keys_file=keys_file)
        # Refused within the reload time although the verification is still cached.

        async def refused() -> bool:
            try:
                await auth.authenticate(f"Bearer {old}", "127.0.0.1")
            except errors.Unauthenticated:
                return True
            return False

        assert await wait_until(refused, timeout_s=5)
        assert "disabled" in _cli("list-keys", keys_file=keys_file)
        assert (await auth.authenticate(f"Bearer {new}", "127.0.0.1")).key_id == renewed.key_id
    finally:
        auth.close()


async def test_an_expired_rotation_leaves_only_the_new_key(tmp_path) -> None:
    key, record = generate_api_key("acme", n=2**10)
    store = ApiKeyStore([record.__class__(**{**record.__dict__, "expires_at": 1.0})])
    auth = ApiKeyAuthenticator(store)
    try:
        with pytest.raises(errors.Unauthenticated):
            await auth.authenticate(f"Bearer {key}", "127.0.0.1")
    finally:
        auth.close()


async def test_a_burst_of_first_calls_with_one_key_costs_one_hash(tmp_path) -> None:
    key, record = generate_api_key("acme", n=2**12)
    auth = ApiKeyAuthenticator(ApiKeyStore([record]))
    try:
        principals = await asyncio.gather(*(auth.authenticate(f"Bearer {key}", "127.0.0.1") for _ in range(8)))
        assert {p.key_id for p in principals} == {record.key_id}
        assert auth.num_kdf_runs == 1
    finally:
        auth.close()
