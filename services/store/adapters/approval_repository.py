"""Approvals in SQL. Every write takes the approvals counter first (adapters/counters.py).

Holding that row lock until commit hands out ``change_seq`` in commit order
and serialises approval writes across store replicas, so opening (get or
create) and deciding (compare and set) are atomic without relying on a
unique index: two replicas opening the same call at once get one pending
approval.
"""
from __future__ import annotations

import dataclasses
import hashlib

from sqlalchemy import and_, delete, not_, or_, select
from sqlalchemy.orm import Session

from services.common.errors import FailedPrecondition
from services.store.adapters.counters import lock_counter, set_counter
from services.store.adapters.database import Database, WritePriority
from services.store.adapters.records import approval_record
from services.store.adapters.tables import ApprovalRow
from services.store.core.feeds import APPROVALS_FEED
from services.store.core.models import (
    ApprovalChange,
    ApprovalRecord,
    ApprovalState,
    NewApproval,
    approval_reachable,
)

_PENDING = ApprovalState.PENDING.value


def subject_hash(subject_key: str) -> str:
    return hashlib.sha256(subject_key.encode()).hexdigest()


def _live(now_ms: int):
    """Not an expired pending approval (which is as if it had never been opened)."""
    return not_(and_(ApprovalRow.state == _PENDING, ApprovalRow.expire_ms <= now_ms))


def _visible(row: ApprovalRow | None, session_id: str, now_ms: int) -> ApprovalRow | None:
    if row is None or row.session_id != session_id:
        return None
    if row.state == _PENDING and row.expire_ms <= now_ms:
        return None
    return row


