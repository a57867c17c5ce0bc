"""Builders shared by the policy tests."""
from __future__ import annotations

from pathlib import Path

from services.policy.adapters.memory_audit_log import MemoryAuditLog
from services.policy.core.approvals import ApprovalBook
from services.policy.core.audit import AuditChain
from services.policy.core.evaluator import PolicyEvaluator, ToolCall
from services.policy.core.policy_holder import PolicyHolder
from services.policy.core.policy_loader import load_policy
from services.policy.core.policy_service import PolicyService
from services.policy.core.rules import Policy, RiskLevel

DEFAULT_POLICY_PATH = Path(__file__).resolve().parents[2] / "services" / "policy" / "default_policy.yaml"
WORKSPACE = "/srv/work/project"
TEST_KEY = b"k" * 32

_default_policy: Policy | None = None


def default_policy() -> Policy:
    global _default_policy
    if _default_policy is None:
        _default_policy = load_policy(DEFAULT_POLICY_PATH.read_text(), "default_policy.yaml")
    return _default_policy


def make_evaluator(policy: Policy | None = None) -> PolicyEvaluator:
    return PolicyEvaluator(policy or default_policy())


def shell_call(command: str, *, tenant: str = "acme", session: str = "s1", role: str = "",
               workspace: str = WORKSPACE) -> ToolCall:
    return ToolCall(tenant, session, role, "shell", {"command": command}, workspace, RiskLevel.DANGEROUS)


def tool_call(tool: str, arguments: dict, *, risk: RiskLevel = RiskLevel.UNSPECIFIED, tenant: str = "acme",
              session: str = "s1", role: str = "") -> ToolCall:
    return ToolCall(tenant, session, role, tool, arguments, WORKSPACE, risk)


def make_service(policy: Policy | None = None) -> tuple[PolicyService, MemoryAuditLog]:
    log = MemoryAuditLog()
    service = PolicyService(PolicyHolder(policy or default_policy()), ApprovalBook(), AuditChain(log, TEST_KEY))
    return service, log
