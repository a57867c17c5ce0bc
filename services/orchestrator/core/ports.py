"""The ports the agent loop talks through, and the records that cross them.

Adapters implement these over gRPC (`adapters/`); tests pass scripted fakes.
Ports raise `services.common.errors` exceptions: Unavailable for a transient
failure (the core retries it), the others are passed on as they are.
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from services.orchestrator.core.events import AgentEvent, Usage


# ---- inference ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_tokens: tuple[int, ...]
    model: str = ""
    session_id: str = ""
    max_tokens: int = 256
    temperature: float = 0.0
    seed: int | None = None
    grammar: str = ""
    stop: tuple[str, ...] = ()
    priority: int = 0
    # Whose turn this is: the node applies that tenant's merging/caching/priority settings.
    tenant_id: str = ""


@dataclass(frozen=True)
class GenerationChunk:
    text: str
    # Set on the last chunk only: "stop", "length" or "cancelled".
    finish_reason: str = ""
    usage: Usage | None = None
    # Engine's own time to first token, on the last chunk.
    ttft_ms: float = 0.0


class InferencePort(Protocol):
    async def tokenize(self, text: str, *, model: str = "", add_special: bool = False) -> list[int]: ...

    async def context_size(self, model: str = "") -> int: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]: ...


# ---- tools -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    retryable: bool = False
    timeout_ms: int = 0
    risk_level: int = 0


@dataclass(frozen=True)
class ToolInvocation:
    call_id: str
    name: str
    arguments_json: str
    timeout_ms: int = 0
    # An approve-once grant to consume, after a person approved this call.
    approval_id: str = ""


# Names of llmesh.tools.v1.ToolStatus, kept as strings in the core.
STATUS_OK = "TOOL_STATUS_OK"
STATUS_ERROR = "TOOL_STATUS_ERROR"
STATUS_DENIED = "TOOL_STATUS_DENIED"
STATUS_APPROVAL_REQUIRED = "TOOL_STATUS_APPROVAL_REQUIRED"
STATUS_TIMEOUT = "TOOL_STATUS_TIMEOUT"
STATUS_CANCELLED = "TOOL_STATUS_CANCELLED"
STATUS_INVALID = "TOOL_STATUS_INVALID"
STATUS_UNAVAILABLE = "TOOL_STATUS_UNAVAILABLE"


@dataclass(frozen=True)
class ToolOutcome:
    call_id: str
    name: str
    status: str
    output: str = ""
    truncated: bool = False
    duration_ms: float = 0.0
    from_cache: bool = False
    approval_id: str = ""
    justification: str = ""
    error_reason: str = ""
    attempts: int = 1


class ToolsPort(Protocol):
    async def list_tools(self) -> list[ToolSpec]: ...

    async def execute_tools(self, *, request_id: str, tenant_id: str, session_id: str,
                            calls: Sequence[ToolInvocation]) -> list[ToolOutcome]: ...


# ---- policy ------------------------------------------------------------------------------------
APPROVE_ONCE = "APPROVAL_DECISION_APPROVE_ONCE"
APPROVE_SESSION = "APPROVAL_DECISION_APPROVE_SESSION"
DENY = "APPROVAL_DECISION_DENY"
ABORT = "APPROVAL_DECISION_ABORT"
APPROVAL_DECISIONS = (APPROVE_ONCE, APPROVE_SESSION, DENY, ABORT)


class PolicyPort(Protocol):
    async def record_approval(self, *, request_id: str, tenant_id: str, session_id: str, approval_id: str,
                              decision: str, approver: str) -> None: ...


# ---- store -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SessionRecord:
    tenant_id: str
    session_id: str
    title: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    create_time: float = 0.0


@dataclass(frozen=True)
class MessageRecord:
    role: str
    content: str
    metadata: dict[str, Any] = field(default_factory=dict)
    num_tokens: int = 0
    position: int = 0


@dataclass(frozen=True)
class TaskRecord:
    task_id: str
    tenant_id: str
    payload_json: str
    # READY, LEASED, DONE or DEAD (llmesh.store.v1.TaskState without prefix).
    state: str
    attempts: int = 0
    lease_token: str = ""
    worker_id: str = ""
    result_json: str = ""
    last_error: str = ""
    create_time: float = 0.0


@dataclass(frozen=True)
class SessionLockGrant:
    acquired: bool
    # Seq the session's next event gets (the holder is its only writer, so it
    # numbers events itself); 0 when the store does not say.
    next_event_seq: int = 0
    # Grows every time the lock changes hands or lapses, so a holder whose
    # renewal returns another token knows someone may have written meanwhile.
    fencing_token: int = 0
    # Who holds the lock when it was not acquired (empty when acquired or free).
    holder_id: str = ""


# Kinds of SessionControl.
CONTROL_CANCEL = "cancel"
CONTROL_APPROVAL = "approval"
CONTROL_KINDS = (CONTROL_CANCEL, CONTROL_APPROVAL)


@dataclass(frozen=True)
class SessionControl:
    """A request for a session's run, posted where it was received and followed where the run runs."""

    tenant_id: str
    session_id: str
    # CONTROL_CANCEL or CONTROL_APPROVAL.
    kind: str
    # The run it is meant for; empty: the session's active run.
    run_id: str = ""
    # {"reason", "holder_id"} for a cancel, {"approval_id", "decision"} for an approval.
    payload: dict[str, Any] = field(default_factory=dict)
    # Assigned by the store, growing across every session.
    seq: int = 0
    # Wall-clock seconds, from the store.
    create_time: float = 0.0


