"""The policy service's use cases: evaluate a call, record an approval, audit.

Judging a call and redacting its arguments is CPU work whose cost grows with
the command, so it runs on a small thread pool, never on the event loop: a
huge command of one tenant cannot hold up another tenant's calls. Each
evaluation has a budget (past it, the evaluator stops and a person decides)
and a hard timeout; one tenant may use all but one of the workers.
"""
from __future__ import annotations

import asyncio
import posixpath
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from services.common.errors import DeadlineExceeded, InvalidArgument, require
from services.common.paging import cursor_int, decode_token, encode_token, page_limit
from services.policy.core.approvals import ApprovalBook, ApprovalChoice, ApprovalState
from services.policy.core.audit import AuditChain, AuditRecord, VerifyReport
from services.policy.core.evaluator import PolicyEvaluator, RuleMatch, ToolCall, Verdict
from services.policy.core.redaction import redact_value
from services.policy.core.rules import Decision

MAX_ID_CHARS = 256
# Nesting of the call's arguments; deeper JSON is refused before any work.
MAX_ARGUMENT_DEPTH = 32

#: Audit chain of refusals whose caller has no tenant (unauthenticated, or a service).
MESH_TENANT = "_mesh"


@dataclass(frozen=True)
class EvaluationLimits:
    # Threads that judge calls; one tenant may use all but one of them.
    num_workers: int = 4
    # The evaluator stops judging after this long and leaves the rest to a person.
    budget_s: float = 0.25
    # A judgement still running after this long fails with DEADLINE_EXCEEDED.
    timeout_s: float = 5.0


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
    # Seconds spent judging the call and redacting it (off the event loop).
    evaluation_s: float = 0.0


@dataclass
class _TenantGate:
    slots: asyncio.Semaphore
    num_users: int = 0


@dataclass
class _Judgement:
    verdict: Verdict
    redacted_arguments: Any
    seconds: float = field(default=0.0)


@dataclass(frozen=True)
class ApprovalResult:
    choice: ApprovalChoice
    audit_seq: int


class PolicyService:
    def __init__(self, rules: PolicySource, approvals: ApprovalBook, audit: AuditChain,
                 limits: EvaluationLimits | None = None) -> None:
        self.rules = rules
        self.approvals = approvals
        self.audit = audit
        self.limits = limits or EvaluationLimits()
        self._workers = ThreadPoolExecutor(max_workers=self.limits.num_workers, thread_name_prefix="policy-judge")
        self._gates: dict[str, _TenantGate] = {}

    def close(self) -> None:
        self._workers.shutdown(wait=False, cancel_futures=True)

    async def evaluate(self, call: ToolCall, approval_id: str = "") -> EvaluateResult:
        call = _validated(call)
        judged = await self._judge_off_loop(call)
        verdict = judged.verdict
        granted_id, by_cache = "", False
        if verdict.decision is Decision.PROMPT:
            verdict, granted_id, by_cache = self._apply_approvals(call, verdict, approval_id)
        body = redact_value({
            "type": "evaluate",
            "session_id": call.session_id,
            "role": call.role,
            "tool_name": call.tool_name,
            "workspace_root": call.workspace_root,
            "risk_level": int(call.risk_level),
            "decision": verdict.decision.name.lower(),
            # One entry per rule: a script of many commands repeats the same ids.
            "rules": list(dict.fromkeys(m.rule_id for m in verdict.matches)),
            "approval_id": granted_id or approval_id,
            "approved_by_cache": by_cache,
            "policy_version": verdict.policy_version,
        })
        body["arguments"] = judged.redacted_arguments
        record = await self.audit.append(call.tenant_id, body, redacted=True)
        pending_id = granted_id if verdict.decision is Decision.PROMPT else ""
        return EvaluateResult(verdict, pending_id, by_cache, record.seq, judged.seconds)

    async def _judge_off_loop(self, call: ToolCall) -> _Judgement:
        evaluator = self.rules.evaluator
        budget_s = self.limits.budget_s

        def judge() -> _Judgement:
            started = time.perf_counter()
            require(_depth(call.arguments) <= MAX_ARGUMENT_DEPTH, "arguments_json",
                    f"must not nest deeper than {MAX_ARGUMENT_DEPTH} levels")
            verdict = evaluator.evaluate(call, deadline=time.monotonic() + budget_s)
            return _Judgement(verdict, redact_value(call.arguments), time.perf_counter() - started)

        gate = self._gates.get(call.tenant_id)
        if gate is None:
            gate = self._gates[call.tenant_id] = _TenantGate(asyncio.Semaphore(max(1, self.limits.num_workers - 1)))
        gate.num_users += 1
        try:
            async with gate.slots:
                running = asyncio.get_running_loop().run_in_executor(self._workers, judge)
                # asyncio.wait leaves the future alone on timeout: a thread cannot be stopped anyway.
                done, _ = await asyncio.wait((running,), timeout=self.limits.timeout_s)
                if not done:
                    # Whatever it ends with later is not anyone's to read; do not log it as lost.
                    running.add_done_callback(lambda f: f.cancelled() or f.exception())
                    raise DeadlineExceeded(f"judging the call took longer than {self.limits.timeout_s} s",
                                           reason="POLICY_EVALUATION_TIMEOUT")
                return running.result()
        finally:
            gate.num_users -= 1
            if gate.num_users == 0:
                del self._gates[call.tenant_id]

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

    async def list_audit_page(self, tenant_id: str, after_seq: int, page_size: int,
                              page_token: str) -> tuple[list[AuditRecord], str]:
        """One page of the tenant's audit entries after ``after_seq`` (or the token's cursor), and the next token."""
        require(after_seq >= 0, "after_seq", "must not be negative")
        scope = f"audit:{tenant_id}"
        limit = page_limit(page_size)
        cursor = decode_token(page_token, scope)
        if cursor is not None:
            after_seq = max(after_seq, cursor_int(cursor))
        records = await self.list_audit(tenant_id, after_seq, limit + 1)
        more = len(records) > limit
        records = records[:limit]
        return records, encode_token(scope, records[-1].seq) if more else ""

    async def record_access_denials(self, denials: Sequence[Mapping[str, Any]]) -> int:
        """Write refused calls to the audit chain of the caller's tenant (``MESH_TENANT`` when unknown)."""
        for i, denial in enumerate(denials):
            require(bool(denial.get("service")) and bool(denial.get("method")) and bool(denial.get("reason")),
                    f"denials[{i}]", "service, method and reason are required")
            tenant = str(denial.get("tenant_id") or MESH_TENANT)[:MAX_ID_CHARS]
            payload = {"type": "access_denied", **{k: v for k, v in denial.items() if k != "tenant_id"}}
            await self.audit.append(tenant, payload)
        return len(denials)

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


def _depth(value: Any) -> int:
    """Nesting depth of a JSON value, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if depth > MAX_ARGUMENT_DEPTH:
            break
        stack.extend((child, depth + 1) for child in children)
    return deepest
