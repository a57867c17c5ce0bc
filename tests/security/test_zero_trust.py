"""Every gRPC port of a launched mesh authenticates and authorises, and the key decides tenant and role.

One mesh is started as ``make run`` starts it (the launcher, child processes,
credentials under its data directory; mutual TLS in a TLS run of the suite);
a second one always with mutual TLS.
"""
from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from llmesh.inference.v1 import inference_pb2
from llmesh.orchestrator.v1 import orchestrator_pb2 as pb
from llmesh.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from llmesh.policy.v1 import policy_pb2, policy_pb2_grpc

from services.common import authz
from services.common.identity import client_key, init_tls, service_key, tls_files
from services.common.interceptors import error_info
from services.launcher import SERVICES
from tests.support.auth import TLS, open_channel, open_sync_channel
from tests.support.mesh import LaunchedMesh, launched_mesh
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.model]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory) -> Iterator[LaunchedMesh]:
    with launched_mesh(tmp_path_factory.mktemp("zero-trust"), tls=TLS) as running:
        yield running


def _channel(mesh: LaunchedMesh, service: str) -> grpc.Channel:
    """A channel with no key to ``service``; with the mesh's CA and client certificate when it serves TLS."""
    return open_sync_channel(mesh.target(service), mesh.credentials, tls=mesh.tls)


def _key(mesh: LaunchedMesh, tenant: str, role: str = "developer") -> str:
    return client_key(mesh.credentials, tenant, role)


def _auth(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def _methods() -> Iterator[tuple[str, str, object]]:
    import llmesh.inference.v1.inference_pb2
    import llmesh.store.v1.store_pb2
    import llmesh.tools.v1.tools_pb2  # noqa: F401

    pool = descriptor_pool.Default()
    for svc in SERVICES:
        for method in pool.FindServiceByName(svc.full_name).methods:
            yield svc.name, f"/{svc.full_name}/{method.name}", method


def _call(channel: grpc.Channel, path: str, method, request=None, metadata=()) -> grpc.RpcError | None:
    """Make the call; the error it ended with, or None."""
    request = request if request is not None else message_factory.GetMessageClass(method.input_type)()
    kwargs = {"request_serializer": type(request).SerializeToString, "response_deserializer": lambda b: b}
    try:
        if method.server_streaming:
            for _ in channel.unary_stream(path, **kwargs)(request, metadata=metadata, timeout=15):
                break
        else:
            channel.unary_unary(path, **kwargs)(request, metadata=metadata, timeout=15)
    except grpc.RpcError as err:
        return err
    return None


def _read_url(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return reply.read().decode()


def _reason(err: grpc.RpcError | None) -> str:
    info = error_info(err) if err is not None else None
    return info.reason if info is not None else ""


def test_without_credentials_every_rpc_is_unauthenticated_but_health_and_reflection_answer(mesh) -> None:
    for service, path, method in _methods():
        with _channel(mesh, service) as channel:
            err = _call(channel, path, method)
            assert err is not None and err.code() == grpc.StatusCode.UNAUTHENTICATED, (path, err)
            assert _reason(err) == "API_KEY_MISSING", (path, err.details())
    for svc in SERVICES:
        with _channel(mesh, svc.name) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=svc.full_name), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            assert svc.full_name in {s.name for s in next(iter(replies)).list_services_response.service}


def test_a_client_key_cannot_call_the_store_or_policy_decisions(mesh) -> None:
    key = _key(mesh, "tenant-a")
    refused = [(s, p, m) for s, p, m in _methods()
               if s == "store" or p.endswith(("/Evaluate", "/RecordApproval", "/RecordAccessDenials",
                                             "/ExecuteTool", "/ExecuteTools", "/ReleaseSession"))]
    assert len(refused) > 20
    for service, path, method in refused:
        with _channel(mesh, service) as channel:
            err = _call(channel, path, method, metadata=_auth(key))
            assert err is not None and err.code() == grpc.StatusCode.PERMISSION_DENIED, (path, err)
            assert _reason(err) == "RPC_NOT_ALLOWED" and path in err.details(), (path, err.details())


def test_a_service_key_is_held_to_its_own_row_of_the_table(mesh) -> None:
    """The gateway's own key may drive agents, and reach only the store RPCs /v1/responses keeps its chains with."""
    gateway = _auth(service_key(mesh.credentials, "gateway"))
    checked = 0
    for service, path, method in _methods():
        if service != "store":
            continue
        with _channel(mesh, service) as channel:
            err = _call(channel, path, method, metadata=gateway)
            if authz.GATEWAY in authz.allowed_callers(path):
                # Let in: refused, if at all, by the request's content (an empty one), never by the table.
                assert err is None or _reason(err) != "RPC_NOT_ALLOWED", path
            else:
                assert err is not None and _reason(err) == "RPC_NOT_ALLOWED", path
                checked += 1
    assert checked >= 20, "most of the store stays closed to the gateway"


def test_garbage_truncated_and_disabled_credentials_never_reach_a_handler(mesh) -> None:
    key = _key(mesh, "tenant-a")
    bad = ["", "Bearer", "Bearer ", "Basic abc", "Bearer lmk_", "Bearer lmk__x", f"Bearer {key[:-4]}",
           f"Bearer {key}x", "Bearer " + "A" * 5000, "Bearer lmk_000000000000_" + "x" * 43, f"bearer  {key[:20]}"]
    with _channel(mesh, "orchestrator") as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        for value in bad:
            with pytest.raises(grpc.RpcError) as caught:
                stub.ListSessions(pb.ListSessionsRequest(), metadata=(("authorization", value),), timeout=10)
            # Past the per-address failure limit the answer is RESOURCE_EXHAUSTED: still no handler.
            assert caught.value.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED), value


