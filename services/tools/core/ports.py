"""What the executor needs from the policy service."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol


class PolicyDecision(enum.Enum):
    ALLOW = "allow"
    PROMPT = "prompt"
    FORBIDDEN = "forbidden"


@dataclass(frozen=True)
class PolicyQuery:
    tenant_id: str
    session_id: str
    role: str
    tool_name: str
    arguments_json: str
    workspace_root: str
    risk_level: int
    approval_id: str = ""


@dataclass(frozen=True)
class PolicyVerdict:
    decision: PolicyDecision
    justification: str = ""
    # Set with PROMPT: the id a person approves and the caller sends back.
    approval_id: str = ""


class PolicyUnavailable(Exception):
    """Policy could not be asked; the call must not run (fail closed)."""


class PolicyPort(Protocol):
    async def evaluate(self, query: PolicyQuery) -> PolicyVerdict: ...


class AllowAllPolicy:
    """Policy checks off (``policy_target`` empty): for development only."""

    async def evaluate(self, query: PolicyQuery) -> PolicyVerdict:
        return PolicyVerdict(PolicyDecision.ALLOW, "policy checks disabled")
