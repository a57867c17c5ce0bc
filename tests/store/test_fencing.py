"""Fencing: appends carrying a session lock's fencing token fail once the lock changed hands."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from llmesh.store.v1 import store_pb2 as pb

from services.common.errors import FailedPrecondition, NotFound
from services.store.core.models import EventAppend, NewEvent, NewMessage, NewSession
from tests.store.served import expect_error, new_session, store_replica, stub_for


def events(n: int = 1, kind: str = "final") -> list[NewEvent]:
    return [NewEvent(kind, b"{}", "", 1) for _ in range(n)]


async def test_a_stale_append_in_a_batch_fails_alone_and_writes_nothing(repo) -> None:
    for session_id in ("a", "b"):
        await repo.create_session(NewSession("acme", session_id, "t", "", ""), 1)
    old = await repo.acquire_lock("acme", "a", "r1", 1_000, 10)
    await repo.release_lock("acme", "a", "r1")
    new = await repo.acquire_lock("acme", "a", "r2", 1_000, 20)
    assert new.fencing_token == old.fencing_token + 1
    other = await repo.acquire_lock("acme", "b", "r1", 1_000, 20)

    results = await repo.append_events([
        EventAppend("acme", "a", events(2), fencing_token=old.fencing_token),  # the old holder, still writing
        EventAppend("acme", "b", events(1), fencing_token=other.fencing_token),
        EventAppend("acme", "a", events(1), fencing_token=new.fencing_token),
        EventAppend("acme", "a", events(1)),  # unfenced (an older client)
        EventAppend("acme", "missing", events(1), fencing_token=5),
    ], 30)
    stale = results[0]
    assert isinstance(stale, FailedPrecondition)
    assert stale.reason == "STALE_LOCK_OWNER" and stale.field == "fencing_token"
    assert "fencing_token" in stale.message
    assert results[1:4] == [[1], [1], [2]]
    assert isinstance(results[4], NotFound)
    assert [e.seq for e in await repo.read_events("acme", "a", 0, 10)] == [1, 2]


async def test_a_token_for_a_session_never_locked_is_stale(repo) -> None:
    await repo.create_session(NewSession("acme", "s", "t", "", ""), 1)
    [result] = await repo.append_events([EventAppend("acme", "s", events(), fencing_token=1)], 2)
    assert isinstance(result, FailedPrecondition) and result.reason == "STALE_LOCK_OWNER"


async def test_messages_are_fenced_too(repo) -> None:
    await repo.create_session(NewSession("acme", "s", "t", "", ""), 1)
    first = await repo.acquire_lock("acme", "s", "r1", 1_000, 10)
    msg = [NewMessage("user", "hi", "", 1)]
    assert await repo.append_messages("acme", "s", msg, "m1", 11, first.fencing_token) == [1]
    # The lease lapses and another replica takes the lock.
    second = await repo.acquire_lock("acme", "s", "r2", 1_000, 5_000)
    with pytest.raises(FailedPrecondition) as err:
        await repo.append_messages("acme", "s", msg, "m2", 5_001, first.fencing_token)
    assert err.value.reason == "STALE_LOCK_OWNER" and err.value.field == "fencing_token"
    assert await repo.append_messages("acme", "s", msg, "m3", 5_002, second.fencing_token) == [2]
    assert [m.position for m in await repo.list_messages("acme", "s", 0, 10)] == [1, 2]


@pytest.fixture
async def stub(db_url: str, tmp_path: Path) -> AsyncIterator:
    async with store_replica(db_url, tmp_path / "store") as address, stub_for(address, "orchestrator") as stub:
        yield stub


async def lock(stub, owner: str, session_id: str = "s1") -> pb.AcquireSessionLockResponse:
    grant = await stub.AcquireSessionLock(pb.AcquireSessionLockRequest(tenant_id="acme", session_id=session_id,
                                                                       owner_id=owner, lease_ms=60_000))
    assert grant.acquired
    return grant


async def test_the_old_holders_appends_are_refused_over_grpc_and_the_new_holders_land(stub) -> None:
    await new_session(stub)
    old = await lock(stub, "r1")
    fenced = pb.AppendEventsRequest(tenant_id="acme", session_id="s1", fencing_token=old.fencing_token,
                                    no_drop=True, events=[pb.Event(type="final", payload=b"1")])
    assert list((await stub.AppendEvents(fenced)).seqs) == [1]
    await stub.ReleaseSessionLock(pb.ReleaseSessionLockRequest(tenant_id="acme", session_id="s1", owner_id="r1"))
    new = await lock(stub, "r2")

    await expect_error(stub.AppendEvents(fenced), grpc.StatusCode.FAILED_PRECONDITION, "STALE_LOCK_OWNER",
                       "fencing_token")
    await expect_error(stub.AppendMessages(pb.AppendMessagesRequest(
        tenant_id="acme", session_id="s1", fencing_token=old.fencing_token,
        messages=[pb.Message(role="user", content="late")])),
        grpc.StatusCode.FAILED_PRECONDITION, "STALE_LOCK_OWNER", "fencing_token")
    await expect_error(stub.AppendEvents(pb.AppendEventsRequest(
        tenant_id="acme", session_id="s1", fencing_token=-1, events=[pb.Event(type="final")])),
        grpc.StatusCode.INVALID_ARGUMENT, field="fencing_token")

    # Requests of both holders in flight together (the writer batches them): only the stale one fails.
    stale, fresh, unfenced = await asyncio.gather(
        stub.AppendEvents(fenced),
        stub.AppendEvents(pb.AppendEventsRequest(tenant_id="acme", session_id="s1", fencing_token=new.fencing_token,
                                                 events=[pb.Event(type="final", payload=b"2")])),
        stub.AppendEvents(pb.AppendEventsRequest(tenant_id="acme", session_id="s1",
                                                 events=[pb.Event(type="final", payload=b"3")])),
        return_exceptions=True)
    assert isinstance(stale, grpc.aio.AioRpcError) and stale.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert not isinstance(fresh, BaseException) and not isinstance(unfenced, BaseException)
    assert sorted([*fresh.seqs, *unfenced.seqs]) == [2, 3]
    stored = (await stub.ReadEvents(pb.ReadEventsRequest(tenant_id="acme", session_id="s1"))).events
    assert sorted(e.payload for e in stored) == [b"1", b"2", b"3"]
    messages = await stub.ListMessages(pb.ListMessagesRequest(tenant_id="acme", session_id="s1"))
    assert list(messages.messages) == []
