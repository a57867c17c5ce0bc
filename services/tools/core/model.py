"""Dataclasses passed between the servicer, the executor and the tools."""
from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from services.tools.core.output import CapturedText


class RiskLevel(enum.IntEnum):
    """Numbers match llmesh.tools.v1.RiskLevel."""

    UNSPECIFIED = 0
    READ_ONLY = 1
    WRITE = 2
    DANGEROUS = 3


class ToolStatus(enum.IntEnum):
    """Numbers match llmesh.tools.v1.ToolStatus."""

    UNSPECIFIED = 0
    OK = 1
    ERROR = 2
    DENIED = 3
    APPROVAL_REQUIRED = 4
    TIMEOUT = 5
    CANCELLED = 6
    INVALID = 7
    UNAVAILABLE = 8


@dataclass(frozen=True)
class ToolOutput:
    """What a tool hands back when it ran (successfully or not)."""

    ok: bool
    content: CapturedText = field(default_factory=CapturedText.empty)
    stdout: CapturedText = field(default_factory=CapturedText.empty)
    stderr: CapturedText = field(default_factory=CapturedText.empty)
    exit_code: int = 0
    error_reason: str = ""
    error_message: str = ""


class ToolFailure(Exception):
    """The tool could not run (crashed, transport lost): counts against its breaker.

    ``transient`` failures are retried for retryable tools.
    """

    def __init__(self, message: str, *, reason: str = "TOOL_FAILED", transient: bool = True) -> None:
        super().__init__(message)
        self.reason = reason
        self.transient = transient


@dataclass(frozen=True)
class ToolContext:
    """Where and for whom one call runs."""

    tenant_id: str
    session_id: str
    workspace: Any  # services.tools.core.workspace.Workspace; Any avoids an import cycle
    timeout_s: float
    output_cap_bytes: int


class ToolHandler(Protocol):
    # Positional-only: handlers are called positionally and name their parameters freely.
    async def __call__(self, arguments: dict[str, Any], ctx: ToolContext, /) -> ToolOutput: ...


# Returns a token naming the state a cached result depends on (file mtime and
# size, ...), or None when the call must not be served from cache.
StateToken = Callable[[dict[str, Any], ToolContext], Awaitable[str | None]]


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    parameters_schema: dict[str, Any]
    handler: ToolHandler
    version: str = "1"
    risk_level: RiskLevel = RiskLevel.READ_ONLY
    idempotent: bool = False
    retryable: bool = False
    timeout_ms: int = 30_000
    source: str = "builtin"
    # Name the tool has where it lives; the normalised ``name`` is ours.
    original_name: str = ""
    state_token: StateToken | None = None
    # Checks past the schema (kept out of it so the schema the model reads
    # stays short): raise InvalidArgument naming the argument's JSON path.
    check_arguments: Callable[[dict[str, Any]], None] | None = None

    @property
    def cacheable(self) -> bool:
        return self.idempotent and self.state_token is not None


@dataclass(frozen=True)
class CallContext:
    request_id: str
    tenant_id: str
    session_id: str
    role: str


@dataclass(frozen=True)
class ToolInvocation:
    call_id: str
    name: str
    arguments: dict[str, Any]
    arguments_json: str
    timeout_ms: int = 0
    approval_id: str = ""


@dataclass(frozen=True)
class ToolOutcome:
    """The structured result of one call, whatever happened to it."""

    call_id: str
    name: str
    status: ToolStatus
    exit_code: int = 0
    duration_ms: float = 0.0
    content: CapturedText = field(default_factory=CapturedText.empty)
    stdout: CapturedText = field(default_factory=CapturedText.empty)
    stderr: CapturedText = field(default_factory=CapturedText.empty)
    error_reason: str = ""
    error_message: str = ""
    from_cache: bool = False
    approval_id: str = ""
    attempts: int = 0
    # The domain error behind an INVALID/DENIED outcome that a single-call RPC
    # raises as a gRPC status instead of returning (bad arguments, path escape).
    request_error: Exception | None = None

    def with_(self, **changes: Any) -> ToolOutcome:
        return replace(self, **changes)
