"""ToolsPort over llmesh.tools.v1."""
from __future__ import annotations

import json
from collections.abc import Sequence

import grpc
from llmesh.tools.v1 import tools_pb2, tools_pb2_grpc

from services.common.paging import every_page
from services.common.rpc_errors import domain_errors
from services.orchestrator.core.ports import ToolInvocation, ToolOutcome, ToolSpec

# Extra seconds past the slowest call's own timeout before the batch RPC gives up.
DEADLINE_SLACK_S = 5.0


def _spec(msg: tools_pb2.ToolSpec) -> ToolSpec:
    try:
        params = json.loads(msg.parameters_json_schema) if msg.parameters_json_schema else {}
    except json.JSONDecodeError:
        params = {}
    return ToolSpec(name=msg.name, description=msg.description, parameters=params, retryable=msg.retryable,
                    timeout_ms=msg.timeout_ms, risk_level=msg.risk_level)


def _call(call: ToolInvocation) -> tools_pb2.ToolCall:
    msg = tools_pb2.ToolCall(call_id=call.call_id, name=call.name, arguments_json=call.arguments_json,
                             timeout_ms=call.timeout_ms)
    # The tools contract may grow a field to consume an approve-once grant; use it when there.
    if call.approval_id and "approval_id" in tools_pb2.ToolCall.DESCRIPTOR.fields_by_name:
        msg.approval_id = call.approval_id
    return msg


def _outcome(result: tools_pb2.ToolResult) -> ToolOutcome:
    output = result.content.text
    if not output and (result.stdout.text or result.stderr.text):
        output = result.stdout.text + (("\n[stderr]\n" + result.stderr.text) if result.stderr.text else "")
    if not output and result.error_message:
        output = f"{result.error_reason}: {result.error_message}"
    return ToolOutcome(call_id=result.call_id, name=result.name, status=tools_pb2.ToolStatus.Name(result.status),
                       output=output, truncated=result.content.truncated or result.stdout.truncated,
                       duration_ms=result.duration_ms, from_cache=result.from_cache, approval_id=result.approval_id,
                       justification=result.error_message, error_reason=result.error_reason,
                       attempts=result.attempts or 1)


class GrpcTools:
    """`role` is checked against the tenant's policy; empty means the policy's default role."""

    def __init__(self, client, *, role: str = "") -> None:
        self._client = client
        self._role = role

    @classmethod
    def for_channel(cls, channel: grpc.aio.Channel, *, role: str = "") -> GrpcTools:
        return cls(tools_pb2_grpc.ToolServiceStub(channel), role=role)

    async def list_tools(self) -> list[ToolSpec]:
        with domain_errors("tools"):
            return await every_page(
                lambda token: self._client.ListTools(tools_pb2.ListToolsRequest(page_size=200, page_token=token)),
                lambda reply: map(_spec, reply.tools))

    async def execute_tools(self, *, request_id: str, tenant_id: str, session_id: str,
                            calls: Sequence[ToolInvocation]) -> list[ToolOutcome]:
        slowest_s = max((c.timeout_ms for c in calls), default=0) / 1000.0 or 60.0
        with domain_errors("tools"):
            reply = await self._client.ExecuteTools(tools_pb2.ExecuteToolsRequest(
                request_id=request_id, tenant_id=tenant_id, session_id=session_id,
                calls=[_call(c) for c in calls], role=self._role), timeout=slowest_s + DEADLINE_SLACK_S)
        return [_outcome(r) for r in reply.results]
