"""Repository behaviour on SQLite and a real PostgreSQL cluster."""
from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import select, text

from services.common.errors import Aborted, FailedPrecondition, NotFound
from services.store.adapters.database import Database
from services.store.adapters.session_repository import known_keys_query, rows_with_keys, sessions_where
from services.store.adapters.tables import SessionRow
from services.store.core.models import AuditRecord, EventAppend, NewEvent, NewMessage, NewSession, NewTask, TaskState
from services.store.core.task_policy import RetryPolicy


async def make_session(repo, tenant: str = "acme", session: str = "s1") -> None:
    await repo.create_session(NewSession(tenant, session, "t", "", ""), 1_000)


def events(*types: str, keys: tuple[str, ...] = ()) -> list[NewEvent]:
    keys = keys or ("",) * len(types)
    return [NewEvent(t, f"{t}-{i}".encode(), k, 1) for i, (t, k) in enumerate(zip(types, keys, strict=True))]


async def test_event_seqs_are_gapless_per_session_and_retries_write_nothing(repo) -> None:
    await make_session(repo, session="a")
    await make_session(repo, session="b")
    first = await repo.append_events([
        EventAppend("acme", "a", events("token", "final", keys=("k1", "k2"))),
        EventAppend("acme", "b", events("token")),
        EventAppend("acme", "a", events("tool_result")),
    ], 2_000)
    assert first == [[1, 2], [1], [3]]
    retried = await repo.append_events([EventAppend("acme", "a", events("token", "final", keys=("k1", "k2")))], 3_000)
    assert retried == [[1, 2]]
    stored = await repo.read_events("acme", "a", 0, 100)
    assert [e.seq for e in stored] == [1, 2, 3]
    assert [e.type for e in stored] == ["token", "final", "tool_result"]


async def test_append_to_missing_session_fails_alone(repo) -> None:
    await make_session(repo, session="a")
    result = await repo.append_events([EventAppend("acme", "a", events("x")),
                                       EventAppend("other", "a", events("x"))], 1)
    assert result[0] == [1]
    assert isinstance(result[1], NotFound)
    assert await repo.read_events("other", "a", 0, 10) == []


async def test_sessions_are_tenant_scoped(repo) -> None:
    await make_session(repo, "acme", "shared-id")
    assert await repo.get_session("evil", "shared-id") is None
    assert (await repo.get_session("acme", "shared-id")).tenant_id == "acme"
    assert await repo.list_sessions("evil", None, 10) == []


async def test_messages_positions_and_retry(repo) -> None:
    await make_session(repo)
    msgs = [NewMessage("user", "hi", "", 1), NewMessage("assistant", "hello", "", 2)]
    assert await repo.append_messages("acme", "s1", msgs, "req-1", 5) == [1, 2]
    assert await repo.append_messages("acme", "s1", msgs, "req-1", 6) == [1, 2]
    assert await repo.append_messages("acme", "s1", msgs[:1], "req-2", 7) == [3]
    after = await repo.list_messages("acme", "s1", 1, 10)
    assert [(m.position, m.content) for m in after] == [(2, "hello"), (3, "hi")]


async def test_task_lifecycle_backoff_and_dead_letter(repo) -> None:
    policy = RetryPolicy(base_backoff_ms=100, max_backoff_ms=1_000)
    task, created = await repo.enqueue_task(NewTask("acme", "q", 0, "{}", "key", 2), 0)
    again, created_again = await repo.enqueue_task(NewTask("acme", "q", 0, "{}", "key", 2), 1)
    assert created and not created_again and again.task_id == task.task_id

    [claimed] = await repo.claim_tasks("q", "w1", 5, 1_000, "", 10)
    assert claimed.state == TaskState.LEASED and claimed.attempts == 1
    assert await repo.claim_tasks("q", "w2", 5, 1_000, "", 11) == []
    failed = await repo.fail_task(task.task_id, claimed.lease_token, "boom", False, policy, 20)
    assert failed.state == TaskState.READY and failed.run_after_ms == 120
    assert await repo.claim_tasks("q", "w2", 5, 1_000, "", 119) == []
    [second] = await repo.claim_tasks("q", "w2", 5, 1_000, "", 120)
    with pytest.raises(FailedPrecondition):
        await repo.ack_task(task.task_id, claimed.lease_token, "{}", 130)
    dead = await repo.fail_task(task.task_id, second.lease_token, "boom again", False, policy, 140)
    assert dead.state == TaskState.DEAD and dead.attempts == 2


async def test_expired_lease_is_swept_and_old_token_rejected(repo) -> None:
    task, _ = await repo.enqueue_task(NewTask("acme", "q", 0, "{}", "", 3), 0)
    [claimed] = await repo.claim_tasks("q", "w1", 1, 100, "", 0)
    assert await repo.release_expired_leases(50) == 0
    assert await repo.release_expired_leases(200) == 1
    [reclaimed] = await repo.claim_tasks("q", "w2", 1, 100, "", 201)
    assert reclaimed.lease_token != claimed.lease_token and reclaimed.attempts == 2
    with pytest.raises(FailedPrecondition):
        await repo.heartbeat_task(task.task_id, claimed.lease_token, 100, 202)
    done = await repo.ack_task(task.task_id, reclaimed.lease_token, '{"ok": true}', 203)
    assert done.state == TaskState.DONE