class ApprovalRepository:
    def __init__(self, db: Database) -> None:
        self.db = db

    @staticmethod
    def _pending(s: Session, new: NewApproval, now_ms: int) -> ApprovalRow | None:
        query = (select(ApprovalRow).where(
            ApprovalRow.tenant_id == new.tenant_id, ApprovalRow.session_id == new.session_id,
            ApprovalRow.subject_hash == subject_hash(new.subject_key), ApprovalRow.state == _PENDING,
            ApprovalRow.expire_ms > now_ms).order_by(ApprovalRow.create_ms, ApprovalRow.approval_id))
        for row in s.execute(query).scalars():
            if row.subject_key == new.subject_key:
                return row
        return None

    async def open_approval(self, new: NewApproval, now_ms: int) -> tuple[ApprovalRecord, bool]:
        def work(s: Session) -> tuple[ApprovalRecord, bool]:
            found = self._pending(s, new, now_ms)
            if found is not None:
                return approval_record(found), False
            change_seq = lock_counter(s, APPROVALS_FEED) + 1
            # Another replica may have opened it while this one waited for the counter.
            found = self._pending(s, new, now_ms)
            if found is not None:
                return approval_record(found), False
            row = ApprovalRow(tenant_id=new.tenant_id, approval_id=new.approval_id, session_id=new.session_id,
                              subject_key=new.subject_key, subject_hash=subject_hash(new.subject_key),
                              state=_PENDING, approver="", create_ms=now_ms, expire_ms=now_ms + new.ttl_ms,
                              decided_request_id="", audit_seq=0, change_seq=change_seq)
            s.add(row)
            set_counter(s, APPROVALS_FEED, change_seq)
            return approval_record(row), True

        return await self.db.write(work, WritePriority.URGENT)

    async def get_approval(self, tenant_id: str, session_id: str, approval_id: str,
                           now_ms: int) -> ApprovalRecord | None:
        async with self.db.reader() as s:
            row = _visible(await s.get(ApprovalRow, (tenant_id, approval_id)), session_id, now_ms)
            return approval_record(row) if row is not None else None

    @staticmethod
    def _locked(s: Session, tenant_id: str, session_id: str, approval_id: str, now_ms: int) -> ApprovalRow | None:
        query = (select(ApprovalRow).where(ApprovalRow.tenant_id == tenant_id, ApprovalRow.approval_id == approval_id)
                 .with_for_update())
        return _visible(s.execute(query).scalar_one_or_none(), session_id, now_ms)

    async def decide_approval(self, change: ApprovalChange, now_ms: int) -> tuple[ApprovalRecord | None, bool]:
        def work(s: Session) -> tuple[ApprovalRecord | None, bool]:
            change_seq = lock_counter(s, APPROVALS_FEED) + 1
            row = self._locked(s, change.tenant_id, change.session_id, change.approval_id, now_ms)
            if row is None:
                return None, False
            state = ApprovalState(row.state)
            if change.request_id and row.decided_request_id == change.request_id \
                    and approval_reachable(change.to_state, state):
                # A retry of the change that answered it: the approval as that
                # change left it, even when a later change (a grant used up
                # without a request id) moved it on.
                return dataclasses.replace(approval_record(row), state=change.to_state), True
            if state is not change.from_state:
                raise FailedPrecondition(
                    f"approval {change.approval_id!r} is {state.value}, not {change.from_state.value}",
                    reason="APPROVAL_STATE_CHANGED", field="from_state", metadata={"state": state.value})
            row.state = change.to_state.value
            if change.approver:
                row.approver = change.approver
            if change.request_id:
                row.decided_request_id = change.request_id
            row.change_seq = change_seq
            set_counter(s, APPROVALS_FEED, change_seq)
            return approval_record(row), False

        return await self.db.write(work, WritePriority.URGENT)

    async def note_approval_audit(self, tenant_id: str, session_id: str, approval_id: str, audit_seq: int,
                                  now_ms: int) -> tuple[ApprovalRecord | None, bool]:
        def work(s: Session) -> tuple[ApprovalRecord | None, bool]:
            change_seq = lock_counter(s, APPROVALS_FEED) + 1
            row = self._locked(s, tenant_id, session_id, approval_id, now_ms)
            if row is None:
                return None, False
            if row.audit_seq == audit_seq:
                return approval_record(row), False  # a retry
            row.audit_seq = audit_seq
            row.change_seq = change_seq
            set_counter(s, APPROVALS_FEED, change_seq)
            return approval_record(row), True

        return await self.db.write(work, WritePriority.URGENT)

    async def list_approvals(self, tenant_id: str, session_id: str, state: ApprovalState | None,
                             after: tuple[int, str] | None, limit: int, now_ms: int) -> list[ApprovalRecord]:
        query = select(ApprovalRow).where(ApprovalRow.tenant_id == tenant_id, ApprovalRow.session_id == session_id,
                                          _live(now_ms))
        if state is not None:
            query = query.where(ApprovalRow.state == state.value)
        if after is not None:
            query = query.where(or_(ApprovalRow.create_ms > after[0],
                                    and_(ApprovalRow.create_ms == after[0], ApprovalRow.approval_id > after[1])))
        query = query.order_by(ApprovalRow.create_ms, ApprovalRow.approval_id).limit(limit)
        async with self.db.reader() as s:
            return [approval_record(r) for r in (await s.execute(query)).scalars()]

    async def approvals_after(self, change_seq: int, limit: int) -> list[ApprovalRecord]:
        query = (select(ApprovalRow).where(ApprovalRow.change_seq > change_seq)
                 .order_by(ApprovalRow.change_seq).limit(limit))
        async with self.db.reader() as s:
            return [approval_record(r) for r in (await s.execute(query)).scalars()]

    async def delete_old_approvals(self, cutoff_ms: int, now_ms: int, max_rows: int) -> int:
        """Delete up to ``max_rows`` approvals opened before the cutoff, except pending ones still waiting."""
        def work(s: Session) -> int:
            query = (select(ApprovalRow.tenant_id, ApprovalRow.approval_id)
                     .where(ApprovalRow.create_ms < cutoff_ms,
                            not_(and_(ApprovalRow.state == _PENDING, ApprovalRow.expire_ms > now_ms)))
                     .order_by(ApprovalRow.create_ms).limit(max_rows).with_for_update(skip_locked=True))
            keys = s.execute(query).all()
            by_tenant: dict[str, list[str]] = {}
            for tenant_id, approval_id in keys:
                by_tenant.setdefault(tenant_id, []).append(approval_id)
            for tenant_id, ids in by_tenant.items():
                s.execute(delete(ApprovalRow).where(ApprovalRow.tenant_id == tenant_id,
                                                    ApprovalRow.approval_id.in_(ids))
                          .execution_options(synchronize_session=False))
            return len(keys)

        return await self.db.write(work, WritePriority.BACKGROUND)
