"""Task queue, session locks and the audit chain in SQL."""
from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import Any, TypeVar, cast

from sqlalchemy import CursorResult, Insert, Result, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.common.errors import Aborted, FailedPrecondition, NotFound
from services.store.adapters.database import Database, WritePriority
from services.store.adapters.records import audit_record, task_record
from services.store.adapters.session_repository import move_rows
from services.store.adapters.tables import ArchivedAuditRow, AuditHeadRow, AuditRow, SessionLockRow, TaskRow
from services.store.adapters.webhook_repository import outbox_rows, task_data
from services.store.core.models import AuditRecord, LockResult, NewTask, TaskRecord, TaskState
from services.store.core.task_policy import RetryPolicy

# The hot and the archived audit table have the same columns.
_AuditRowT = TypeVar("_AuditRowT", AuditRow, ArchivedAuditRow)


def _rowcount(result: Result[Any]) -> int:
    """Rows an UPDATE matched: Session.execute is typed as returning a Result, an UPDATE's is a CursorResult."""
    return cast(CursorResult[Any], result).rowcount or 0


def _lease_lost(task_id: str) -> FailedPrecondition:
    return FailedPrecondition(f"task {task_id!r}: lease token does not hold the current lease",
                              reason="LEASE_LOST", field="lease_token")


def _queue_task_webhook(s: Session, row: TaskRow, now_ms: int) -> None:
    """An outbox row for a task that ended done or dead, in the transaction that ends it."""
    kind = {int(TaskState.DONE): "task.done", int(TaskState.DEAD): "task.dead"}.get(row.state)
    if kind is None:
        return
    try:
        session_id = str(json.loads(row.payload_json or "{}").get("session_id", ""))
    except (ValueError, AttributeError):
        session_id = ""
    data = task_data(row.task_id, TaskState(row.state).name, row.result_json, row.last_error)
    outbox_rows(s, row.tenant_id, [(kind, session_id or row.task_id, data)], now_ms)


