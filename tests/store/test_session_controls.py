"""Session controls: post (validated, idempotent per tenant), watch (replay, follow, filter)."""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from llmesh.store.v1 import store_pb2 as pb

from services.common.authz import PRINCIPAL_HEADER
from services.store.core.models import ControlKind, NewSessionControl
from tests.store.served import expect_error, new_session, store_replica, stub_for

# Generous: how long a watcher may take to see a commit on a loaded machine.
DEADLINE_S = 5.0


@pytest.fixture
async def orchestrator(db_url: str, tmp_path: Path) -> AsyncIterator:
    async with store_replica(db_url, tmp_path / "store") as address, stub_for(address, "orchestrator") as stub:
        for tenant, session in (("acme", "s1"), ("acme", "s2"), ("globex", "s1")):
            await new_session(stub, tenant, session)
        yield stub


def control(tenant: str = "acme", session: str = "s1", kind: str = "cancel", payload: str = '{"reason": "user"}',
            run_id: str = "") -> pb.SessionControl:
    return pb.SessionControl(tenant_id=tenant, session_id=session, kind=kind, payload_json=payload, run_id=run_id)


async def post(stub, request_id: str = "", **kwargs) -> pb.SessionControl:
    return (await stub.PostSessionControl(pb.PostSessionControlRequest(request_id=request_id,
                                                                       control=control(**kwargs)))).control


async def read(call) -> pb.WatchSessionControlsResponse:
    return await asyncio.wait_for(call.read(), DEADLINE_S)


async def test_a_posted_control_is_stored_once_per_tenant_request_id(orchestrator) -> None:
    first = await post(orchestrator, "cancel-1", run_id="run-7")
    assert first.seq > 0 and first.kind == "cancel" and first.run_id == "run-7"
    assert json.loads(first.payload_json) == {"reason": "user"} and first.create_time.ToMilliseconds() > 0
    again = await post(orchestrator, "cancel-1", payload='{"reason": "retried"}')
    assert again == first
    # The same request id in another tenant is another control.
    elsewhere = await post(orchestrator, "cancel-1", tenant="globex")
    assert elsewhere.seq > first.seq
    without_id = [await post(orchestrator, kind="approval", payload='{"approval_id": "a1"}') for _ in range(2)]
    assert without_id[0].seq < without_id[1].seq


