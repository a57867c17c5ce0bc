"""Approvals waiting for a person: one future per approval id.

Policy may hand identical calls of one turn the same approval id; they then
share one pending entry, and one decision releases them all. A decision comes
from SubmitApproval on this replica, or from another replica as a session
control (core/controls.py).
"""
from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass

from services.common.errors import NotFound

MAX_REMEMBERED_DECISIONS = 4096


@dataclass
class PendingApproval:
    tenant_id: str
    session_id: str
    approval_id: str
    future: asyncio.Future
    num_waiters: int = 0

    @property
    def decided(self) -> bool:
        return self.future.done()


class ApprovalBook:
    def __init__(self) -> None:
        self._pending: dict[str, PendingApproval] = {}
        # Decided ids, so a late repeat of a submission is answered, not NOT_FOUND.
        self._decided: OrderedDict[str, tuple[str, str]] = OrderedDict()

    def was_decided(self, tenant_id: str, session_id: str, approval_id: str) -> bool:
        return self._decided.get(approval_id) == (tenant_id, session_id)

    def open(self, tenant_id: str, session_id: str, approval_id: str) -> PendingApproval:
        pending = self._pending.get(approval_id)
        if pending is None:
            pending = PendingApproval(tenant_id, session_id, approval_id, asyncio.get_running_loop().create_future())
            self._pending[approval_id] = pending
        pending.num_waiters += 1
        return pending

    def close(self, pending: PendingApproval) -> None:
        pending.num_waiters -= 1
        if pending.num_waiters <= 0 and self._pending.get(pending.approval_id) is pending:
            del self._pending[pending.approval_id]

    def waiting(self, tenant_id: str, session_id: str, approval_id: str) -> PendingApproval | None:
        """The call waiting here for this approval, if any."""
        pending = self._pending.get(approval_id)
        if pending is None or pending.tenant_id != tenant_id or pending.session_id != session_id:
            return None
        return pending

    def find(self, tenant_id: str, session_id: str, approval_id: str) -> PendingApproval:
        pending = self.waiting(tenant_id, session_id, approval_id)
        if pending is None:
            raise not_waiting(session_id, approval_id)
        return pending

    def resolve(self, pending: PendingApproval, decision: str) -> None:
        if not pending.future.done():
            pending.future.set_result(decision)
        self.note_decided(pending.tenant_id, pending.session_id, pending.approval_id)

    def note_decided(self, tenant_id: str, session_id: str, approval_id: str) -> None:
        """Remember a decision (taken here or passed on to another replica) so a repeat is answered."""
        self._decided[approval_id] = (tenant_id, session_id)
        while len(self._decided) > MAX_REMEMBERED_DECISIONS:
            self._decided.popitem(last=False)


def not_waiting(session_id: str, approval_id: str) -> NotFound:
    return NotFound(f"approval {approval_id!r} is not waiting in session {session_id!r}",
                    reason="APPROVAL_NOT_FOUND", field="approval_id")
