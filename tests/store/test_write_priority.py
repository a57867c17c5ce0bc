"""Writes run whole on a writer thread; SQLite's single writer takes them by urgency."""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from pathlib import Path

from sqlalchemy import func, select, text

from services.store.adapters.database import Database, WritePriority, WriteQueue
from services.store.adapters.repository import SqlRepository
from services.store.adapters.tables import MessageRow
from services.store.core.models import AuditRecord, NewMessage, NewSession
from tests.support.waiting import wait_until

U, N, B = WritePriority.URGENT, WritePriority.NORMAL, WritePriority.BACKGROUND


def _drain(queue: WriteQueue) -> list[str]:
    names = []
    while len(queue):
        fn, _ = queue.get(timeout_s=0)
        names.append(fn())
    return names


def _job(name: str):
    return (lambda: name), concurrent.futures.Future()


def test_urgent_jobs_go_first_then_normal_then_background_fifo_within_a_level() -> None:
    queue = WriteQueue()
    for name, priority in [("b1", B), ("n1", N), ("u1", U), ("n2", N), ("u2", U), ("b2", B)]:
        queue.put(priority, _job(name))
    assert _drain(queue) == ["u1", "u2", "n1", "n2", "b1", "b2"]


def test_a_background_job_past_its_max_wait_goes_ahead_of_normal_but_not_urgent() -> None:
    now = [0.0]
    queue = WriteQueue(background_max_wait_s=5.0, clock=lambda: now[0])
    queue.put(B, _job("b"))
    now[0] = 6.0  # the background job is now overdue
    queue.put(N, _job("n"))
    queue.put(U, _job("u"))
    assert _drain(queue) == ["u", "b", "n"]


def test_a_closed_queue_drains_then_ends_and_refuses_new_jobs() -> None:
    queue = WriteQueue()
    queue.put(N, _job("last"))
    queue.close()
    assert queue.get()[0]() == "last"
    assert queue.get() is None
    try:
        queue.put(N, _job("late"))
    except Exception as exc:
        assert getattr(exc, "reason", "") == "STORE_CLOSING"
    else:
        raise AssertionError("a closed queue took a job")


def queued_writes(db: Database) -> int:
    """Writes waiting for SQLite's writer thread (not counting the one it runs)."""
    assert db._writer_thread is not None
    return len(db._writer_thread.queue)


async def _sqlite(tmp_path: Path) -> tuple[Database, SqlRepository]:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'store.db'}")
    await db.migrate()
    repo = SqlRepository(db)
    await repo.create_session(NewSession(tenant_id="t", session_id="s", title="", metadata_json="{}",
                                         request_id=""), now_ms=1)
    return db, repo


async def test_an_audit_append_overtakes_queued_message_writes_on_sqlite(tmp_path: Path) -> None:
    db, repo = await _sqlite(tmp_path)
    try:
        done: list[str] = []
        holding = threading.Event()
        go = threading.Event()

        def hold(s) -> None:  # keeps the writer busy while the others queue up
            holding.set()
            go.wait(5)
            s.execute(text("SELECT 1"))

        first = asyncio.create_task(db.write(hold))
        await asyncio.to_thread(holding.wait, 5)

        async def message(i: int) -> None:
            await repo.append_messages("t", "s", [NewMessage(role="user", content=f"m{i}", metadata_json="{}",
                                                             num_tokens=1)], request_id=f"r{i}", now_ms=2)
            done.append(f"m{i}")

        async def audit() -> None:
            entry = AuditRecord(tenant_id="t", seq=1, prev_hash="", entry_hash="h1", payload_json="{}")
            await repo.append_audit([entry], now_ms=2)
            done.append("audit")

        messages = []
        for i in range(5):
            messages.append(asyncio.create_task(message(i)))
            assert await wait_until(lambda: queued_writes(db) == len(messages))  # in this order
        urgent = asyncio.create_task(audit())
        assert await wait_until(lambda: queued_writes(db) == 6)  # queued behind all five
        go.set()
        await asyncio.gather(first, urgent, *messages)
        assert done[0] == "audit", done
        assert done[1:] == [f"m{i}" for i in range(5)]
    finally:
        await db.close()


async def test_a_write_cancelled_before_it_starts_writes_nothing_and_errors_roll_back(tmp_path: Path) -> None:
    db, repo = await _sqlite(tmp_path)
    try:
        holding, go = threading.Event(), threading.Event()

        def hold(s) -> None:
            holding.set()
            go.wait(5)

        first = asyncio.create_task(db.write(hold))
        await asyncio.to_thread(holding.wait, 5)
        queued = asyncio.create_task(repo.append_messages(
            "t", "s", [NewMessage(role="user", content="never", metadata_json="{}", num_tokens=1)],
            request_id="x", now_ms=2))
        assert await wait_until(lambda: queued_writes(db) == 1)
        queued.cancel()
        # Once the caller has finished, its job on the writer queue is cancelled too; only then free the writer.
        await asyncio.wait({queued})
        go.set()
        await first

        def failing(s) -> None:
            s.add(MessageRow(tenant_id="t", session_id="s", position=99, request_id=None, role="user",
                             content="rolled back", metadata_json="{}", num_tokens=1, create_ms=3))
            s.flush()
            raise ValueError("boom")

        try:
            await db.write(failing)
        except ValueError:
            pass
        else:
            raise AssertionError("the error did not reach the caller")
        async with db.reader() as s:
            count = (await s.execute(select(func.count()).select_from(MessageRow))).scalar_one()
        assert count == 0
        assert queued.cancelled()
    finally:
        await db.close()
