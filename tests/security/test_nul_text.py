"""Text a backend cannot store, and integers a column cannot hold, are INVALID_ARGUMENT on every backend.

NUL cannot be stored in PostgreSQL text and would be kept as is by SQLite; a
page token may name a cursor past int64. Each is refused at the store's
input boundary, naming the field, with nothing written, on SQLite and on a
real throw-away PostgreSQL cluster (tests/support/postgres.py); through the
REST layer the refusal is a 400.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from llmesh.store.v1 import store_pb2 as pb
from llmesh.store.v1 import store_pb2_grpc

from services.common import errors
from services.common.auth import ApiKeyAuthenticator, ApiKeyStore, FailedAttemptLimiter, generate_api_key
from services.common.interceptors import error_info
from services.common.runtime import running_service
from services.gateway.config import Settings as GatewaySettings
from services.gateway.server import build_app as build_gateway
from services.gateway.server import running_gateway
from services.orchestrator.config import Settings as OrchestratorSettings
from services.orchestrator.server import build_app as build_orchestrator
from services.store.config import Settings
from services.store.core.models import NewMessage, NewSession
from services.store.core.paging import encode_token
from services.store.server import App
from tests.gateway.conftest import TEST_SCRYPT_N
from tests.store.conftest import database_url
from tests.support.auth import service_channel
from tests.support.postgres import postgres_cluster_fixture

postgres_cluster = postgres_cluster_fixture()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return database_url(request.param, tmp_path, request)


@dataclass
class StoreUnderTest:
    stub: store_pb2_grpc.StoreServiceStub
    app: App
    target: str


@pytest.fixture
async def store(db_url: str, tmp_path: Path) -> AsyncIterator[StoreUnderTest]:
    settings = Settings(port=0, data_dir=str(tmp_path / "store"), database_url=db_url)
    app = App(settings)
    async with running_service(app, settings) as svc:
        target = f"127.0.0.1:{svc.port}"
        async with service_channel(target, "orchestrator") as channel:  # the store is the services' own
            yield StoreUnderTest(store_pb2_grpc.StoreServiceStub(channel), app, target)


async def refused(call, field: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert error_info(caught.value).metadata["field"] == field, caught.value.details()


async def test_nul_in_title_and_message_is_invalid_argument_and_stores_nothing(store):
    stub = store.stub
    await refused(stub.CreateSession(pb.CreateSessionRequest(tenant_id="acme", session_id="s0", title="a\x00b")),
                  "title")
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.GetSession(pb.GetSessionRequest(tenant_id="acme", session_id="s0"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND

    await stub.CreateSession(pb.CreateSessionRequest(tenant_id="acme", session_id="s1", title="fine"))
    good = pb.Message(role="user", content="hello")
    await refused(stub.AppendMessages(pb.AppendMessagesRequest(
        tenant_id="acme", session_id="s1", messages=[good, pb.Message(role="user", content="x\x00y")])),
        "messages[1].content")
    listed = await stub.ListMessages(pb.ListMessagesRequest(tenant_id="acme", session_id="s1"))
    assert list(listed.messages) == []  # the good message of the refused batch was not written either
    await refused(stub.AppendEvents(pb.AppendEventsRequest(
        tenant_id="acme", session_id="s1", events=[pb.Event(type="tok\x00en")])), "events[0].type")
    await refused(stub.AppendEvents(pb.AppendEventsRequest(
        tenant_id="acme", session_id="s1", events=[pb.Event(type="token", idempotency_key="k\x00")])),
        "events[0].idempotency_key")
    await refused(stub.CreateSession(pb.CreateSessionRequest(tenant_id="acme", metadata_json='{"a": "\x00"}')),
                  "metadata_json")

    other_text = pb.Message(role="user", content="tab\tnew\nline \u00e9 \U0001f600")
    stored = await stub.AppendMessages(pb.AppendMessagesRequest(tenant_id="acme", session_id="s1",
                                                                messages=[other_text]))
    assert list(stored.positions) == [1]


async def test_lone_surrogates_are_refused_for_every_caller_of_the_core(store):
    core = store.app.core
    with pytest.raises(errors.InvalidArgument) as caught:
        await core.create_session(NewSession("acme", "s2", "bad \ud800 title", "", ""))
    assert caught.value.metadata["field"] == "title"
    await core.create_session(NewSession("acme", "s2", "ok", "", ""))
    with pytest.raises(errors.InvalidArgument) as caught:
        await core.append_messages("acme", "s2", [NewMessage("user", "\udfff", "", 0)], "")
    assert caught.value.metadata["field"] == "messages[0].content"
    with pytest.raises(errors.InvalidArgument) as caught:
        await core.append_messages("acme", "s2", [NewMessage("user", "x", "", 2**40)], "")
    assert caught.value.metadata["field"] == "messages[0].num_tokens"


async def test_integers_past_the_columns_are_invalid_argument(store):
    stub = store.stub
    await stub.CreateSession(pb.CreateSessionRequest(tenant_id="acme", session_id="s1"))
    past_int64 = encode_token("events:acme:s1", 2**70)
    await refused(stub.ReadEvents(pb.ReadEventsRequest(tenant_id="acme", session_id="s1", page_token=past_int64)),
                  "page_token")
    await refused(stub.ListMessages(pb.ListMessagesRequest(
        tenant_id="acme", session_id="s1", page_token=encode_token("messages:acme:s1", -(2**70)))), "page_token")
    for cursor in (["not a number", "s1"], [2**70, "s1"], [1.5e300, "s1"], [1, "s\x00"]):
        await refused(stub.ListSessions(pb.ListSessionsRequest(
            tenant_id="acme", page_token=encode_token("sessions:acme", cursor))), "page_token")
    await refused(stub.ListAudit(pb.ListAuditRequest(tenant_id="acme", page_token=encode_token("audit:acme", 2**64))),
                  "page_token")
    with pytest.raises(errors.InvalidArgument) as caught:
        await store.app.core.read_events("acme", "s1", 2**63, 10, "")
    assert caught.value.metadata["field"] == "after_seq"
    read = await stub.ReadEvents(pb.ReadEventsRequest(tenant_id="acme", session_id="s1", after_seq=2**63 - 1))
    assert list(read.events) == []


async def test_rest_maps_the_refusal_to_400_naming_the_field(store, tmp_path: Path):
    """REST -> orchestrator -> store: the store's refusal comes back as a 400, not a 500."""
    unused = "127.0.0.1:1"  # creating a session reaches no other service
    orchestrator_settings = OrchestratorSettings(port=0, data_dir=str(tmp_path / "orchestrator"),
                                                 store_target=store.target, policy_target=unused,
                                                 tools_target=unused, inference_target=unused)
    key, record = generate_api_key("acme", n=TEST_SCRYPT_N)
    auth = ApiKeyAuthenticator(ApiKeyStore([record]), FailedAttemptLimiter())
    try:
        async with running_service(build_orchestrator(orchestrator_settings), orchestrator_settings) as orchestrator:
            gateway = build_gateway(GatewaySettings(port=0, orchestrator_target=f"127.0.0.1:{orchestrator.port}"),
                                    authenticator=auth)
            async with running_gateway(gateway) as url, \
                    httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
                raw_nul = await client.post("/v1/sessions", json={"title": "a\x00b"})
                escaped_nul = await client.post("/v1/sessions", content=b'{"title": "a\\u0000b"}')
                fine = await client.post("/v1/sessions", json={"title": "fine"})
    finally:
        auth.close()
    for response in (raw_nul, escaped_nul):
        assert response.status_code == 400, response.text
        info = response.json()["error"]["details"][0]
        assert info["metadata"]["field"] == "title" and "U+0000" in response.json()["error"]["message"]
    assert fine.status_code == 200 and fine.json()["session"]["title"] == "fine"