async def test_priority_order_and_retried_claim(repo) -> None:
    for priority in (5, 1, 3):
        await repo.enqueue_task(NewTask("acme", "q", priority, "{}", f"p{priority}", 3), priority)
    claimed = await repo.claim_tasks("q", "w", 2, 1_000, "claim-1", 100)
    assert [t.priority for t in claimed] == [1, 3]
    assert {t.task_id for t in await repo.claim_tasks("q", "w", 2, 1_000, "claim-1", 101)} == \
        {t.task_id for t in claimed}


async def test_session_lock_excludes_other_owners_until_expiry(repo) -> None:
    got = await repo.acquire_lock("acme", "s", "r1", 1_000, 0)
    assert got.acquired and got.fencing_token == 1
    other = await repo.acquire_lock("acme", "s", "r2", 1_000, 10)
    assert not other.acquired and other.holder_id == "r1"
    renewed = await repo.acquire_lock("acme", "s", "r1", 1_000, 500)
    assert renewed.acquired and renewed.fencing_token == 1
    assert await repo.delete_expired_locks(2_000) == 1
    taken = await repo.acquire_lock("acme", "s", "r2", 1_000, 2_001)
    assert taken.acquired and taken.fencing_token == 2
    assert not await repo.release_lock("acme", "s", "r1")
    assert await repo.release_lock("acme", "s", "r2")


async def test_audit_chain_extends_head_only(repo) -> None:
    await repo.append_audit([AuditRecord("acme", 1, "", "h1", "{}")], 1)
    with pytest.raises(Aborted):
        await repo.append_audit([AuditRecord("acme", 3, "h1", "h3", "{}")], 2)
    with pytest.raises(Aborted):
        await repo.append_audit([AuditRecord("acme", 2, "wrong", "h2", "{}")], 2)
    await repo.append_audit([AuditRecord("acme", 2, "h1", "h2", "{}")], 3)
    assert (await repo.append_audit([AuditRecord("acme", 2, "h1", "h2", "{}")], 4))[0].seq == 2  # retry
    assert await repo.audit_head("acme") == (2, "h2")
    assert await repo.audit_head("other") == (0, "")


async def test_a_run_of_audit_entries_lands_in_one_append_and_a_retry_returns_it(repo) -> None:
    run = [AuditRecord("acme", 1, "", "h1", "{}"), AuditRecord("acme", 2, "h1", "h2", "{}"),
           AuditRecord("acme", 3, "h2", "h3", "{}")]
    assert [r.seq for r in await repo.append_audit(run, 1)] == [1, 2, 3]
    assert await repo.audit_head("acme") == (3, "h3")
    assert [r.entry_hash for r in await repo.append_audit(run, 2)] == ["h1", "h2", "h3"]  # retried
    with pytest.raises(Aborted):  # a different run at those seqs is not a retry
        await repo.append_audit([AuditRecord("acme", 2, "h1", "x2", "{}"), AuditRecord("acme", 3, "x2", "x3", "{}")], 3)
    assert [a.seq for a in await repo.list_audit("acme", 0, 10)] == [1, 2, 3]


async def test_concurrent_audit_appends_one_wins(repo) -> None:
    results = await asyncio.gather(*[repo.append_audit([AuditRecord("acme", 1, "", f"h{i}", "{}")], i)
                                     for i in range(4)], return_exceptions=True)
    assert sum(not isinstance(r, Exception) for r in results) == 1
    assert all(isinstance(r, Aborted) for r in results if isinstance(r, Exception))


async def test_retention_archives_old_rows_and_replay_stays_complete(repo) -> None:
    await make_session(repo)
    await repo.append_events([EventAppend("acme", "s1", events("a", "b"))], 100)
    await repo.append_events([EventAppend("acme", "s1", events("c"))], 10_000)
    assert await repo.archive_events(5_000, 1) == 1
    assert await repo.archive_events(5_000, 10) == 1
    assert await repo.archive_events(5_000, 10) == 0
    assert [e.seq for e in await repo.read_events("acme", "s1", 0, 10)] == [1, 2, 3]
    for seq, h in ((1, "h1"), (2, "h2")):
        await repo.append_audit([AuditRecord("acme", seq, "h1" if seq == 2 else "", h, "{}")], 100)
    assert await repo.archive_audit(5_000, 10) == 1  # the head stays hot
    assert await repo.audit_head("acme") == (2, "h2")
    assert [a.seq for a in await repo.list_audit("acme", 0, 10)] == [1, 2]


@pytest.mark.parametrize("query, table", [
    (known_keys_query({("acme", "s1", "k1"), ("acme", "s1", "k2"), ("acme", "s2", "k3")}), "store_events"),
    (select(SessionRow).where(rows_with_keys((SessionRow.tenant_id, SessionRow.session_id),
                                             [("acme", "s1"), ("acme", "s2")])), "store_sessions"),
    (select(SessionRow).where(sessions_where([("acme", "s1"), ("acme", "s2"), ("beta", "s3")])), "store_sessions"),
])
async def test_composite_key_lookups_use_the_index_on_sqlite(tmp_path, query, table) -> None:
    # A row-value IN is a full scan on SQLite; event appends slowed down as the table grew.
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'plan.db'}")
    await db.migrate()
    try:
        compiled = query.compile(db.read_engine, compile_kwargs={"literal_binds": True})
        async with db.reader() as s:
            plan = " ".join(str(row[-1]) for row in (await s.execute(text(f"EXPLAIN QUERY PLAN {compiled}"))).all())
        assert f"SEARCH {table} USING INDEX" in plan and f"SCAN {table}" not in plan, plan
    finally:
        await db.close()