class TaskRepository:
    def __init__(self, db: Database) -> None:
        self.db = db

    # -- tasks -----------------------------------------------------------------

    async def enqueue_task(self, new: NewTask, now_ms: int) -> tuple[TaskRecord, bool]:
        def work(s: Session) -> tuple[TaskRecord, bool]:
            if new.idempotency_key:
                query = select(TaskRow).where(TaskRow.tenant_id == new.tenant_id, TaskRow.queue == new.queue,
                                              TaskRow.idempotency_key == new.idempotency_key)
                existing = s.execute(query).scalar_one_or_none()
                if existing is not None:
                    return task_record(existing), False
            row = TaskRow(task_id=uuid.uuid4().hex, tenant_id=new.tenant_id, queue=new.queue,
                          priority=new.priority, payload_json=new.payload_json, state=int(TaskState.READY),
                          attempts=0, max_attempts=new.max_attempts, worker_id="", lease_token="", claim_id=None,
                          lease_expire_ms=0, run_after_ms=now_ms, result_json="", last_error="",
                          idempotency_key=new.idempotency_key or None, create_ms=now_ms, update_ms=now_ms)
            s.add(row)
            try:
                s.flush()
            except IntegrityError:
                # Two replicas enqueued the same key at once; the other one won.
                raise Aborted("task with this idempotency key is being created; retry",
                              reason="ENQUEUE_RACE") from None
            return task_record(row), True

        return await self.db.write(work)

    async def claim_tasks(self, queue: str, worker_id: str, max_tasks: int, lease_ms: int, claim_id: str,
                          now_ms: int) -> list[TaskRecord]:
        def work(s: Session) -> list[TaskRecord]:
            if claim_id:
                query = select(TaskRow).where(TaskRow.claim_id == claim_id, TaskRow.worker_id == worker_id,
                                              TaskRow.state == int(TaskState.LEASED))
                repeated = [task_record(r) for r in s.execute(query).scalars()]
                if repeated:
                    return repeated
            # SKIP LOCKED: concurrent claimers on PostgreSQL take disjoint rows
            # instead of queueing behind each other (SQLite has one writer anyway).
            ready = (select(TaskRow.task_id)
                     .where(TaskRow.queue == queue, TaskRow.state == int(TaskState.READY),
                            TaskRow.run_after_ms <= now_ms)
                     .order_by(TaskRow.priority, TaskRow.run_after_ms, TaskRow.create_ms)
                     .limit(max_tasks).with_for_update(skip_locked=True))
            ids = list(s.execute(ready).scalars())
            if not ids:
                return []
            token = uuid.uuid4().hex
            claim = (update(TaskRow)
                     .where(TaskRow.task_id.in_(ids), TaskRow.state == int(TaskState.READY))
                     .values(state=int(TaskState.LEASED), worker_id=worker_id, lease_token=token,
                             claim_id=claim_id or None, lease_expire_ms=now_ms + lease_ms,
                             attempts=TaskRow.attempts + 1, update_ms=now_ms)
                     .returning(TaskRow)
                     .execution_options(synchronize_session=False))
            rows = [task_record(r) for r in s.execute(claim).scalars()]
            return sorted(rows, key=lambda t: (t.priority, t.run_after_ms, t.create_ms))

        return await self.db.write(work)

    @staticmethod
    def _owned(s: Session, task_id: str, lease_token: str) -> TaskRow:
        row = s.execute(select(TaskRow).where(TaskRow.task_id == task_id).with_for_update()).scalar_one_or_none()
        if row is None:
            raise NotFound(f"task {task_id!r} not found", reason="TASK_NOT_FOUND")
        if row.lease_token != lease_token:
            raise _lease_lost(task_id)
        return row

    async def heartbeat_task(self, task_id: str, lease_token: str, lease_ms: int, now_ms: int) -> TaskRecord:
        def work(s: Session) -> TaskRecord:
            row = self._owned(s, task_id, lease_token)
            if row.state != TaskState.LEASED:
                raise _lease_lost(task_id)
            row.lease_expire_ms = now_ms + lease_ms
            row.update_ms = now_ms
            return task_record(row)

        return await self.db.write(work, WritePriority.URGENT)

    async def ack_task(self, task_id: str, lease_token: str, result_json: str, now_ms: int) -> TaskRecord:
        def work(s: Session) -> TaskRecord:
            row = self._owned(s, task_id, lease_token)
            if row.state == TaskState.DONE:
                return task_record(row)  # a retried ack
            if row.state != TaskState.LEASED:
                raise _lease_lost(task_id)
            row.state = int(TaskState.DONE)
            row.result_json = result_json
            row.lease_expire_ms = 0
            row.update_ms = now_ms
            _queue_task_webhook(s, row, now_ms)
            return task_record(row)

        return await self.db.write(work, WritePriority.URGENT)

    async def fail_task(self, task_id: str, lease_token: str, error: str, permanent: bool, policy: RetryPolicy,
                        now_ms: int) -> TaskRecord:
        def work(s: Session) -> TaskRecord:
            row = self._owned(s, task_id, lease_token)
            if row.state in (TaskState.READY, TaskState.DEAD):
                return task_record(row)  # a retried fail
            if row.state != TaskState.LEASED:
                raise _lease_lost(task_id)
            state, run_after = policy.after_failure(row.attempts, row.max_attempts, permanent, now_ms)
            row.state = int(state)
            row.run_after_ms = run_after
            row.last_error = error
            row.lease_expire_ms = 0
            row.update_ms = now_ms
            _queue_task_webhook(s, row, now_ms)
            return task_record(row)

        return await self.db.write(work, WritePriority.URGENT)

    async def cancel_task(self, tenant_id: str, task_id: str, reason: str,
                          now_ms: int) -> tuple[TaskRecord, TaskState] | None:
        """Cancel a READY or LEASED task of ``tenant_id``: (the task now, the state it was in); None if unknown."""
        def work(s: Session) -> tuple[TaskRecord, TaskState] | None:
            row = s.execute(select(TaskRow).where(TaskRow.task_id == task_id).with_for_update()).scalar_one_or_none()
            if row is None or row.tenant_id != tenant_id:
                return None
            previous = TaskState(row.state)
            if previous in (TaskState.DONE, TaskState.DEAD):
                raise FailedPrecondition(f"task {task_id!r} has already ended ({previous.name})",
                                         reason="TASK_ENDED", field="task_id")
            if previous != TaskState.CANCELLED:
                # The lease token is voided: the worker's next heartbeat, ack or fail finds its lease gone.
                row.state = int(TaskState.CANCELLED)
                row.lease_token = ""
                row.lease_expire_ms = 0
                row.last_error = reason
                row.update_ms = now_ms
            return task_record(row), previous

        return await self.db.write(work, WritePriority.URGENT)

    async def get_task(self, tenant_id: str, task_id: str) -> TaskRecord | None:
        async with self.db.reader() as s:
            row = await s.get(TaskRow, task_id)
            if row is None or row.tenant_id != tenant_id:
                return None
            return task_record(row)

    async def release_expired_leases(self, now_ms: int) -> int:
        """Sweeper: expired leases count as a failed attempt; the token is voided."""
        expired = (TaskRow.state == int(TaskState.LEASED), TaskRow.lease_expire_ms < now_ms)
        def work(s: Session) -> int:
            dying = list(s.execute(select(TaskRow).where(*expired, TaskRow.attempts >= TaskRow.max_attempts))
                         .scalars())
            dead = s.execute(
                update(TaskRow).where(*expired, TaskRow.attempts >= TaskRow.max_attempts)
                .values(state=int(TaskState.DEAD), lease_token="", last_error="lease expired", update_ms=now_ms)
                .execution_options(synchronize_session=False))
            ready = s.execute(
                update(TaskRow).where(*expired)
                .values(state=int(TaskState.READY), lease_token="", worker_id="", run_after_ms=now_ms,
                        last_error="lease expired", update_ms=now_ms)
                .execution_options(synchronize_session=False))
            for row in dying:
                s.refresh(row)
                _queue_task_webhook(s, row, now_ms)
            return _rowcount(dead) + _rowcount(ready)

        return await self.db.write(work, WritePriority.BACKGROUND)

    # -- session locks ---------------------------------------------------------

    async def acquire_lock(self, tenant_id: str, session_id: str, owner_id: str, lease_ms: int,
                           now_ms: int) -> LockResult:
        def work(s: Session) -> LockResult:
            s.execute(self._insert_free_lock(tenant_id, session_id))
            query = (select(SessionLockRow).where(SessionLockRow.tenant_id == tenant_id,
                                                  SessionLockRow.session_id == session_id).with_for_update())
            row = s.execute(query).scalar_one()
            free = not row.owner_id or row.lease_expire_ms <= now_ms
            if row.owner_id != owner_id and not free:
                return LockResult(False, row.owner_id, row.lease_expire_ms, row.fencing_token)
            if row.owner_id != owner_id or row.lease_expire_ms <= now_ms:
                row.fencing_token += 1  # the lock changes hands (or was lost meanwhile)
            row.owner_id = owner_id
            row.lease_expire_ms = now_ms + lease_ms
            return LockResult(True, owner_id, row.lease_expire_ms, row.fencing_token)

        return await self.db.write(work, WritePriority.URGENT)

    def _insert_free_lock(self, tenant_id: str, session_id: str) -> Insert:
        free = {"tenant_id": tenant_id, "session_id": session_id, "owner_id": "", "lease_expire_ms": 0,
                "fencing_token": 0}
        if self.db.is_postgres:
            from sqlalchemy.dialects.postgresql import insert as postgresql_insert

            return postgresql_insert(SessionLockRow).values(**free).on_conflict_do_nothing()
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(SessionLockRow).values(**free).on_conflict_do_nothing()

    async def release_lock(self, tenant_id: str, session_id: str, owner_id: str) -> bool:
        def work(s: Session) -> bool:
            result = s.execute(
                update(SessionLockRow)
                .where(SessionLockRow.tenant_id == tenant_id, SessionLockRow.session_id == session_id,
                       SessionLockRow.owner_id == owner_id)
                .values(owner_id="", lease_expire_ms=0)
                .execution_options(synchronize_session=False))
            return _rowcount(result) > 0

        return await self.db.write(work, WritePriority.URGENT)

    async def delete_expired_locks(self, now_ms: int) -> int:
        def work(s: Session) -> int:
            result = s.execute(
                update(SessionLockRow)
                .where(SessionLockRow.owner_id != "", SessionLockRow.lease_expire_ms <= now_ms)
                .values(owner_id="", lease_expire_ms=0)
                .execution_options(synchronize_session=False))
            return _rowcount(result)

        return await self.db.write(work, WritePriority.BACKGROUND)

    # -- audit chain -----------------------------------------------------------

    async def append_audit(self, entries: Sequence[AuditRecord], now_ms: int) -> list[AuditRecord]:
        """Append consecutive entries of one chain in one transaction (the caller checked they link up).

        The chain's head row (``store_audit_heads``) moves in the same
        transaction: it, not the last entry found, is what an append must
        extend, so a tail lost from the entry tables still blocks the chain.
        """
        first, last = entries[0], entries[-1]
        tenant_id = first.tenant_id

        def work(s: Session) -> list[AuditRecord]:
            head = s.execute(select(AuditHeadRow).where(AuditHeadRow.tenant_id == tenant_id)
                             .with_for_update()).scalar_one_or_none()
            if head is not None and head.seq >= last.seq:
                stored = self._rows_between(s, tenant_id, first.seq, last.seq)
                if [(r.seq, r.prev_hash, r.entry_hash) for r in stored] == \
                        [(e.seq, e.prev_hash, e.entry_hash) for e in entries]:
                    return stored  # a retried append that already landed
            head_seq, head_hash = (head.seq, head.entry_hash) if head is not None else (0, "")
            if first.seq != head_seq + 1 or first.prev_hash != head_hash:
                raise Aborted(f"audit chain head is seq {head_seq}; entry must be seq {head_seq + 1} "
                              "with prev_hash equal to the head's hash", reason="AUDIT_HEAD_MOVED",
                              metadata={"head_seq": str(head_seq)})
            s.execute(insert(AuditRow), [
                dict(tenant_id=e.tenant_id, seq=e.seq, prev_hash=e.prev_hash, entry_hash=e.entry_hash,
                     payload_json=e.payload_json, create_ms=now_ms) for e in entries])
            if head is None:
                # Two first appends racing: the primary key lets one in.
                s.execute(insert(AuditHeadRow).values(tenant_id=tenant_id, seq=last.seq,
                                                      entry_hash=last.entry_hash))
            else:
                s.execute(update(AuditHeadRow).where(AuditHeadRow.tenant_id == tenant_id)
                          .values(seq=last.seq, entry_hash=last.entry_hash)
                          .execution_options(synchronize_session=False))
            return [AuditRecord(e.tenant_id, e.seq, e.prev_hash, e.entry_hash, e.payload_json, now_ms)
                    for e in entries]

        try:
            return await self.db.write(work, WritePriority.URGENT)
        except IntegrityError:
            # Another replica appended the same seq first (the primary key is the guard).
            raise Aborted("audit chain head moved concurrently", reason="AUDIT_HEAD_MOVED") from None

    @staticmethod
    def _rows_between(s: Session, tenant_id: str, first_seq: int, last_seq: int) -> list[AuditRecord]:
        query = (select(AuditRow).where(AuditRow.tenant_id == tenant_id, AuditRow.seq >= first_seq,
                                        AuditRow.seq <= last_seq).order_by(AuditRow.seq))
        return [audit_record(r) for r in s.execute(query).scalars()]

    async def audit_head(self, tenant_id: str) -> tuple[int, str]:
        """The chain's head as the last append left it, whatever the entry tables still hold."""
        async with self.db.reader() as s:
            head = await s.get(AuditHeadRow, tenant_id)
            return (head.seq, head.entry_hash) if head is not None else (0, "")

    async def list_audit(self, tenant_id: str, after_seq: int, limit: int) -> list[AuditRecord]:
        async with self.db.reader() as s:
            async def rows_of(table: type[_AuditRowT]) -> list[AuditRecord]:
                query = (select(table).where(table.tenant_id == tenant_id, table.seq > after_seq)
                         .order_by(table.seq).limit(limit))
                return [audit_record(r) for r in (await s.execute(query)).scalars()]

            rows = await rows_of(ArchivedAuditRow) + await rows_of(AuditRow)
            return sorted({r.seq: r for r in rows}.values(), key=lambda r: r.seq)[:limit]

    async def archive_audit(self, cutoff_ms: int, max_rows: int) -> int:
        # The head's entry stays hot (a retried append of it is recognised
        # there); the heads table itself is never touched by retention.
        not_head = AuditRow.seq < (select(AuditHeadRow.seq)
                                   .where(AuditHeadRow.tenant_id == AuditRow.tenant_id).scalar_subquery())
        return await move_rows(self.db, AuditRow, ArchivedAuditRow, cutoff_ms, max_rows,
                               (AuditRow.tenant_id, AuditRow.seq), extra=not_head)
