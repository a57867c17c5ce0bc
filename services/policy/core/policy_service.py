"""The policy service's use cases: evaluate a call, record an approval, audit."""
from __future__ import annotations

import posixpath
from dataclasses import dataclass, replace
from typing import Protocol

from services.common.errors import InvalidArgument, require
from services.policy.core.approvals import ApprovalBook, ApprovalChoice, ApprovalState
from services.policy.core.audit import AuditChain, AuditRecord, VerifyReport
from services.policy.core.evaluator import PolicyEvaluator, RuleMatch, ToolCall, Verdict
from services.policy.core.rules import Decision

MAX_ID_CHARS = 256


class PolicySource(Protocol):
    """Hands out the evaluator for the rules in force right now."""

    @property
    def evaluator(self) -> PolicyEvaluator: ...


@dataclass(frozen=True)
class EvaluateResult:
    verdict: Verdict
    approval_id: str
    approved_by_cache: bool
    audit_seq: int


@dataclass(frozen=True)
class ApprovalResult:
    choice: ApprovalChoice
    audit_seq: int


class PolicyService:
    def __init__(self, rules: PolicySource, approvals: ApprovalBook, audit: AuditChain) -> None:
        self.rules = rules
        self.approvals = approvals
        self.audit = audit

    async def evaluate(self, call: ToolCall, approval_id: str = "") -> EvaluateResult:
        call = _validated(call)
        verdict = self.rules.evaluator.evaluate(call)
        granted_id, by_cache = "", False
        if verdict.decision is Decision.PROMPT:
            verdict, granted_id, by_cache = self._apply_approvals(call, verdict, approval_id)
        record = await self.audit.append(call.tenant_id, {
            "type": "evaluate",
            "session_id": call.session_id,
            "role": call.role,
            "tool_name": call.tool_name,
            "arguments": call.arguments,
            "workspace_root": call.workspace_root,
            "risk_level": int(call.risk_level),
            "decision": verdict.decision.name.lower(),
            "rules": [m.rule_id for m in verdict.matches],
            "approval_id": granted_id or approval_id,
            "approved_by_cache": by_cache,
            "policy_version": verdict.policy_version,
        })
        pending_id = granted_id if verdict.decision is Decision.PROMPT else ""
        return EvaluateResult(verdict, pending_id, by_cache, record.seq)

    def _apply_approvals(self, call: ToolCall, verdict: Verdict, approval_id: str) -> tuple[Verdict, str, bool]:
        key = verdict.subject_key
        if approval_id:
            grant = self.approvals.use_grant(call.tenant_id, call.session_id, approval_id, key)
            if grant.state in (ApprovalState.APPROVED_ONCE, ApprovalState.APPROVED_SESSION):
                return _overridden(verdict, Decision.ALLOW, f"approved by {grant.approval.approver}",
                                   f"approval:{approval_id}"), "", False
            if grant.state in (ApprovalState.DENIED, ApprovalState.ABORTED, ApprovalState.CONSUMED):
                why = ("the approval was already used" if grant.state is ApprovalState.CONSUMED
                       else f"denied by {grant.approval.approver}")
                return _overridden(verdict, Decision.FORBIDDEN, why, f"approval:{approval_id}"), "", False
            return verdict, grant.approval.approval_id, False
        if self.approvals.session_allows(call.tenant_id, call.session_id, key):
            return _overridden(verdict, Decision.ALLOW, "approved earlier for this session",
                               "approval:session"), "", True
        return verdict, self.approvals.request(call.tenant_id, call.session_id, key).approval_id, False

    async def record_approval(self, tenant_id: str, session_id: str, approval_id: str, choice: int,
                              approver: str, request_id: str) -> ApprovalResult:
        _require_id(tenant_id, "tenant_id")
        _require_id(session_id, "session_id")
        _require_id(approval_id, "approval_id")
        require(bool(approver.strip()), "approver", "must name who answered")
        if choice not in ApprovalChoice.__members__.values():
            raise InvalidArgument("decision: must be APPROVE_ONCE, APPROVE_SESSION, DENY or ABORT", field="decision")
        if request_id:
            earlier = self.approvals.recorded(tenant_id, request_id)
            if earlier is not None and earlier[0] == approval_id:
                return ApprovalResult(earlier[1], earlier[2])
        chosen = ApprovalChoice(choice)
        approval = self.approvals.record(tenant_id, session_id, approval_id, chosen, approver)
        record = await self.audit.append(tenant_id, {
            "type": "approval",
            "session_id": session_id,
            "approval_id": approval_id,
            "decision": chosen.name.lower(),
            "approver": approver,
            "subject": approval.subject_key,
        })
        if request_id:
            self.approvals.remember_record(tenant_id, request_id, approval_id, chosen, record.seq)
        return ApprovalResult(chosen, record.seq)

    async def list_audit(self, tenant_id: str, after_seq: int, limit: int) -> list[AuditRecord]:
        _require_id(tenant_id, "tenant_id")
        require(after_seq >= 0, "after_seq", "must not be negative")
        return await self.audit.list(tenant_id, after_seq, limit)

    async def verify_audit(self, tenant_id: str) -> VerifyReport:
        _require_id(tenant_id, "tenant_id")
        return await self.audit.verify(tenant_id)


def _overridden(verdict: Verdict, decision: Decision, why: str, rule_id: str) -> Verdict:
    match = RuleMatch(rule_id, decision, why, verdict.subject_key)
    return replace(verdict, decision=decision, justification=why, matches=verdict.matches + (match,))


def _require_id(value: str, field: str) -> None:
    require(bool(value), field, "is required")
    require(len(value) <= MAX_ID_CHARS, field, f"must be at most {MAX_ID_CHARS} characters")


def _validated(call: ToolCall) -> ToolCall:
    _require_id(call.tenant_id, "tenant_id")
    _require_id(call.session_id, "session_id")
    _require_id(call.tool_name, "tool_name")
    workspace = call.workspace_root
    if workspace:
        require(workspace.startswith("/"), "workspace_root", "must be an absolute path")
        workspace = "/" + posixpath.normpath(workspace).lstrip("/")
    return replace(call, workspace_root=workspace)