@dataclass(frozen=True)
class ControlsLive:
    """First item of a control watch: it is live, and controls after `seq` follow."""

    seq: int


class StorePort(Protocol):
    async def create_session(self, *, request_id: str, tenant_id: str, title: str,
                             metadata: dict[str, Any]) -> SessionRecord: ...

    async def get_session(self, *, tenant_id: str, session_id: str) -> SessionRecord: ...

    async def list_sessions(self, *, tenant_id: str, page_size: int,
                            page_token: str) -> tuple[list[SessionRecord], str]: ...

    async def append_messages(self, *, request_id: str, tenant_id: str, session_id: str,
                              messages: Sequence[MessageRecord], fencing_token: int = 0) -> list[int]:
        """`fencing_token` as for append_events."""
        ...

    async def list_messages(self, *, tenant_id: str, session_id: str, after_position: int) -> list[MessageRecord]: ...

    async def append_events(self, *, request_id: str, tenant_id: str, session_id: str,
                            events: Sequence[AgentEvent], idempotency_keys: Sequence[str],
                            fencing_token: int = 0) -> list[int]:
        """Non-zero `fencing_token`: the session lock's token the writer holds; the append is
        refused (FailedPrecondition, reason STALE_LOCK_OWNER) and nothing written once the
        lock has changed hands since."""
        ...

    async def read_events(self, *, tenant_id: str, session_id: str, after_seq: int) -> list[AgentEvent]: ...

    def watch_events(self, *, tenant_id: str, session_id: str, after_seq: int) -> AsyncIterator[AgentEvent]: ...

    async def enqueue_task(self, *, request_id: str, tenant_id: str, queue: str, payload_json: str,
                           idempotency_key: str, max_attempts: int, priority: int = 0) -> TaskRecord: ...

    async def claim_tasks(self, *, queue: str, worker_id: str, max_tasks: int, lease_ms: int) -> list[TaskRecord]: ...

    async def heartbeat_task(self, *, task_id: str, lease_token: str, lease_ms: int) -> None: ...

    async def ack_task(self, *, task_id: str, lease_token: str, result_json: str) -> None: ...

    async def fail_task(self, *, task_id: str, lease_token: str, error: str, permanent: bool) -> None: ...

    async def get_task(self, *, tenant_id: str, task_id: str) -> TaskRecord: ...

    async def cancel_task(self, *, tenant_id: str, task_id: str, reason: str) -> tuple[TaskRecord, str]:
        """Cancel a READY or LEASED task: (the task now, the state it was in); TASK_ENDED if it finished."""

    async def acquire_session_lock(self, *, tenant_id: str, session_id: str, owner_id: str,
                                   lease_ms: int) -> SessionLockGrant: ...

    async def release_session_lock(self, *, tenant_id: str, session_id: str, owner_id: str) -> bool:
        """False when the lock was not `owner_id`'s to release (another holder, or none)."""
        ...

    async def post_session_control(self, *, request_id: str, control: SessionControl) -> SessionControl:
        """Store a control (seq and create_time assigned); a retried request_id returns the first one."""
        ...

    def watch_session_controls(self, *, after_seq: int = 0, from_now: bool = False, tenant_id: str = "",
                               session_id: str = "") -> AsyncIterator[SessionControl | ControlsLive]:
        """ControlsLive first, then every control after its seq (empty tenant: every tenant's)."""
        ...