def _agent(mesh: LaunchedMesh) -> tuple[grpc.Channel, pb_grpc.AgentServiceStub]:
    channel = _channel(mesh, "orchestrator")
    return channel, pb_grpc.AgentServiceStub(channel)


def test_a_key_of_tenant_a_cannot_read_run_or_cancel_tenant_b_sessions(mesh) -> None:
    key_a, key_b = _key(mesh, "tenant-a"), _key(mesh, "tenant-b")
    channel, stub = _agent(mesh)
    with channel:
        # An empty tenant_id is filled from the key.
        created = stub.CreateSession(pb.CreateSessionRequest(title="a's"), metadata=_auth(key_a), timeout=30).session
        assert created.tenant_id == "tenant-a"
        sid = created.session_id
        naming_a = [
            ("GetSession", pb.GetSessionRequest(tenant_id="tenant-a", session_id=sid)),
            ("ListSessions", pb.ListSessionsRequest(tenant_id="tenant-a")),
            ("Run", pb.RunRequest(tenant_id="tenant-a", session_id=sid, user_message="hi")),
            ("Resume", pb.ResumeRequest(tenant_id="tenant-a", session_id=sid)),
            ("Cancel", pb.CancelRequest(tenant_id="tenant-a", session_id=sid)),
            ("SubmitApproval", pb.SubmitApprovalRequest(tenant_id="tenant-a", session_id=sid, approval_id="x",
                                                        decision=pb.APPROVAL_DECISION_APPROVE_ONCE)),
            ("EnqueueTask", pb.EnqueueTaskRequest(tenant_id="tenant-a", session_id=sid, user_message="hi")),
            ("GetTask", pb.GetTaskRequest(tenant_id="tenant-a", task_id="t")),
            ("CreateSession", pb.CreateSessionRequest(tenant_id="tenant-a")),
            ("CancelTask", pb.CancelTaskRequest(tenant_id="tenant-a", task_id="t")),
            ("CreateWebhook", pb.CreateWebhookRequest(tenant_id="tenant-a", url="https://example.com/hook",
                                                      event_types=["run.final"])),
            ("ListWebhooks", pb.ListWebhooksRequest(tenant_id="tenant-a")),
            ("DeleteWebhook", pb.DeleteWebhookRequest(tenant_id="tenant-a", webhook_id="w")),
            ("ListDeadDeliveries", pb.ListDeadDeliveriesRequest(tenant_id="tenant-a")),
            ("ReplayDeliveries", pb.ReplayDeliveriesRequest(tenant_id="tenant-a")),
        ]
        methods = {m.name for m in pb.DESCRIPTOR.services_by_name["AgentService"].methods}
        assert {name for name, _ in naming_a} == methods, "every AgentService RPC takes tenant_id"
        for name, request in naming_a:
            err = _call(channel, f"/llmesh.orchestrator.v1.AgentService/{name}",
                        pb.DESCRIPTOR.services_by_name["AgentService"].methods_by_name[name], request, _auth(key_b))
            assert err is not None and err.code() == grpc.StatusCode.PERMISSION_DENIED, (name, err)
            assert _reason(err) == "TENANT_MISMATCH", (name, err.details())
        # Naming no tenant, B reads its own tenant: A's session is not there.
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=_auth(key_b), timeout=10)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        listed = stub.ListSessions(pb.ListSessionsRequest(), metadata=_auth(key_b), timeout=10)
        assert sid not in {s.session_id for s in listed.sessions}
        assert stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=_auth(key_a), timeout=10).session


