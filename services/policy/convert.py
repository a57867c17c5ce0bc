"""Proto <-> core conversions for the policy service."""
from __future__ import annotations

import json
from typing import Any, cast

from google.protobuf import timestamp_pb2
from llmesh.policy.v1 import policy_pb2

from services.common.errors import InvalidArgument
from services.policy.core.audit import AuditRecord, VerifyReport
from services.policy.core.evaluator import ToolCall
from services.policy.core.policy_service import ApprovalResult, EvaluateResult
from services.policy.core.rules import Decision, RiskLevel

# A command is capped at 64 KiB; the rest of a call (stdin, env) gets room, but not without bound.
MAX_ARGUMENTS_JSON_CHARS = 1024 * 1024
_DECISIONS = {Decision.ALLOW: policy_pb2.DECISION_ALLOW, Decision.PROMPT: policy_pb2.DECISION_PROMPT,
              Decision.FORBIDDEN: policy_pb2.DECISION_FORBIDDEN}


def tool_call(request: policy_pb2.EvaluateRequest) -> ToolCall:
    if len(request.arguments_json) > MAX_ARGUMENTS_JSON_CHARS:
        raise InvalidArgument(f"arguments_json: longer than {MAX_ARGUMENTS_JSON_CHARS} characters",
                              field="arguments_json")
    try:
        arguments = json.loads(request.arguments_json) if request.arguments_json else {}
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"arguments_json: not valid JSON ({exc.msg} at {exc.pos})",
                              field="arguments_json") from None
    except RecursionError:
        raise InvalidArgument("arguments_json: nested too deeply", field="arguments_json") from None
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
    # protoc's .pyi types enum fields as the enum class (no int constructor at runtime); the numbers match.
    decision = cast(policy_pb2.ApprovalDecision, int(result.choice))
    return policy_pb2.RecordApprovalResponse(decision=decision, audit_seq=result.audit_seq)


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


def denial(d: policy_pb2.AccessDenial, where: str = "denial") -> dict[str, Any]:
    """A refused call as the audit payload stores it."""
    first_time = ""
    if d.HasField("first_time"):
        try:
            first_time = d.first_time.ToJsonString()
        except ValueError:
            raise InvalidArgument(f"{where}.first_time: not a valid timestamp",
                                  field=f"{where}.first_time") from None
    return {"service": d.service, "method": d.method, "reason": d.reason, "caller": d.caller,
            "tenant_id": d.tenant_id, "key_id": d.key_id, "peer": d.peer, "count": d.count,
            "first_time": first_time}