async def test_posting_validates_every_field(orchestrator) -> None:
    cases = [
        (control(kind="pause"), "control.kind"),
        (control(kind=""), "control.kind"),
        (control(payload="[1, 2]"), "control.payload_json"),
        (control(payload="{nope"), "control.payload_json"),
        (control(tenant=""), "control.tenant_id"),
        (control(session="bad id"), "control.session_id"),
        (control(run_id="bad id"), "control.run_id"),
        (pb.SessionControl(tenant_id="acme", session_id="s1", kind="cancel", seq=5), "control.seq"),
    ]
    for body, field in cases:
        await expect_error(orchestrator.PostSessionControl(pb.PostSessionControlRequest(control=body)),
                           grpc.StatusCode.INVALID_ARGUMENT, field=field)
    stamped = control()
    stamped.create_time.FromMilliseconds(1)
    await expect_error(orchestrator.PostSessionControl(pb.PostSessionControlRequest(control=stamped)),
                       grpc.StatusCode.INVALID_ARGUMENT, field="control.create_time")
    await expect_error(orchestrator.PostSessionControl(pb.PostSessionControlRequest(
        request_id="no spaces", control=control())), grpc.StatusCode.INVALID_ARGUMENT, field="request_id")
    for tenant, session in (("acme", "unknown"), ("evil", "s1")):
        await expect_error(orchestrator.PostSessionControl(pb.PostSessionControlRequest(
            control=control(tenant=tenant, session=session))), grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")
    # Nothing of the above was stored.
    call = orchestrator.WatchSessionControls(pb.WatchSessionControlsRequest(tenant_id=""))
    assert (await read(call)).seq == 0
    call.cancel()


async def test_a_watch_replays_in_order_then_follows_its_tenant_and_session_only(orchestrator) -> None:
    posted = [await post(orchestrator, f"c{i}", tenant=t, session=s)
              for i, (t, s) in enumerate([("acme", "s1"), ("globex", "s1"), ("acme", "s2"), ("acme", "s1")])]
    head = posted[-1].seq

    everything = orchestrator.WatchSessionControls(pb.WatchSessionControlsRequest())
    tenant_only = orchestrator.WatchSessionControls(pb.WatchSessionControlsRequest(tenant_id="acme"))
    one_session = orchestrator.WatchSessionControls(pb.WatchSessionControlsRequest(
        tenant_id="acme", session_id="s1", after_seq=posted[0].seq))
    from_now = orchestrator.WatchSessionControls(pb.WatchSessionControlsRequest(tenant_id="acme", from_now=True))
    for call in (everything, tenant_only, one_session, from_now):
        live = await read(call)  # first: no control, the current seq
        assert not live.HasField("control") and live.seq == head
    assert [(await read(everything)).control for _ in range(4)] == posted
    assert [(await read(tenant_only)).control.seq for _ in range(3)] == [posted[0].seq, posted[2].seq, head]
    assert (await read(one_session)).control == posted[3]

    # Live: each watch gets only what matches it, in order, with the seq repeated.
    later = [await post(orchestrator, "l1", tenant="globex"), await post(orchestrator, "l2", session="s2"),
             await post(orchestrator, "l3", kind="approval", payload='{"approval_id": "a9"}')]
    assert [(await read(everything)).control for _ in range(3)] == later
    got = await read(from_now)
    assert (got.control, got.seq) == (later[1], later[1].seq)
    assert (await read(from_now)).control == later[2]
    assert (await read(one_session)).control == later[2]
    for call in (everything, tenant_only, one_session, from_now):
        call.cancel()


async def test_watch_requests_are_validated(orchestrator) -> None:
    for request, field in ((pb.WatchSessionControlsRequest(after_seq=3, from_now=True), "after_seq"),
                           (pb.WatchSessionControlsRequest(after_seq=-1), "after_seq"),
                           (pb.WatchSessionControlsRequest(session_id="s1"), "session_id"),
                           (pb.WatchSessionControlsRequest(tenant_id="bad id"), "tenant_id")):
        await expect_error(orchestrator.WatchSessionControls(request).read(), grpc.StatusCode.INVALID_ARGUMENT,
                           field=field)


async def test_a_call_acting_for_a_client_sees_only_that_clients_tenant(orchestrator) -> None:
    acme, globex = await post(orchestrator, "a", tenant="acme"), await post(orchestrator, "g", tenant="globex")
    principal = json.dumps({"tenant_id": "acme", "key_id": "k1", "role": "developer"})
    # An empty tenant_id is bound to the client's tenant: never every tenant.
    call = orchestrator.WatchSessionControls(pb.WatchSessionControlsRequest(), metadata=[(PRINCIPAL_HEADER,
                                                                                          principal)])
    assert (await read(call)).seq == globex.seq
    assert (await read(call)).control == acme
    call.cancel()
    await expect_error(orchestrator.WatchSessionControls(
        pb.WatchSessionControlsRequest(tenant_id="globex"), metadata=[(PRINCIPAL_HEADER, principal)]).read(),
        grpc.StatusCode.PERMISSION_DENIED, "TENANT_MISMATCH")
    await expect_error(orchestrator.PostSessionControl(
        pb.PostSessionControlRequest(control=control(tenant="globex")), metadata=[(PRINCIPAL_HEADER, principal)]),
        grpc.StatusCode.PERMISSION_DENIED, "TENANT_MISMATCH", "control.tenant_id")
    filled = await orchestrator.PostSessionControl(pb.PostSessionControlRequest(control=control(tenant="")),
                                                   metadata=[(PRINCIPAL_HEADER, principal)])
    assert filled.control.tenant_id == "acme"


async def test_only_the_orchestrator_may_post_or_watch_controls(db_url: str, tmp_path: Path) -> None:
    async with store_replica(db_url, tmp_path / "store") as address, stub_for(address, "policy") as stub:
        await expect_error(stub.PostSessionControl(pb.PostSessionControlRequest(control=control())),
                           grpc.StatusCode.PERMISSION_DENIED, "RPC_NOT_ALLOWED")
        await expect_error(stub.WatchSessionControls(pb.WatchSessionControlsRequest()).read(),
                           grpc.StatusCode.PERMISSION_DENIED, "RPC_NOT_ALLOWED")


async def test_the_core_refuses_every_tenant_to_a_client(repo) -> None:
    from services.common.errors import PermissionDenied
    from services.store.core.session_controls import SessionControlBoard
    from services.store.core.watch_hub import WatchHub

    board = SessionControlBoard(repo, WatchHub(), lambda: 1_000)
    with pytest.raises(PermissionDenied) as err:
        await anext(board.watch(0, False, "", "", all_tenants_allowed=False))
    assert err.value.reason == "ALL_TENANTS_NOT_ALLOWED" and err.value.field == "tenant_id"


async def test_retention_deletes_old_controls(repo) -> None:
    from services.store.core.models import NewSession

    await repo.create_session(NewSession("acme", "s1", "t", "", ""), 1)
    for now in (100, 200, 5_000):
        await repo.post_session_control(NewSessionControl("acme", "s1", ControlKind.CANCEL, "", "{}", ""), now)
    assert await repo.delete_old_session_controls(1_000, 10) == 2
    assert [c.create_ms for c in await repo.session_controls_after(0, "acme", "", 10)] == [5_000]