def test_inference_binds_tenant_to_the_key(mesh) -> None:
    key_b = _key(mesh, "tenant-b")
    with _channel(mesh, "inference") as channel:
        method = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].methods_by_name["Generate"]
        request = inference_pb2.GenerateRequest(tenant_id="tenant-a", prompt="hi",
                                                sampling=inference_pb2.SamplingParams(max_tokens=1))
        err = _call(channel, "/llmesh.inference.v1.InferenceService/Generate", method, request, _auth(key_b))
        assert err is not None and _reason(err) == "TENANT_MISMATCH"
        request.tenant_id = ""
        assert _call(channel, "/llmesh.inference.v1.InferenceService/Generate", method, request, _auth(key_b)) is None


async def test_refusals_are_counted_and_written_to_the_callers_audit_chain(mesh) -> None:
    key_a = _key(mesh, "tenant-audit")
    with _channel(mesh, "orchestrator") as channel:
        err = _call(channel, "/llmesh.orchestrator.v1.AgentService/ListSessions",
                    pb.DESCRIPTOR.services_by_name["AgentService"].methods_by_name["ListSessions"],
                    pb.ListSessionsRequest(tenant_id="someone-else"), _auth(key_a))
        assert _reason(err) == "TENANT_MISMATCH"
    entries: list[dict] = []
    async with open_channel(mesh.target("policy"), mesh.credentials, tls=mesh.tls) as channel:
        stub = policy_pb2_grpc.PolicyServiceStub(channel)

        async def audited() -> bool:
            reply = await stub.ListAudit(policy_pb2.ListAuditRequest(), metadata=_auth(key_a), timeout=10)
            entries[:] = [json.loads(e.payload_json) for e in reply.entries]
            return any(e.get("type") == "access_denied" for e in entries)

        # Refusals reach policy in batches, once a second.
        assert await wait_until(audited, timeout_s=30, interval_s=0.2), entries
        denied = [e for e in entries if e.get("type") == "access_denied"]
        assert denied[0]["reason"] == "TENANT_MISMATCH", denied
        assert denied[0]["method"] == "/llmesh.orchestrator.v1.AgentService/ListSessions"
        assert denied[0]["service"] == "orchestrator" and denied[0]["caller"] == "client"
        verified = await stub.VerifyAudit(policy_pb2.VerifyAuditRequest(), metadata=_auth(key_a), timeout=10)
        assert verified.ok, verified
    metrics_port = mesh.base + 1 + 100  # the orchestrator's metrics port (port + 100)
    text = await asyncio.to_thread(_read_url, f"http://127.0.0.1:{metrics_port}/metrics")
    counted = [line for line in text.splitlines() if line.startswith("llmesh_auth_refusals_total{")
               and 'reason="TENANT_MISMATCH"' in line and "AgentService/ListSessions" in line]
    assert counted and float(counted[0].rsplit(" ", 1)[1]) >= 1, counted


