"""Approvals shared by every policy replica: open, answer, note, list, watch.

An approval belongs to (tenant, session): another session's or tenant's id,
an unknown id and an expired pending approval all answer the same NOT_FOUND,
so nothing leaks. Every change takes the next ``change_seq`` of the store;
WatchApprovals delivers changes in that order (core/feeds.py).
"""
from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable

from services.common.errors import NotFound, PermissionDenied, require
from services.common.paging import cursor_int, decode_token, encode_token, page_limit
from services.store.core import validation as check
from services.store.core.feeds import APPROVALS_FEED, FEED_CHANNEL, follow_feed
from services.store.core.models import (
    APPROVAL_TRANSITIONS,
    ApprovalChange,
    ApprovalRecord,
    ApprovalState,
    NewApproval,
    Page,
)
from services.store.core.ports import StoreRepository
from services.store.core.watch_hub import WatchHub

#: How long a pending approval waits when OpenApproval names no ttl_ms.
DEFAULT_APPROVAL_TTL_MS = 3600 * 1000


def approval_not_found(approval_id: str) -> NotFound:
    # Same answer for an unknown id, an expired pending approval and another session's or tenant's.
    return NotFound(f"approval {approval_id!r} not found", reason="APPROVAL_NOT_FOUND", field="approval_id")


class ApprovalRegistry:
    def __init__(self, repo: StoreRepository, hub: WatchHub, clock: Callable[[], int]) -> None:
        self.repo = repo
        self.hub = hub
        self.clock = clock

    def _published(self, record: ApprovalRecord) -> ApprovalRecord:
        self.hub.publish(FEED_CHANNEL, APPROVALS_FEED, record.change_seq)
        return record

    async def open(self, tenant_id: str, session_id: str, subject_key: str, ttl_ms: int,
                   request_id: str) -> tuple[ApprovalRecord, bool]:
        """The pending approval of this call, opening one when none is pending (expired ones count as none).

        ``request_id`` needs no record of its own: a retry finds the approval
        its first try opened, as long as it is pending.
        """
        check.check_id(request_id, "request_id", required=False)
        check.check_id(tenant_id, "tenant_id")
        check.check_id(session_id, "session_id")
        check.check_subject_key(subject_key)
        check.check_int(ttl_ms, "ttl_ms", 0, check.MAX_APPROVAL_TTL_MS)
        new = NewApproval(tenant_id, session_id, uuid.uuid4().hex, subject_key, ttl_ms or DEFAULT_APPROVAL_TTL_MS)
        record, created = await self.repo.open_approval(new, self.clock())
        return (self._published(record) if created else record), created

    async def get(self, tenant_id: str, session_id: str, approval_id: str) -> ApprovalRecord:
        self._check_ref(tenant_id, session_id, approval_id)
        record = await self.repo.get_approval(tenant_id, session_id, approval_id, self.clock())
        if record is None:
            raise approval_not_found(approval_id)
        return record

    async def decide(self, request_id: str, tenant_id: str, session_id: str, approval_id: str, from_state: str,
                     to_state: str, approver: str) -> tuple[ApprovalRecord, bool]:
        """Compare-and-set of the state; ``(approval, replayed)``."""
        check.check_id(request_id, "request_id", required=False)
        self._check_ref(tenant_id, session_id, approval_id)
        before = check.check_approval_state(from_state, "from_state")
        after = check.check_approval_state(to_state, "to_state")
        require((before, after) in APPROVAL_TRANSITIONS, "to_state",
                f"an approval cannot move from {before.value} to {after.value}")
        check.check_approver(approver)
        change = ApprovalChange(tenant_id, session_id, approval_id, before, after, approver, request_id)
        record, replayed = await self.repo.decide_approval(change, self.clock())
        if record is None:
            raise approval_not_found(approval_id)
        return (record if replayed else self._published(record)), replayed

    async def note_audit(self, tenant_id: str, session_id: str, approval_id: str, audit_seq: int) -> ApprovalRecord:
        self._check_ref(tenant_id, session_id, approval_id)
        check.check_int(audit_seq, "audit_seq", 1, check.INT64_MAX)
        record, changed = await self.repo.note_approval_audit(tenant_id, session_id, approval_id, audit_seq,
                                                              self.clock())
        if record is None:
            raise approval_not_found(approval_id)
        return self._published(record) if changed else record

    async def list(self, tenant_id: str, session_id: str, state: str, page_size: int, page_token: str) -> Page:
        """A session's approvals (expired pending ones left out), oldest first."""
        check.check_id(tenant_id, "tenant_id")
        check.check_id(session_id, "session_id")
        wanted: ApprovalState | None = check.check_approval_state(state, "state") if state else None
        limit = page_limit(page_size)
        scope = f"approvals:{tenant_id}:{session_id}:{state}"
        cursor = decode_token(page_token, scope)
        after = None
        if cursor is not None:
            require(isinstance(cursor, list) and len(cursor) == 2 and isinstance(cursor[1], str), "page_token",
                    "malformed")
            check.check_id(cursor[1], "page_token")
            after = (cursor_int(cursor[0]), cursor[1])
        rows = await self.repo.list_approvals(tenant_id, session_id, wanted, after, limit + 1, self.clock())
        token = ""
        if len(rows) > limit:
            rows = rows[:limit]
            token = encode_token(scope, [rows[-1].create_ms, rows[-1].approval_id])
        return Page(rows, token)

    async def watch(self, after_change_seq: int, from_now: bool, *,
                    all_tenants_allowed: bool = True) -> AsyncIterator[tuple[ApprovalRecord | None, int]]:
        """``(None, current change_seq)`` once live, then every change after ``after_change_seq`` in order.

        Every tenant's approvals: for mesh services only (``all_tenants_allowed``),
        never for a client a call acts for.
        """
        if not all_tenants_allowed:
            raise PermissionDenied("WatchApprovals follows every tenant: mesh services only",
                                   reason="ALL_TENANTS_NOT_ALLOWED")
        check.check_seq(after_change_seq, "after_change_seq")
        require(not (from_now and after_change_seq), "after_change_seq", "must be 0 with from_now")

        async def head() -> int:
            return (await self.repo.feed_heads([(FEED_CHANNEL, APPROVALS_FEED)])).get(
                (FEED_CHANNEL, APPROVALS_FEED), 0)

        async for item in follow_feed(self.hub, APPROVALS_FEED, head, self.repo.approvals_after,
                                      lambda r: r.change_seq, after_change_seq, from_now):
            yield item

    @staticmethod
    def _check_ref(tenant_id: str, session_id: str, approval_id: str) -> None:
        check.check_id(tenant_id, "tenant_id")
        check.check_id(session_id, "session_id")
        check.check_id(approval_id, "approval_id")
