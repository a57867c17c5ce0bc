"""Domain records passed between the store's layers (no protobuf, no SQL)."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SessionRecord:
    tenant_id: str
    session_id: str
    title: str
    metadata_json: str
    create_ms: int
    update_ms: int


@dataclass(frozen=True)
class NewSession:
    tenant_id: str
    session_id: str
    title: str
    metadata_json: str
    request_id: str


@dataclass(frozen=True)
class NewMessage:
    role: str
    content: str
    metadata_json: str
    num_tokens: int


@dataclass(frozen=True)
class MessageRecord:
    position: int
    role: str
    content: str
    metadata_json: str
    num_tokens: int
    create_ms: int


@dataclass(frozen=True)
class NewEvent:
    type: str
    payload: bytes
    idempotency_key: str
    schema_version: int


@dataclass(frozen=True)
class EventRecord:
    session_id: str
    seq: int
    type: str
    payload: bytes
    idempotency_key: str
    schema_version: int
    create_ms: int


@dataclass(frozen=True)
class EventAppend:
    """The events of one append request that survived the overflow policy."""

    tenant_id: str
    session_id: str
    events: list[NewEvent]
    # The session lock's fencing token the writer holds; 0: unfenced.
    fencing_token: int = 0


class TaskState(enum.IntEnum):
    # Values match the proto enum so conversion is a cast.
    READY = 1
    LEASED = 2
    DONE = 3
    DEAD = 4
    CANCELLED = 5


@dataclass(frozen=True)
class NewTask:
    tenant_id: str
    queue: str
    priority: int
    payload_json: str
    idempotency_key: str
    max_attempts: int


@dataclass(frozen=True)
class TaskRecord:
    task_id: str
    tenant_id: str
    queue: str
    priority: int
    payload_json: str
    state: TaskState
    attempts: int
    max_attempts: int
    worker_id: str
    lease_token: str
    lease_expire_ms: int
    run_after_ms: int
    result_json: str
    last_error: str
    create_ms: int


class DeliveryState(enum.IntEnum):
    # Values match the proto enum so conversion is a cast.
    PENDING = 1
    CLAIMED = 2
    DELIVERED = 3
    DEAD = 4


# Event types a webhook may subscribe to, and the stored event types that make them.
WEBHOOK_EVENT_TYPES = ("run.final", "run.error", "approval.required", "task.done", "task.dead")
WEBHOOK_TYPE_OF_EVENT = {"final": "run.final", "error": "run.error", "approval_required": "approval.required"}


@dataclass(frozen=True)
class WebhookRecord:
    tenant_id: str
    webhook_id: str
    url: str
    event_types: tuple[str, ...]
    secret: str
    max_attempts: int
    create_ms: int


@dataclass(frozen=True)
class DeliveryRecord:
    delivery_id: str
    tenant_id: str
    webhook_id: str
    url: str
    destination: str
    session_id: str
    event_type: str
    body: bytes
    state: DeliveryState
    attempts: int
    max_attempts: int
    next_attempt_ms: int
    last_error: str
    last_status: int
    create_ms: int
    delivered_ms: int
    seq: int
    claim_token: str = ""
    # The webhook's signing secret, on claims only.
    secret: str = ""


@dataclass(frozen=True)
class LockResult:
    acquired: bool
    holder_id: str
    lease_expire_ms: int
    fencing_token: int
    # Seq the session's next event gets, when the lock was acquired; 0 otherwise.
    next_event_seq: int = 0


@dataclass(frozen=True)
class AuditRecord:
    tenant_id: str
    seq: int
    prev_hash: str
    entry_hash: str
    payload_json: str
    create_ms: int = 0


class ApprovalState(enum.StrEnum):
    """Lifecycle of an approval; the values are the strings of the contract."""

    PENDING = "pending"
    APPROVED_ONCE = "approved_once"
    CONSUMED = "consumed"
    APPROVED_SESSION = "approved_session"
    DENIED = "denied"
    ABORTED = "aborted"


#: Every change an approval may go through: a person answers a pending
#: approval, and a call uses up an approve-once grant.
APPROVAL_TRANSITIONS: frozenset[tuple[ApprovalState, ApprovalState]] = frozenset(
    {(ApprovalState.PENDING, answered) for answered in (
        ApprovalState.APPROVED_ONCE, ApprovalState.APPROVED_SESSION, ApprovalState.DENIED, ApprovalState.ABORTED)}
    | {(ApprovalState.APPROVED_ONCE, ApprovalState.CONSUMED)})


def approval_reachable(start: ApprovalState, end: ApprovalState) -> bool:
    """Whether ``end`` is ``start`` or follows it by allowed changes."""
    seen, frontier = {start}, [start]
    while frontier:
        state = frontier.pop()
        for before, after in APPROVAL_TRANSITIONS:
            if before is state and after not in seen:
                seen.add(after)
                frontier.append(after)
    return end in seen


@dataclass(frozen=True)
class NewApproval:
    tenant_id: str
    session_id: str
    approval_id: str
    subject_key: str
    ttl_ms: int


@dataclass(frozen=True)
class ApprovalChange:
    """A compare-and-set of an approval's state (DecideApproval)."""

    tenant_id: str
    session_id: str
    approval_id: str
    from_state: ApprovalState
    to_state: ApprovalState
    # Empty keeps the recorded approver (a grant being used up).
    approver: str
    # Empty: the change cannot be recognised when retried.
    request_id: str


@dataclass(frozen=True)
class ApprovalRecord:
    tenant_id: str
    session_id: str
    approval_id: str
    subject_key: str
    state: ApprovalState
    approver: str
    create_ms: int
    expire_ms: int
    decided_request_id: str
    audit_seq: int
    change_seq: int


class ControlKind(enum.StrEnum):
    CANCEL = "cancel"
    APPROVAL = "approval"


@dataclass(frozen=True)
class NewSessionControl:
    tenant_id: str
    session_id: str
    kind: ControlKind
    run_id: str
    payload_json: str
    # Per tenant: a repeat returns the first control.
    request_id: str


@dataclass(frozen=True)
class SessionControlRecord:
    tenant_id: str
    session_id: str
    seq: int
    kind: str
    run_id: str
    payload_json: str
    create_ms: int


@dataclass(frozen=True)
class Page:
    items: list = field(default_factory=list)
    next_page_token: str = ""
