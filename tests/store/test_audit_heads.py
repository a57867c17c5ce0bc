"""The audit chain's head lives in its own table: a lost tail still shows, after any restart."""
from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import text

from services.common.errors import Aborted
from services.store.adapters.database import Database
from services.store.adapters.migrations.runner import alembic_config
from services.store.adapters.repository import SqlRepository
from services.store.core.models import AuditRecord


def chain(n: int, tenant: str = "acme") -> list[AuditRecord]:
    return [AuditRecord(tenant, seq, f"h{seq - 1}" if seq > 1 else "", f"h{seq}", "{}") for seq in range(1, n + 1)]


async def test_deleting_the_tail_is_seen_through_the_head_after_reopening(db_url: str) -> None:
    first = Database(db_url)
    await first.migrate()
    try:
        repo = SqlRepository(first)
        await repo.append_audit(chain(3), 100)
        await repo.append_audit(chain(5)[3:], 200)
        await repo.append_audit(chain(2, "other"), 200)
        assert await repo.audit_head("acme") == (5, "h5")

        def drop_tail(s) -> None:
            s.execute(text("DELETE FROM store_audit WHERE tenant_id = 'acme' AND seq > 3"))

        await first.write(drop_tail)
    finally:
        await first.close()

    # A fresh process (a restarted policy or store) sees what was lost.
    second = Database(db_url)
    await second.migrate()
    try:
        repo = SqlRepository(second)
        assert await repo.audit_head("acme") == (5, "h5")
        assert [e.seq for e in await repo.list_audit("acme", 0, 10)] == [1, 2, 3]
        # Appending after the surviving entries would hide the gap: refused against the head row.
        with pytest.raises(Aborted) as err:
            await repo.append_audit([chain(4)[3]], 300)
        assert err.value.reason == "AUDIT_HEAD_MOVED" and err.value.metadata["head_seq"] == "5"
        assert [e.seq for e in await repo.list_audit("acme", 0, 10)] == [1, 2, 3]
        # Other chains are untouched.
        assert await repo.audit_head("other") == (2, "h2")
        await repo.append_audit([AuditRecord("other", 3, "h2", "h3", "{}")], 300)
        assert await repo.audit_head("other") == (3, "h3")
    finally:
        await second.close()


async def test_archiving_moves_entries_but_never_the_head(repo) -> None:
    await repo.append_audit(chain(4), 100)
    assert await repo.archive_audit(5_000, 100) == 3  # the head's entry stays hot
    assert await repo.audit_head("acme") == (4, "h4")
    assert [e.seq for e in await repo.list_audit("acme", 0, 10)] == [1, 2, 3, 4]

    def drop_everything(s) -> None:
        s.execute(text("DELETE FROM store_audit"))
        s.execute(text("DELETE FROM store_audit_archive"))

    await repo.db.write(drop_everything)
    assert await repo.audit_head("acme") == (4, "h4")
    with pytest.raises(Aborted):
        await repo.append_audit(chain(1), 200)  # a new chain cannot start over a lost one


async def test_a_retried_append_of_the_head_returns_it(repo) -> None:
    await repo.append_audit(chain(2), 100)
    assert [e.entry_hash for e in await repo.append_audit(chain(2)[1:], 101)] == ["h2"]
    assert await repo.audit_head("acme") == (2, "h2")


async def test_the_migration_gives_existing_chains_their_head(db_url: str) -> None:
    from alembic import command

    db = Database(db_url)
    try:
        def to_0001_with_a_chain() -> None:
            with db.write_engine.begin() as conn:
                command.upgrade(alembic_config(conn), "0001")
                for tenant, n in (("acme", 3), ("globex", 1)):
                    for e in chain(n, tenant):
                        conn.execute(text("INSERT INTO store_audit (tenant_id, seq, prev_hash, entry_hash, "
                                          "payload_json, create_ms) VALUES (:t, :s, :p, :h, '{}', 1)"),
                                     {"t": e.tenant_id, "s": e.seq, "p": e.prev_hash, "h": e.entry_hash})

        await asyncio.to_thread(to_0001_with_a_chain)
        await db.migrate()
        repo = SqlRepository(db)
        assert await repo.audit_head("acme") == (3, "h3")
        assert await repo.audit_head("globex") == (1, "h1")
        await repo.append_audit([chain(4)[3]], 2)
        assert await repo.audit_head("acme") == (4, "h4")
    finally:
        await db.close()
