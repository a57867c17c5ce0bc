"""StoreService over a real in-process gRPC server, on SQLite and PostgreSQL."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from llmesh.store.v1 import store_pb2 as pb
from llmesh.store.v1 import store_pb2_grpc

from services.common.interceptors import error_info
from services.common.runtime import running_service
from services.store.config import Settings
from services.store.server import App
from tests.support.auth import service_channel


@pytest.fixture
async def stub(db_url: str, tmp_path: Path) -> AsyncIterator[store_pb2_grpc.StoreServiceStub]:
    settings = Settings(port=0, data_dir=str(tmp_path), database_url=db_url, lease_sweep_interval_ms=50,
                        task_backoff_base_ms=10)
    async with running_service(App(settings), settings) as svc:
        # The orchestrator is the store's main caller (policy and tools may call it too).
        async with service_channel(f"127.0.0.1:{svc.port}", "orchestrator") as channel:
            yield store_pb2_grpc.StoreServiceStub(channel)


async def expect_error(call, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == code, err.value.details()
    return err.value


async def new_session(stub, tenant: str = "acme", session_id: str = "s1") -> pb.Session:
    reply = await stub.CreateSession(pb.CreateSessionRequest(tenant_id=tenant, session_id=session_id, title="t"))
    return reply.session


async def test_one_tenant_cannot_read_another_tenants_session(stub) -> None:
    await new_session(stub, "acme", "s1")
    await stub.AppendEvents(pb.AppendEventsRequest(tenant_id="acme", session_id="s1",
                                                   events=[pb.Event(type="final", payload=b"secret")]))
    for call in (stub.GetSession(pb.GetSessionRequest(tenant_id="evil", session_id="s1")),
                 stub.ReadEvents(pb.ReadEventsRequest(tenant_id="evil", session_id="s1")),
                 stub.ListMessages(pb.ListMessagesRequest(tenant_id="evil", session_id="s1"))):
        err = await expect_error(call, grpc.StatusCode.NOT_FOUND)
        assert error_info(err).reason == "SESSION_NOT_FOUND"
    await expect_error(stub.AppendEvents(pb.AppendEventsRequest(
        tenant_id="evil", session_id="s1", events=[pb.Event(type="final")])), grpc.StatusCode.NOT_FOUND)
    listed = await stub.ListSessions(pb.ListSessionsRequest(tenant_id="evil"))
    assert list(listed.sessions) == []
    read = await stub.ReadEvents(pb.ReadEventsRequest(tenant_id="acme", session_id="s1"))
    assert [e.payload for e in read.events] == [b"secret"]


async def test_retried_append_and_enqueue_create_nothing_twice(stub) -> None:
    await new_session(stub)
    request = pb.AppendEventsRequest(request_id="r-1", tenant_id="acme", session_id="s1",
                                     events=[pb.Event(type="token", payload=b"a"), pb.Event(type="final")])
    first = await stub.AppendEvents(request)
    second = await stub.AppendEvents(request)
    assert list(first.seqs) == list(second.seqs) == [1, 2]
    keyed = pb.AppendEventsRequest(tenant_id="acme", session_id="s1",
                                   events=[pb.Event(type="tool_result", idempotency_key="call-7")])
    assert list((await stub.AppendEvents(keyed)).seqs) == [3]
    assert list((await stub.AppendEvents(keyed)).seqs) == [3]
    events = (await stub.ReadEvents(pb.ReadEventsRequest(tenant_id="acme", session_id="s1"))).events
    assert [e.seq for e in events] == [1, 2, 3]

    enqueue = pb.EnqueueTaskRequest(request_id="e-1", tenant_id="acme", queue="agents", payload_json='{"x": 1}')
    a, b = await stub.EnqueueTask(enqueue), await stub.EnqueueTask(enqueue)
    assert a.created and not b.created and a.task.task_id == b.task.task_id
    claimed = await stub.ClaimTasks(pb.ClaimTasksRequest(queue="agents", worker_id="w", max_tasks=10, lease_ms=5000))
    assert len(claimed.tasks) == 1

    create = pb.CreateSessionRequest(request_id="c-1", tenant_id="acme", title="once")
    s1, s2 = await stub.CreateSession(create), await stub.CreateSession(create)
    assert s1.session.session_id == s2.session.session_id


async def test_malformed_or_oversized_request_is_invalid_and_writes_nothing(stub) -> None:
    await new_session(stub)
    cases = [
        (pb.AppendEventsRequest(tenant_id="acme", session_id="s1",
                                events=[pb.Event(type="final"), pb.Event(type="token", payload=b"x" * (1 << 20 + 1))]),
         "events[1].payload"),
        (pb.AppendEventsRequest(tenant_id="", session_id="s1", events=[pb.Event(type="final")]), "tenant_id"),
        (pb.AppendEventsRequest(tenant_id="acme", session_id="s1", events=[pb.Event(type="")]), "events[0].type"),
    ]
    for request, field in cases:
        err = await expect_error(stub.AppendEvents(request), grpc.StatusCode.INVALID_ARGUMENT)
        assert error_info(err).metadata["field"] == field
    err = await expect_error(stub.AppendMessages(pb.AppendMessagesRequest(
        tenant_id="acme", session_id="s1", messages=[pb.Message(role="user", content="ok"),
                                                     pb.Message(role="user", metadata_json="{nope")])),
        grpc.StatusCode.INVALID_ARGUMENT)
    assert error_info(err).metadata["field"] == "messages[1].metadata_json"
    err = await expect_error(stub.ReadEvents(pb.ReadEventsRequest(tenant_id="acme", session_id="s1",
                                                                  page_token="garbage!")),
                             grpc.StatusCode.INVALID_ARGUMENT)
    assert error_info(err).metadata["field"] == "page_token"
    await expect_error(stub.EnqueueTask(pb.EnqueueTaskRequest(tenant_id="acme", queue="q", payload_json="{bad")),
                       grpc.StatusCode.INVALID_ARGUMENT)
    events = await stub.ReadEvents(pb.ReadEventsRequest(tenant_id="acme", session_id="s1"))
    messages = await stub.ListMessages(pb.ListMessagesRequest(tenant_id="acme", session_id="s1"))
    claimed = await stub.ClaimTasks(pb.ClaimTasksRequest(queue="q", worker_id="w", max_tasks=5, lease_ms=1000))
    assert not events.events and not messages.messages and not claimed.tasks


async def test_history_paging_and_messages_after_position(stub) -> None:
    await new_session(stub)
    await stub.AppendMessages(pb.AppendMessagesRequest(tenant_id="acme", session_id="s1", messages=[
        pb.Message(role="user", content=f"m{i}") for i in range(5)]))
    seen, token = [], ""
    while True:
        page = await stub.ListMessages(pb.ListMessagesRequest(tenant_id="acme", session_id="s1", page_size=2,
                                                              page_token=token))
        seen += [m.content for m in page.messages]
        token = page.next_page_token
        if not token:
            break
    assert seen == [f"m{i}" for i in range(5)]
    tail = await stub.ListMessages(pb.ListMessagesRequest(tenant_id="acme", session_id="s1", after_position=3))
    assert [m.position for m in tail.messages] == [4, 5]


async def test_watch_replays_then_follows_live_appends(stub) -> None:
    await new_session(stub)
    await stub.AppendEvents(pb.AppendEventsRequest(tenant_id="acme", session_id="s1", events=[
        pb.Event(type="token", payload=b"1"), pb.Event(type="token", payload=b"2")]))
    call = stub.WatchEvents(pb.WatchEventsRequest(tenant_id="acme", session_id="s1", after_seq=1))
    first = await asyncio.wait_for(call.read(), 5)
    assert first.event.seq == 2
    await stub.AppendEvents(pb.AppendEventsRequest(tenant_id="acme", session_id="s1",
                                                   events=[pb.Event(type="final", payload=b"3")]))
    # Far below watch_recheck_ms: it arrived because the commit woke the stream.
    live = await asyncio.wait_for(call.read(), 0.5)
    assert (live.event.seq, live.event.payload) == (3, b"3")
    call.cancel()


async def test_expired_lease_is_reclaimed_by_another_worker(stub) -> None:
    await stub.EnqueueTask(pb.EnqueueTaskRequest(tenant_id="acme", queue="q", max_attempts=3))
    [lost] = (await stub.ClaimTasks(pb.ClaimTasksRequest(queue="q", worker_id="w1", max_tasks=1,
                                                         lease_ms=100))).tasks
    await asyncio.sleep(0.3)  # lease runs out; the sweeper (every 50 ms) frees it
    [task] = (await stub.ClaimTasks(pb.ClaimTasksRequest(queue="q", worker_id="w2", max_tasks=1,
                                                         lease_ms=5000))).tasks
    assert task.task_id == lost.task_id and task.attempts == 2
    err = await expect_error(stub.AckTask(pb.AckTaskRequest(task_id=lost.task_id, lease_token=lost.lease_token)),
                             grpc.StatusCode.FAILED_PRECONDITION)
    assert error_info(err).reason == "LEASE_LOST"
    failed = await stub.FailTask(pb.FailTaskRequest(task_id=task.task_id, lease_token=task.lease_token,
                                                    error="boom", permanent=True))
    assert failed.task.state == pb.TASK_STATE_DEAD


async def test_session_lock_and_audit_chain(stub) -> None:
    got = await stub.AcquireSessionLock(pb.AcquireSessionLockRequest(tenant_id="acme", session_id="s1",
                                                                     owner_id="r1", lease_ms=10_000))
    denied = await stub.AcquireSessionLock(pb.AcquireSessionLockRequest(tenant_id="acme", session_id="s1",
                                                                        owner_id="r2", lease_ms=10_000))
    assert got.acquired and not denied.acquired and denied.holder_id == "r1"
    entry = pb.AuditEntry(tenant_id="acme", seq=1, entry_hash="h1", payload_json="{}")
    await stub.AppendAudit(pb.AppendAuditRequest(entry=entry))
    err = await expect_error(stub.AppendAudit(pb.AppendAuditRequest(entry=pb.AuditEntry(
        tenant_id="acme", seq=2, prev_hash="not-h1", entry_hash="h2"))), grpc.StatusCode.ABORTED)
    assert error_info(err).reason == "AUDIT_HEAD_MOVED"
    head = await stub.GetAuditHead(pb.GetAuditHeadRequest(tenant_id="acme"))
    assert (head.seq, head.entry_hash) == (1, "h1")


async def test_lock_holder_learns_the_next_event_seq_and_no_drop_is_accepted(stub) -> None:
    session = (await stub.CreateSession(pb.CreateSessionRequest(tenant_id="acme", session_id="seqs"))).session
    fresh = await stub.AcquireSessionLock(pb.AcquireSessionLockRequest(
        tenant_id="acme", session_id=session.session_id, owner_id="r1", lease_ms=10_000))
    assert fresh.acquired and fresh.next_event_seq == 1
    appended = await stub.AppendEvents(pb.AppendEventsRequest(
        request_id="batch-1", tenant_id="acme", session_id=session.session_id, no_drop=True,
        events=[pb.Event(type="token", payload=b"{}") for _ in range(3)]))
    assert list(appended.seqs) == [1, 2, 3] and appended.num_dropped == 0
    await stub.ReleaseSessionLock(pb.ReleaseSessionLockRequest(tenant_id="acme", session_id=session.session_id,
                                                               owner_id="r1"))
    again = await stub.AcquireSessionLock(pb.AcquireSessionLockRequest(
        tenant_id="acme", session_id=session.session_id, owner_id="r2", lease_ms=10_000))
    assert again.acquired and again.next_event_seq == 4
    denied = await stub.AcquireSessionLock(pb.AcquireSessionLockRequest(
        tenant_id="acme", session_id=session.session_id, owner_id="r3", lease_ms=10_000))
    assert not denied.acquired and denied.next_event_seq == 0
