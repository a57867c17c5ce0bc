"""Approval requests, approve-once grants and per-session approvals.

Everything is keyed by (tenant_id, session_id): an approval made in one
session is invisible to every other session and tenant, and an id from
elsewhere is answered exactly like an unknown id, so nothing leaks.

``ApprovalPort`` is where approvals are kept. ``ApprovalBook`` here keeps them
in this process (tests, a policy service run without a store); the
store-backed book (``services.policy.adapters.store_approvals``) keeps them in
the store service, shared by every policy replica and kept across restarts.
Both offer the same small steps (open, get, decide, note the audit entry);
what an answer means for a call is decided once, in ``PolicyService``.
"""
from __future__ import annotations

import enum
import hashlib
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Protocol

from services.common.errors import FailedPrecondition, NotFound

#: Reason of the FailedPrecondition raised when an approval left the state a change expected.
STATE_CHANGED = "APPROVAL_STATE_CHANGED"


class ApprovalChoice(enum.IntEnum):
    """Mirrors llmesh.policy.v1.ApprovalDecision numbers."""

    APPROVE_ONCE = 1
    APPROVE_SESSION = 2
    DENY = 3
    ABORT = 4


class ApprovalState(enum.Enum):
    """Lifecycle of an approval; the values are the store's state strings."""

    PENDING = "pending"
    APPROVED_ONCE = "approved_once"
    CONSUMED = "consumed"
    APPROVED_SESSION = "approved_session"
    DENIED = "denied"
    ABORTED = "aborted"


#: The state a person's answer puts a pending approval in.
ANSWERED_STATE: Mapping[ApprovalChoice, ApprovalState] = {
    ApprovalChoice.APPROVE_ONCE: ApprovalState.APPROVED_ONCE,
    ApprovalChoice.APPROVE_SESSION: ApprovalState.APPROVED_SESSION,
    ApprovalChoice.DENY: ApprovalState.DENIED,
    ApprovalChoice.ABORT: ApprovalState.ABORTED,
}

#: Every change an approval may go through: a person answers a pending
#: approval, and a call uses up an approve-once grant.
TRANSITIONS: frozenset[tuple[ApprovalState, ApprovalState]] = frozenset(
    {(ApprovalState.PENDING, state) for state in ANSWERED_STATE.values()}
    | {(ApprovalState.APPROVED_ONCE, ApprovalState.CONSUMED)})


def choice_of(state: ApprovalState) -> ApprovalChoice:
    """The answer that led to ``state`` (a used-up grant was an approve-once)."""
    if state is ApprovalState.CONSUMED:
        return ApprovalChoice.APPROVE_ONCE
    for choice, answered in ANSWERED_STATE.items():
        if answered is state:
            return choice
    raise ValueError(f"approval state {state.value!r} is not an answer")


@dataclass(frozen=True)
class Approval:
    approval_id: str
    tenant_id: str
    session_id: str
    #: The normalised call it is for (``Verdict.subject_key``).
    subject_key: str
    state: ApprovalState = ApprovalState.PENDING
    #: Who answered; empty while pending.
    approver: str = ""
    #: request_id of the last change made with one (the answer: a grant is used up without one).
    decided_request_id: str = ""
    #: Seq of the audit entry that recorded the answer; 0 until noted.
    audit_seq: int = 0


@dataclass(frozen=True)
class Decided:
    """An approval after a change, and whether the change was made earlier by the same request_id."""

    approval: Approval
    replayed: bool = False


class ApprovalPort(Protocol):
    """Where approvals are kept."""

    @property
    def num_held(self) -> int:
        """Approvals this process holds in memory (all of them, or the cached grants)."""

    async def open(self, tenant_id: str, session_id: str, subject_key: str) -> Approval:
        """The pending approval for this call, opening one if none is waiting."""

    async def get(self, tenant_id: str, session_id: str, approval_id: str) -> Approval:
        """The approval; NotFound (field approval_id) if unknown, expired or of another session."""

    async def session_allows(self, tenant_id: str, session_id: str, subject_key: str) -> bool:
        """Whether an approval for the rest of the session covers this call, as recorded right now."""

    async def decide(self, tenant_id: str, session_id: str, approval_id: str, from_state: ApprovalState,
                     to_state: ApprovalState, approver: str, request_id: str) -> Decided:
        """Move the approval from ``from_state`` to ``to_state`` atomically.

        FailedPrecondition (reason ``STATE_CHANGED``) when it is no longer in
        ``from_state``; a retry with the request_id that made the change gets
        the approval as that change left it, ``replayed``. An empty
        ``approver`` keeps the one recorded; an empty ``request_id`` keeps
        ``decided_request_id`` (using up a grant leaves the answer's id).
        """

    async def note_audit(self, tenant_id: str, session_id: str, approval_id: str, audit_seq: int) -> Approval:
        """Record the seq of the audit entry that logged the answer."""


def not_found(approval_id: str) -> NotFound:
    return NotFound(f"approval_id: no approval {approval_id!r} in this session", reason="APPROVAL_NOT_FOUND",
                    field="approval_id")


def state_changed(approval_id: str, state: ApprovalState) -> FailedPrecondition:
    return FailedPrecondition(f"approval_id: approval {approval_id!r} is {state.value} now", reason=STATE_CHANGED,
                              field="approval_id")


