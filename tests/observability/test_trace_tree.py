"""One agent turn, REST -> orchestrator -> inference, tools, policy, store, is one trace.

Every service runs in process on its own port and talks over real gRPC with
the shared OTel interceptors; spans are captured in memory. Inference is a
real node on its synthetic backend (no model): it cannot write a tool call,
so the orchestrator's inference port runs each Generate on that node and
then hands the orchestrator a scripted reply text. The RPCs, and so the
spans, are the real ones.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from services.common.clients import make_channel
from services.common.runtime import running_service
from services.gateway.config import Settings as GatewaySettings
from services.gateway.server import build_app as build_gateway
from services.gateway.server import running_gateway
from services.inference.config import Settings as InferenceSettings
from services.inference.server import build_app as build_inference
from services.orchestrator.adapters.grpc_inference import GrpcInference
from services.orchestrator.config import Settings as OrchestratorSettings
from services.orchestrator.core.ports import GenerationChunk, GenerationRequest
from services.orchestrator.server import build_app as build_orchestrator
from services.policy.config import Settings as PolicySettings
from services.policy.server import build_app as build_policy
from services.store.config import Settings as StoreSettings
from services.store.server import build_app as build_store
from services.tools.config import Settings as ToolsSettings
from services.tools.server import build_app as build_tools
from tests.observability.tracing import SpanNode, build_trees, capture_spans
from tests.support.auth import service_identity

AGENT = "/llmesh.orchestrator.v1.AgentService/"
TOOL_CALL = '<tool_call>{"name": "fs_list", "arguments": {"path": "."}}</tool_call>'


class ScriptedTextOverRealNode:
    """Real Generate RPCs to a synthetic node; the text the orchestrator sees is scripted."""

    def __init__(self, node: GrpcInference, replies: list[str]) -> None:
        self.node = node
        self.replies = replies

    async def tokenize(self, text: str, *, model: str = "", add_special: bool = False) -> list[int]:
        return await self.node.tokenize(text, model=model, add_special=add_special)

    async def context_size(self, model: str = "") -> int:
        return await self.node.context_size(model)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        last = None
        async for chunk in self.node.generate(replace(request, grammar="", max_tokens=4)):
            last = chunk
        assert last is not None and last.usage is not None, "the node's stream ended without usage"
        yield GenerationChunk(text=self.replies.pop(0))
        yield GenerationChunk(text="", finish_reason="stop", usage=last.usage, ttft_ms=last.ttft_ms)


@contextlib.asynccontextmanager
async def rest_mesh(base: Path) -> AsyncIterator[str]:
    async with contextlib.AsyncExitStack() as stack:
        async def serve(app, settings) -> str:
            svc = await stack.enter_async_context(running_service(app, settings))
            return f"127.0.0.1:{svc.port}"

        conf = StoreSettings(port=0, data_dir=str(base / "store"), sqlite_synchronous="NORMAL")
        store = await serve(build_store(conf), conf)
        conf = PolicySettings(port=0, data_dir=str(base / "policy"), store_target=store, audit_backend="store")
        policy = await serve(build_policy(conf), conf)
        conf = ToolsSettings(port=0, data_dir=str(base / "tools"), policy_target=policy, sandbox="none",
                             sandbox_uid=-1, sandbox_gid=-1, workspace_root=str(base / "ws"))
        tools = await serve(build_tools(conf), conf)
        conf = InferenceSettings(port=0, node_id="trace-node", backend="synthetic", n_ctx=4096, n_seq_max=2,
                                 synthetic_tokens_per_s=0.0)
        node = await serve(build_inference(conf), conf)
        channel = make_channel(node, service_identity("orchestrator"))  # the orchestrator's calls to its node
        stack.push_async_callback(channel.close)
        inference = ScriptedTextOverRealNode(GrpcInference.for_channel(channel), [TOOL_CALL, "Two files."])
        conf = OrchestratorSettings(port=0, store_target=store, policy_target=policy, tools_target=tools,
                                    event_batch_ms=5, max_workers=0)
        orchestrator = await serve(build_orchestrator(conf, inference=inference), conf)
        # REST requests are anonymous here; the gateway calls the orchestrator with its own key.
        gateway = build_gateway(GatewaySettings(port=0, orchestrator_target=orchestrator), use_settings_auth=False)
        yield await stack.enter_async_context(running_gateway(gateway))


async def run_turn_over_rest(url: str) -> tuple[str, list[dict]]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        reply = await client.post("/v1/sessions", json={"tenantId": "acme", "tools": ["fs_list"]})
        assert reply.status_code == 200, reply.text
        session_id = reply.json()["session"]["sessionId"]
        events = []
        async with client.stream("POST", f"/v1/sessions/{session_id}:run",
                                 json={"tenantId": "acme", "userMessage": "list the files"}) as stream:
            assert stream.status_code == 200
            async for line in stream.aiter_lines():
                if line.startswith("data:"):
                    events.append(json.loads(line[5:])["event"])
    return session_id, events


def find(tree: SpanNode, name_suffix: str, kind: SpanKind = SpanKind.SERVER) -> list[SpanNode]:
    return [n for n in tree.walk() if n.name.endswith(name_suffix) and n.span.kind == kind]


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = capture_spans()
    yield exporter
    exporter.shutdown()  # later tests' spans are not kept in memory


async def test_one_agent_turn_is_one_trace_across_every_service(exporter: InMemorySpanExporter) -> None:
    base = Path(tempfile.mkdtemp(prefix="llmesh-trace-"))
    try:
        async with rest_mesh(base) as url:
            exporter.clear()
            session_id, events = await run_turn_over_rest(url)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert events[-1].get("final"), events[-1]
    (tool_call,) = [e["toolCall"] for e in events if "toolCall" in e]
    call_id = tool_call["toolCallId"]

    all_roots = [root for roots in build_trees(list(exporter.get_finished_spans())).values() for root in roots]
    roots = [root for root in all_roots if find(root, AGENT + "Run")]
    assert len(roots) == 1, "the Run was split over several traces, or not traced:\n" + \
        "\n".join(r.render() for r in all_roots)
    (root,) = roots
    tree_text = root.render()
    # The REST request is the root: the HTTP server span, named by its route, with the call under it.
    assert root.span.kind == SpanKind.SERVER, tree_text
    assert root.name == "POST /v1/sessions/{session_id}:run", tree_text
    assert root.span.attributes.get("http.response.status_code") == 200, tree_text
    (rest_call,) = [c for c in root.children if c.name == AGENT + "Run"]
    assert rest_call.span.kind == SpanKind.CLIENT, tree_text
    (run,) = find(rest_call, AGENT + "Run")
    assert run.span.attributes.get("session_id") == session_id
    # The HTTP span lasts as long as the SSE stream, so it encloses the whole turn.
    assert root.span.end_time >= run.span.end_time, tree_text

    # Every downstream service served a part of this turn, inside this trace.
    generates = find(run, "InferenceService/Generate")
    assert len(generates) == 2, tree_text  # the tool-call step and the answer step
    for generate in generates:
        attributes = generate.span.attributes
        assert attributes.get("model"), tree_text
        assert attributes.get("node") == "trace-node", tree_text
        assert attributes.get("session_id") == session_id, tree_text
    (execute,) = find(run, "ToolService/ExecuteTools") + find(run, "ToolService/ExecuteTool")
    assert call_id in (execute.span.attributes.get("tool_call_id"),
                       *(execute.span.attributes.get("tool_call_ids") or ())), tree_text
    # Policy is asked by the tools service, under its span.
    assert find(execute, "PolicyService/Evaluate"), tree_text
    appends = find(run, "StoreService/AppendEvents")
    assert appends and all(a.span.attributes.get("session_id") == session_id for a in appends), tree_text
    # One trace id throughout.
    assert {n.span.context.trace_id for n in root.walk()} == {root.span.context.trace_id}