@pytest.fixture(scope="module")
def tls_mesh(tmp_path_factory) -> Iterator[LaunchedMesh]:
    with launched_mesh(tmp_path_factory.mktemp("zero-trust-tls"), tls=True) as running:
        yield running


def _tls_channel(mesh: LaunchedMesh, *, cert: bool = True, credentials=None) -> grpc.Channel:
    files = tls_files(credentials or mesh.credentials, "client")
    ca = tls_files(mesh.credentials, "client").ca.read_bytes()
    creds = grpc.ssl_channel_credentials(ca, files.key.read_bytes() if cert else None,
                                         files.cert.read_bytes() if cert else None)
    return grpc.secure_channel(mesh.target("orchestrator"), creds)


def test_mtls_refuses_clients_without_a_mesh_certificate(tls_mesh, tmp_path) -> None:
    key = _key(tls_mesh, "tenant-a")
    request = pb.ListSessionsRequest()
    with _tls_channel(tls_mesh) as channel:
        assert pb_grpc.AgentServiceStub(channel).ListSessions(request, metadata=_auth(key), timeout=30) is not None
    with _tls_channel(tls_mesh, cert=False) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            pb_grpc.AgentServiceStub(channel).ListSessions(request, metadata=_auth(key), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    other = tmp_path / "other-ca"
    init_tls(other, names=("client",))
    with _tls_channel(tls_mesh, credentials=other) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            pb_grpc.AgentServiceStub(channel).ListSessions(request, metadata=_auth(key), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(tls_mesh.target("orchestrator")) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            pb_grpc.AgentServiceStub(channel).ListSessions(request, metadata=_auth(key), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_turn_runs_through_the_mesh_with_mtls(tls_mesh) -> None:
    """Services reach each other over mutual TLS with their own certificates and keys."""
    key = _key(tls_mesh, "tenant-a")
    with _tls_channel(tls_mesh) as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        session = stub.CreateSession(pb.CreateSessionRequest(title="tls"), metadata=_auth(key), timeout=30).session
        events = [r.event for r in stub.Run(pb.RunRequest(
            session_id=session.session_id, user_message="say hi",
            options=pb.RunOptions(max_steps=1, max_tokens=4, tool_choice="none", seed=1)),
            metadata=_auth(key), timeout=120)]
        assert events[-1].type == pb.EVENT_TYPE_FINAL, events[-1]


def test_the_same_session_id_under_two_tenants_names_two_sessions(mesh) -> None:
    """Tenant B naming tenant A's session id gets none of A's KV cells (nor can it
    probe A's conversation by the cached-token count)."""
    key_a, key_b = _key(mesh, "tenant-a"), _key(mesh, "tenant-b")
    prompt = "The lighthouse keeper counted the ships that passed in the night, one by one, until dawn."

    def usage(key: str) -> inference_pb2.Usage:
        with _channel(mesh, "inference") as channel:
            from llmesh.inference.v1 import inference_pb2_grpc

            replies = list(inference_pb2_grpc.InferenceServiceStub(channel).Generate(
                inference_pb2.GenerateRequest(session_id="shared-id", prompt=prompt, skip_cache=True,
                                              sampling=inference_pb2.SamplingParams(max_tokens=1, temperature=0)),
                metadata=_auth(key), timeout=60))
        return replies[-1].usage

    usage(key_a)
    assert usage(key_a).cached_tokens > 0, "a session's second turn reuses its own cells"
    assert usage(key_b).cached_tokens == 0