_PLAIN_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
#: Subject keys longer than this (in UTF-8) are kept as their digest.
MAX_PLAIN_SUBJECT_BYTES = 16 * 1024
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def approval_subject(subject_key: str) -> str:
    """The key an approval is kept under for a call with ``subject_key``.

    Short plain text as it is, so the audit entry of an answer names the
    call; a longer key (a whole script, a large argument object) or one with
    characters a database cannot hold (NUL) as ``sha256:<hex>``, which no
    call's own key can be (they start with ``command:``, ``file:`` or ``tool:``).
    """
    raw = subject_key.encode("utf-8", "surrogatepass")
    if len(raw) <= MAX_PLAIN_SUBJECT_BYTES and not _UNSTORABLE.search(subject_key):
        return subject_key
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def change_request_id(request_id: str) -> str:
    """The id a change is kept under: a plain id as given, any other by digest, a new one when empty.

    So any caller's request_id fits the id rules of wherever approvals are kept.
    """
    if not request_id:
        return uuid.uuid4().hex
    if _PLAIN_ID.match(request_id):
        return request_id
    return "sha256:" + hashlib.sha256(request_id.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass
class _Entry:
    approval: Approval
    created_at: float


class ApprovalBook:
    """ApprovalPort in this process; bounded, oldest entries dropped first."""

    def __init__(self, ttl_s: float = 3600.0, max_approvals: int = 100_000, max_sessions: int = 50_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.max_approvals = max_approvals
        self.max_sessions = max_sessions
        self.clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        # Per session: approved subject keys, and the pending approval id per subject key.
        self._approved: OrderedDict[tuple[str, str], set[str]] = OrderedDict()
        self._pending: dict[tuple[str, str, str], str] = {}
        # (tenant, request_id) -> (approval_id, the approval as that change left it), for retries.
        self._changes: OrderedDict[tuple[str, str], tuple[str, Approval]] = OrderedDict()

    @property
    def num_held(self) -> int:
        """Approvals held (pending and decided, not yet expired or trimmed)."""
        return len(self._entries)

    async def open(self, tenant_id: str, session_id: str, subject_key: str) -> Approval:
        key = (tenant_id, session_id, subject_key)
        existing_id = self._pending.get(key)
        existing = self._live(existing_id) if existing_id else None
        if existing is not None and existing.approval.state is ApprovalState.PENDING:
            return existing.approval
        approval = Approval(uuid.uuid4().hex, tenant_id, session_id, subject_key)
        self._entries[approval.approval_id] = _Entry(approval, self.clock())
        self._pending[key] = approval.approval_id
        self._trim()
        return approval

    async def get(self, tenant_id: str, session_id: str, approval_id: str) -> Approval:
        return self._find(tenant_id, session_id, approval_id).approval

    async def session_allows(self, tenant_id: str, session_id: str, subject_key: str) -> bool:
        approved = self._approved.get((tenant_id, session_id))
        return approved is not None and subject_key in approved

    async def decide(self, tenant_id: str, session_id: str, approval_id: str, from_state: ApprovalState,
                     to_state: ApprovalState, approver: str, request_id: str) -> Decided:
        if (from_state, to_state) not in TRANSITIONS:
            raise ValueError(f"no change from {from_state.value} to {to_state.value}")
        entry = self._find(tenant_id, session_id, approval_id)
        earlier = self._changes.get((tenant_id, request_id)) if request_id else None
        if earlier is not None and earlier[0] == approval_id:
            return Decided(earlier[1], replayed=True)
        approval = entry.approval
        if approval.state is not from_state:
            raise state_changed(approval_id, approval.state)
        approval = replace(approval, state=to_state, approver=approver or approval.approver,
                           decided_request_id=request_id or approval.decided_request_id)
        entry.approval = approval
        if from_state is ApprovalState.PENDING:
            self._forget_pending(approval)
        if to_state is ApprovalState.APPROVED_SESSION:
            self._approved_keys(tenant_id, session_id).add(approval.subject_key)
        if request_id:
            self._changes[(tenant_id, request_id)] = (approval_id, approval)
            while len(self._changes) > self.max_approvals:
                self._changes.popitem(last=False)
        return Decided(approval)

    async def note_audit(self, tenant_id: str, session_id: str, approval_id: str, audit_seq: int) -> Approval:
        entry = self._find(tenant_id, session_id, approval_id)
        entry.approval = replace(entry.approval, audit_seq=audit_seq)
        return entry.approval

    def _find(self, tenant_id: str, session_id: str, approval_id: str) -> _Entry:
        entry = self._live(approval_id)
        if entry is None or entry.approval.tenant_id != tenant_id or entry.approval.session_id != session_id:
            raise not_found(approval_id)
        return entry

    def _live(self, approval_id: str) -> _Entry | None:
        entry = self._entries.get(approval_id)
        if entry is None:
            return None
        if entry.approval.state is ApprovalState.PENDING and self.clock() - entry.created_at > self.ttl_s:
            del self._entries[approval_id]
            self._forget_pending(entry.approval)
            return None
        return entry

    def _approved_keys(self, tenant_id: str, session_id: str) -> set[str]:
        key = (tenant_id, session_id)
        approved = self._approved.get(key)
        if approved is None:
            approved = self._approved[key] = set()
            while len(self._approved) > self.max_sessions:
                self._approved.popitem(last=False)
        else:
            self._approved.move_to_end(key)
        return approved

    def _trim(self) -> None:
        while len(self._entries) > self.max_approvals:
            _, dropped = self._entries.popitem(last=False)
            self._forget_pending(dropped.approval)

    def _forget_pending(self, approval: Approval) -> None:
        key = (approval.tenant_id, approval.session_id, approval.subject_key)
        if self._pending.get(key) == approval.approval_id:
            del self._pending[key]
