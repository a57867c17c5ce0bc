"""Proto <-> core conversions for the policy service."""
from __future__ import annotations

import base64
import json

from google.protobuf import timestamp_pb2
from llmesh.policy.v1 import policy_pb2

from services.common.errors import InvalidArgument
from services.policy.core.audit import AuditRecord, VerifyReport
from services.policy.core.evaluator import ToolCall
from services.policy.core.policy_service import ApprovalResult, EvaluateResult
from services.policy.core.rules import Decision, RiskLevel

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
_DECISIONS = {Decision.ALLOW: policy_pb2.DECISION_ALLOW, Decision.PROMPT: policy_pb2.DECISION_PROMPT,
              Decision.FORBIDDEN: policy_pb2.DECISION_FORBIDDEN}


def tool_call(request: policy_pb2.EvaluateRequest) -> ToolCall:
    try:
        arguments = json.loads(request.arguments_json) if request.arguments_json else {}
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"arguments_json: not valid JSON ({exc.msg} at {exc.pos})",
                              field="arguments_json") from None
    if not isinstance(arguments, dict):
        raise InvalidArgument("arguments_json: must be a JSON object", field="arguments_json")
    if request.risk_level not in RiskLevel.__members__.values():
        raise InvalidArgument(f"risk_level: unknown risk level {request.risk_level}", field="risk_level")
    return ToolCall(request.tenant_id, request.session_id, request.role, request.tool_name, arguments,
                    request.workspace_root, RiskLevel(request.risk_level))


def evaluate_response(result: EvaluateResult) -> policy_pb2.EvaluateResponse:
    verdict = result.verdict
    return policy_pb2.EvaluateResponse(
        decision=_DECISIONS[verdict.decision],
        justification=verdict.justification,
        matched_rules=[policy_pb2.MatchedRule(rule_id=m.rule_id, decision=_DECISIONS[m.decision],
                                              justification=m.justification, subject=m.subject)
                       for m in verdict.matches],
        approval_id=result.approval_id,
        approved_by_cache=result.approved_by_cache,
        audit_seq=result.audit_seq,
    )


def approval_response(result: ApprovalResult) -> policy_pb2.RecordApprovalResponse:
    return policy_pb2.RecordApprovalResponse(decision=int(result.choice), audit_seq=result.audit_seq)


def page_size(value: int) -> int:
    if value < 0:
        raise InvalidArgument("page_size: must not be negative", field="page_size")
    return min(value or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def after_seq_from(request: policy_pb2.ListAuditRequest) -> int:
    if request.after_seq < 0:
        raise InvalidArgument("after_seq: must not be negative", field="after_seq")
    if not request.page_token:
        return request.after_seq
    try:
        decoded = json.loads(base64.urlsafe_b64decode(request.page_token.encode()))
        return int(decoded["after_seq"])
    except (ValueError, KeyError, TypeError):
        raise InvalidArgument("page_token: not a token this service issued", field="page_token") from None


def page_token(after_seq: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"after_seq": after_seq}).encode()).decode()


def audit_entry(record: AuditRecord) -> policy_pb2.AuditEntry:
    entry = policy_pb2.AuditEntry(seq=record.seq, prev_hash=record.prev_hash, entry_hash=record.entry_hash,
                                  payload_json=record.payload_json)
    if record.create_time is not None:
        stamp = timestamp_pb2.Timestamp()
        stamp.FromDatetime(record.create_time)
        entry.create_time.CopyFrom(stamp)
    return entry


def verify_response(report: VerifyReport) -> policy_pb2.VerifyAuditResponse:
    return policy_pb2.VerifyAuditResponse(ok=report.ok, num_checked=report.num_checked,
                                          first_broken_seq=report.first_broken_seq, reason=report.reason)
