"""Typed agent events, the unit of the per-session stream.

An event is created without a seq; the EventHub stamps the session's next
gapless seq before anyone sees it. Bodies are plain dicts with the fields of
the matching proto message, so they serialise to JSON for the store without
the core knowing about protobuf.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from typing import Any

SCHEMA_VERSION = 1

TURN_STARTED = "turn_started"
TOKEN = "token"
TOOL_CALL = "tool_call"
APPROVAL_REQUIRED = "approval_required"
TOOL_RESULT = "tool_result"
COMPACTION = "compaction"
FINAL = "final"
ERROR = "error"

EVENT_TYPES = (TURN_STARTED, TOKEN, TOOL_CALL, APPROVAL_REQUIRED, TOOL_RESULT, COMPACTION, FINAL, ERROR)
# A run's stream ends after one of these.
TERMINAL_TYPES = frozenset({FINAL, ERROR})


@dataclass(frozen=True)
class AgentEvent:
    session_id: str
    run_id: str
    type: str
    body: dict[str, Any]
    seq: int = 0
    create_time: float = field(default_factory=time.time)
    schema_version: int = SCHEMA_VERSION

    @property
    def is_terminal(self) -> bool:
        return self.type in TERMINAL_TYPES

    def with_seq(self, seq: int) -> AgentEvent:
        return replace(self, seq=seq)

    def payload_json(self) -> str:
        """What the store keeps; `from_payload` reads it back."""
        return json.dumps({"run_id": self.run_id, "body": self.body, "create_time": self.create_time},
                          separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_payload(cls, session_id: str, seq: int, type_: str, payload: bytes | str,
                     schema_version: int = SCHEMA_VERSION) -> AgentEvent:
        data = json.loads(payload)
        return cls(session_id=session_id, run_id=data.get("run_id", ""), type=type_, body=data.get("body", {}),
                   seq=seq, create_time=float(data.get("create_time", 0.0)), schema_version=schema_version)


@dataclass(frozen=True)
class Usage:
    """What the model calls of a run consumed (as reported by inference)."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    num_model_calls: int = 0
    num_tool_calls: int = 0

    def add(self, other: Usage) -> Usage:
        return Usage(*(a + b for a, b in zip(_fields(self), _fields(other), strict=True)))

    def as_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "cached_tokens": self.cached_tokens,
                "generated_tokens": self.generated_tokens, "num_model_calls": self.num_model_calls,
                "num_tool_calls": self.num_tool_calls}


def _fields(u: Usage) -> tuple[int, ...]:
    return (u.prompt_tokens, u.cached_tokens, u.generated_tokens, u.num_model_calls, u.num_tool_calls)
