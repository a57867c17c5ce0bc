"""ToolService: decode -> executor -> encode."""
from __future__ import annotations

import grpc
from llmesh.tools.v1 import tools_pb2, tools_pb2_grpc
from opentelemetry import trace

from services.tools import convert, metrics
from services.tools.core.executor import ToolExecutor
from services.tools.core.replay import RequestReplay


class ToolServicer(tools_pb2_grpc.ToolServiceServicer):
    def __init__(self, executor: ToolExecutor) -> None:
        self.executor = executor
        # One cache for both RPCs: the key's first item ("one" or "batch") tells which answer it holds.
        self.replay: RequestReplay[convert.ToolOutcome | list[convert.ToolOutcome]] = RequestReplay()

    async def ListTools(self, request: tools_pb2.ListToolsRequest, context: grpc.aio.ServicerContext
                        ) -> tools_pb2.ListToolsResponse:
        page, token = self.executor.registry.page(request.page_size, request.page_token)
        return tools_pb2.ListToolsResponse(tools=[convert.encode_spec(s) for s in page], next_page_token=token)

    async def ExecuteTool(self, request: tools_pb2.ExecuteToolRequest, context: grpc.aio.ServicerContext
                          ) -> tools_pb2.ExecuteToolResponse:
        ctx = convert.decode_context(request)
        call = convert.decode_call(request.call, "call")
        _tag_span([call])
        outcome = await self.replay.run(_replay_key("one", ctx), lambda: self._execute(ctx, call))
        assert isinstance(outcome, convert.ToolOutcome)
        if outcome.request_error is not None:  # bad arguments, unknown tool, path escape: a status, not a result
            raise outcome.request_error
        return tools_pb2.ExecuteToolResponse(result=convert.encode_outcome(outcome))

    async def ExecuteTools(self, request: tools_pb2.ExecuteToolsRequest, context: grpc.aio.ServicerContext
                           ) -> tools_pb2.ExecuteToolsResponse:
        ctx = convert.decode_context(request)
        calls = convert.decode_calls(request.calls)
        _tag_span(calls)
        outcomes = await self.replay.run(_replay_key("batch", ctx), lambda: self._execute_batch(ctx, calls))
        assert isinstance(outcomes, list)
        return tools_pb2.ExecuteToolsResponse(results=[convert.encode_outcome(o) for o in outcomes])

    # Metrics are recorded once per execution, not again for a replayed request_id.
    async def _execute(self, ctx: convert.CallContext, call: convert.ToolInvocation) -> convert.ToolOutcome:
        outcome = await self.executor.execute(ctx, call)
        metrics.record_outcomes(self.executor, [outcome])
        return outcome

    async def _execute_batch(self, ctx: convert.CallContext, calls: list[convert.ToolInvocation]
                             ) -> list[convert.ToolOutcome]:
        outcomes = await self.executor.execute_batch(ctx, calls)
        metrics.record_outcomes(self.executor, outcomes)
        return outcomes


def _tag_span(calls: list[convert.ToolInvocation]) -> None:
    """Name the calls on the server span, so a trace joins the model's tool_call events."""
    span = trace.get_current_span()
    ids = [c.call_id for c in calls if c.call_id]
    if len(ids) == 1:
        span.set_attribute("tool_call_id", ids[0])
    elif ids:
        span.set_attribute("tool_call_ids", ids)
    names = sorted({c.name for c in calls})
    if names:
        span.set_attribute("tool_names", names)


def _replay_key(kind: str, ctx: convert.CallContext) -> tuple[str, str, str, str] | None:
    return (kind, ctx.tenant_id, ctx.session_id, ctx.request_id) if ctx.request_id else None
