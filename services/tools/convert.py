"""Between llmesh.tools.v1 messages and the core's dataclasses."""
from __future__ import annotations

import json
from typing import Any, cast

from llmesh.tools.v1 import tools_pb2

from services.common.errors import InvalidArgument, require
from services.tools.core.model import CallContext, ToolInvocation, ToolOutcome, ToolSpec
from services.tools.core.output import CapturedText

DEFAULT_TENANT = "default"


def decode_context(request: Any) -> CallContext:
    require(bool(request.session_id), "session_id", "is required")
    return CallContext(request_id=request.request_id, tenant_id=request.tenant_id or DEFAULT_TENANT,
                       session_id=request.session_id, role=request.role)


def decode_call(call: tools_pb2.ToolCall, field: str) -> ToolInvocation:
    require(bool(call.name), f"{field}.name", "is required")
    require(call.timeout_ms >= 0, f"{field}.timeout_ms", "must not be negative")
    raw = call.arguments_json or "{}"
    try:
        arguments = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"{field}.arguments_json: not valid JSON: {exc}",
                              field=f"{field}.arguments_json") from None
    if not isinstance(arguments, dict):
        raise InvalidArgument(f"{field}.arguments_json: must be a JSON object", field=f"{field}.arguments_json")
    return ToolInvocation(call_id=call.call_id, name=call.name, arguments=arguments, arguments_json=raw,
                          timeout_ms=call.timeout_ms, approval_id=call.approval_id)


def decode_calls(calls: Any) -> list[ToolInvocation]:
    require(len(calls) > 0, "calls", "at least one call is required")
    decoded = [decode_call(call, f"calls[{i}]") for i, call in enumerate(calls)]
    seen: set[str] = set()
    for i, call in enumerate(decoded):
        if call.call_id:
            require(call.call_id not in seen, f"calls[{i}].call_id", f"duplicate call_id {call.call_id!r}")
            seen.add(call.call_id)
    return decoded


def encode_text(text: CapturedText) -> tools_pb2.CapturedOutput:
    return tools_pb2.CapturedOutput(text=text.text, original_bytes=text.original_bytes, truncated=text.truncated)


def encode_outcome(outcome: ToolOutcome) -> tools_pb2.ToolResult:
    # protoc's .pyi types enum fields as the enum class (no int constructor at runtime); the numbers match.
    status = cast(tools_pb2.ToolStatus, int(outcome.status))
    return tools_pb2.ToolResult(
        call_id=outcome.call_id, name=outcome.name, status=status, exit_code=outcome.exit_code,
        duration_ms=outcome.duration_ms, stdout=encode_text(outcome.stdout), stderr=encode_text(outcome.stderr),
        content=encode_text(outcome.content), error_reason=outcome.error_reason,
        error_message=outcome.error_message, from_cache=outcome.from_cache, approval_id=outcome.approval_id,
        attempts=outcome.attempts)


def encode_spec(spec: ToolSpec) -> tools_pb2.ToolSpec:
    # protoc's .pyi types enum fields as the enum class (no int constructor at runtime); the numbers match.
    risk_level = cast(tools_pb2.RiskLevel, int(spec.risk_level))
    return tools_pb2.ToolSpec(
        name=spec.name, original_name=spec.original_name, description=spec.description,
        parameters_json_schema=json.dumps(spec.parameters_schema, sort_keys=True), version=spec.version,
        risk_level=risk_level, idempotent=spec.idempotent, retryable=spec.retryable,
        timeout_ms=spec.timeout_ms, source=spec.source)
