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

from services.common.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, require
from services.common.paging import cursor_int, decode_token, encode_token, page_limit
from services.policy.core.approvals import (
    ANSWERED_STATE,
    STATE_CHANGED,
    Approval,
    ApprovalChoice,
    ApprovalPort,
    ApprovalState,
    approval_subject,
    change_request_id,
    choice_of,
)
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
    # The key approvals of this call are kept under (digesting a long key is work too).
    approval_key: str
    seconds: float = field(default=0.0)


@dataclass(frozen=True)
class ApprovalResult:
    choice: ApprovalChoice
    audit_seq: int


class PolicyService:
    def __init__(self, rules: PolicySource, approvals: ApprovalPort, audit: AuditChain,
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
            verdict, granted_id, by_cache = await self._apply_approvals(call, verdict, judged.approval_key,
                                                                        approval_id)
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
            return _Judgement(verdict, redact_value(call.arguments), approval_subject(verdict.subject_key),
                              time.perf_counter() - started)

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

    async def _apply_approvals(self, call: ToolCall, verdict: Verdict, key: str,
                               approval_id: str) -> tuple[Verdict, str, bool]:
        if approval_id:
            state, approval = await self._use_grant(call, key, approval_id)
            if state in (ApprovalState.APPROVED_ONCE, ApprovalState.APPROVED_SESSION):
                return _overridden(verdict, Decision.ALLOW, f"approved by {approval.approver}",
                                   f"approval:{approval_id}"), "", False
            if state in (ApprovalState.DENIED, ApprovalState.ABORTED, ApprovalState.CONSUMED):
                why = ("the approval was already used" if state is ApprovalState.CONSUMED
                       else f"denied by {approval.approver}")
                return _overridden(verdict, Decision.FORBIDDEN, why, f"approval:{approval_id}"), "", False
            return verdict, approval.approval_id, False
        # Asked of the book right now (not only of a replica's cache), so a grant
        # recorded through any replica is honoured before a new request is opened.
        if await self.approvals.session_allows(call.tenant_id, call.session_id, key):
            return _overridden(verdict, Decision.ALLOW, "approved earlier for this session",
                               "approval:session"), "", True
        return verdict, (await self.approvals.open(call.tenant_id, call.session_id, key)).approval_id, False

    async def _use_grant(self, call: ToolCall, subject_key: str, approval_id: str) -> tuple[ApprovalState, Approval]:
        """What the approval named on a call amounts to; an approve-once grant is used up here, by one call only."""
        approval = await self.approvals.get(call.tenant_id, call.session_id, approval_id)
        if approval.subject_key != subject_key:
            raise FailedPrecondition("approval_id: the approval was given for a different call",
                                     reason="APPROVAL_MISMATCH", field="approval_id")
        if approval.state is not ApprovalState.APPROVED_ONCE:
            return approval.state, approval
        try:
            # No request_id: the approval keeps the answer's, which RecordApproval retries look for.
            used = await self.approvals.decide(call.tenant_id, call.session_id, approval_id,
                                               ApprovalState.APPROVED_ONCE, ApprovalState.CONSUMED, "", "")
        except FailedPrecondition as exc:
            if exc.reason != STATE_CHANGED:
                raise
            # Another call (on this replica or another) used the grant first.
            return ApprovalState.CONSUMED, approval
        return ApprovalState.APPROVED_ONCE, used.approval

    async def record_approval(self, tenant_id: str, session_id: str, approval_id: str, choice: int,
                              approver: str, request_id: str) -> ApprovalResult:
        """Answer a pending approval: the change, then its audit entry, then the entry's seq on the approval.

        A retry with the same request_id is answered from the approval (its
        ``decided_request_id`` and ``audit_seq``); one that finds the answer
        made but not yet audited (the earlier attempt failed in between)
        writes the audit entry then.
        """
        _require_id(tenant_id, "tenant_id")
        _require_id(session_id, "session_id")
        _require_id(approval_id, "approval_id")
        require(bool(approver.strip()), "approver", "must name who answered")
        require(len(approver) <= MAX_ID_CHARS, "approver", f"must be at most {MAX_ID_CHARS} characters")
        if choice not in ApprovalChoice.__members__.values():
            raise InvalidArgument("decision: must be APPROVE_ONCE, APPROVE_SESSION, DENY or ABORT", field="decision")
        change_id = change_request_id(request_id)
        approval = await self.approvals.get(tenant_id, session_id, approval_id)
        if not (request_id and approval.decided_request_id == change_id):
            try:
                decided = await self.approvals.decide(tenant_id, session_id, approval_id, ApprovalState.PENDING,
                                                      ANSWERED_STATE[ApprovalChoice(choice)], approver, change_id)
            except FailedPrecondition as exc:
                if exc.reason != STATE_CHANGED:
                    raise
                current = await self.approvals.get(tenant_id, session_id, approval_id)
                raise FailedPrecondition(f"approval_id: approval {approval_id!r} was already answered "
                                         f"({current.state.value})", reason="APPROVAL_ALREADY_ANSWERED",
                                         field="approval_id") from None
            # A replayed change may predate its audit note: read the approval as it is now.
            approval = (await self.approvals.get(tenant_id, session_id, approval_id) if decided.replayed
                        else decided.approval)
        chosen = choice_of(approval.state)
        if approval.audit_seq:
            return ApprovalResult(chosen, approval.audit_seq)
        record = await self.audit.append(tenant_id, {
            "type": "approval",
            "session_id": session_id,
            "approval_id": approval_id,
            "decision": chosen.name.lower(),
            "approver": approval.approver,
            "subject": approval.subject_key,
        })
        await self.approvals.note_audit(tenant_id, session_id, approval_id, record.seq)
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
