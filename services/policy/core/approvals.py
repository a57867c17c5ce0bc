"""Approval requests, approve-once grants and per-session approvals.

Everything is keyed by (tenant_id, session_id): an approval made in one
session is invisible to every other session and tenant, and an id from
elsewhere is answered exactly like an unknown id, so nothing leaks.
"""
from __future__ import annotations

import enum
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from services.common.errors import FailedPrecondition, NotFound


class ApprovalChoice(enum.IntEnum):
    """Mirrors llmesh.policy.v1.ApprovalDecision numbers."""

    APPROVE_ONCE = 1
    APPROVE_SESSION = 2
    DENY = 3
    ABORT = 4


class ApprovalState(enum.Enum):
    PENDING = "pending"
    APPROVED_ONCE = "approved_once"
    CONSUMED = "consumed"
    APPROVED_SESSION = "approved_session"
    DENIED = "denied"
    ABORTED = "aborted"


@dataclass
class Approval:
    approval_id: str
    tenant_id: str
    session_id: str
    subject_key: str
    created_at: float
    state: ApprovalState = ApprovalState.PENDING
    approver: str = ""


@dataclass(frozen=True)
class GrantCheck:
    """What an ``approval_id`` on an Evaluate call amounts to."""

    state: ApprovalState
    approval: Approval


@dataclass
class _SessionApprovals:
    approved_keys: set[str] = field(default_factory=set)
    # Pending approval per subject key, so a repeated call reuses its request.
    pending_by_key: dict[str, str] = field(default_factory=dict)


class ApprovalBook:
    """In-process book of approvals; bounded, oldest entries dropped first."""

    def __init__(self, ttl_s: float = 3600.0, max_approvals: int = 100_000, max_sessions: int = 50_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.max_approvals = max_approvals
        self.max_sessions = max_sessions
        self.clock = clock
        self._approvals: OrderedDict[str, Approval] = OrderedDict()
        self._sessions: OrderedDict[tuple[str, str], _SessionApprovals] = OrderedDict()
        # request_id of RecordApproval -> (approval_id, choice, audit seq), for retries.
        self._recorded: OrderedDict[tuple[str, str], tuple[str, ApprovalChoice, int]] = OrderedDict()

    @property
    def num_approvals(self) -> int:
        """Approvals held (pending and decided, not yet expired or trimmed)."""
        return len(self._approvals)

    def session_allows(self, tenant_id: str, session_id: str, subject_key: str) -> bool:
        session = self._sessions.get((tenant_id, session_id))
        return session is not None and subject_key in session.approved_keys

    def request(self, tenant_id: str, session_id: str, subject_key: str) -> Approval:
        """The pending approval for this call, opening one if none is waiting."""
        session = self._session(tenant_id, session_id)
        existing_id = session.pending_by_key.get(subject_key)
        existing = self._live(existing_id) if existing_id else None
        if existing is not None and existing.state is ApprovalState.PENDING:
            return existing
        approval = Approval(uuid.uuid4().hex, tenant_id, session_id, subject_key, self.clock())
        self._approvals[approval.approval_id] = approval
        session.pending_by_key[subject_key] = approval.approval_id
        self._trim()
        return approval

    def get(self, tenant_id: str, session_id: str, approval_id: str) -> Approval:
        approval = self._live(approval_id)
        if approval is None or approval.tenant_id != tenant_id or approval.session_id != session_id:
            raise NotFound(f"approval_id: no approval {approval_id!r} in this session", field="approval_id")
        return approval

    def record(self, tenant_id: str, session_id: str, approval_id: str, choice: ApprovalChoice,
               approver: str) -> Approval:
        approval = self.get(tenant_id, session_id, approval_id)
        if approval.state is not ApprovalState.PENDING:
            raise FailedPrecondition(f"approval_id: approval {approval_id!r} was already answered "
                                     f"({approval.state.value})", reason="APPROVAL_ALREADY_ANSWERED",
                                     field="approval_id")
        approval.approver = approver
        approval.state = {
            ApprovalChoice.APPROVE_ONCE: ApprovalState.APPROVED_ONCE,
            ApprovalChoice.APPROVE_SESSION: ApprovalState.APPROVED_SESSION,
            ApprovalChoice.DENY: ApprovalState.DENIED,
            ApprovalChoice.ABORT: ApprovalState.ABORTED,
        }[choice]
        session = self._session(tenant_id, session_id)
        session.pending_by_key.pop(approval.subject_key, None)
        if choice is ApprovalChoice.APPROVE_SESSION:
            session.approved_keys.add(approval.subject_key)
        return approval

    def use_grant(self, tenant_id: str, session_id: str, approval_id: str, subject_key: str) -> GrantCheck:
        """Check an approval named on an Evaluate call; consumes approve-once grants."""
        approval = self.get(tenant_id, session_id, approval_id)
        if approval.subject_key != subject_key:
            raise FailedPrecondition("approval_id: the approval was given for a different call",
                                     reason="APPROVAL_MISMATCH", field="approval_id")
        state = approval.state
        if state is ApprovalState.APPROVED_ONCE:
            approval.state = ApprovalState.CONSUMED
        return GrantCheck(state, approval)

    def remember_record(self, tenant_id: str, request_id: str, approval_id: str, choice: ApprovalChoice,
                        audit_seq: int) -> None:
        self._recorded[(tenant_id, request_id)] = (approval_id, choice, audit_seq)
        while len(self._recorded) > self.max_approvals:
            self._recorded.popitem(last=False)

    def recorded(self, tenant_id: str, request_id: str) -> tuple[str, ApprovalChoice, int] | None:
        return self._recorded.get((tenant_id, request_id))

    def _live(self, approval_id: str) -> Approval | None:
        approval = self._approvals.get(approval_id)
        if approval is None:
            return None
        if approval.state is ApprovalState.PENDING and self.clock() - approval.created_at > self.ttl_s:
            del self._approvals[approval_id]
            return None
        return approval

    def _session(self, tenant_id: str, session_id: str) -> _SessionApprovals:
        key = (tenant_id, session_id)
        session = self._sessions.get(key)
        if session is None:
            session = self._sessions[key] = _SessionApprovals()
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
        else:
            self._sessions.move_to_end(key)
        return session

    def _trim(self) -> None:
        while len(self._approvals) > self.max_approvals:
            self._approvals.popitem(last=False)
