"""ToolService over a real in-process gRPC server, with a real MCP server and a policy service."""
from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from llmesh.policy.v1 import policy_pb2, policy_pb2_grpc
from llmesh.tools.v1 import tools_pb2, tools_pb2_grpc

from services.common.interceptors import error_info
from services.common.runtime import running_service
from services.common.settings import ServerSettings
from services.tools.config import Settings
from services.tools.server import App
from tests.support.auth import service_channel

DEMO_SERVER = Path(__file__).with_name("mcp_demo_server.py")


class PolicyStub(policy_pb2_grpc.PolicyServiceServicer):
    """Forbids shell_exec, asks for approval of fs_write outside notes/, allows the rest."""

    def __init__(self) -> None:
        self.requests: list[policy_pb2.EvaluateRequest] = []

    async def Evaluate(self, request, context):  # type: ignore[no-untyped-def]
        self.requests.append(request)
        if request.tool_name == "shell_exec":
            return policy_pb2.EvaluateResponse(decision=policy_pb2.DECISION_FORBIDDEN, justification="no shells")
        path = json.loads(request.arguments_json).get("path", "")
        if request.tool_name == "fs_write" and not path.startswith("notes/") and request.approval_id != "ap-1":
            return policy_pb2.EvaluateResponse(decision=policy_pb2.DECISION_PROMPT, approval_id="ap-1",
                                               justification="writes outside notes/ need approval")
        return policy_pb2.EvaluateResponse(decision=policy_pb2.DECISION_ALLOW)


class PolicyApp:
    service_names = ("llmesh.policy.v1.PolicyService",)

    def __init__(self) -> None:
        self.servicer = PolicyStub()

    def register(self, server: grpc.aio.Server) -> None:
        policy_pb2_grpc.add_PolicyServiceServicer_to_server(self.servicer, server)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


@pytest.fixture
async def policy() -> AsyncIterator[tuple[PolicyApp, int]]:
    app = PolicyApp()
    async with running_service(app, ServerSettings(port=0)) as svc:
        yield app, svc.port


@pytest.fixture
async def stub(workspace_base: Path, tmp_path: Path, policy: tuple[PolicyApp, int]
               ) -> AsyncIterator[tools_pb2_grpc.ToolServiceStub]:
    config = tmp_path / "mcp.json"
    config.write_text(json.dumps({"servers": {"demo": {"command": sys.executable, "args": [str(DEMO_SERVER)]}}}))
    settings = Settings(port=0, workspace_root=str(workspace_base), policy_target=f"127.0.0.1:{policy[1]}",
                        mcp_config=str(config), data_dir=str(tmp_path))
    async with running_service(App(settings), settings) as svc:
        async with service_channel(svc.address, "orchestrator") as channel:  # the agent loop runs tools
            yield tools_pb2_grpc.ToolServiceStub(channel)


def tool_call(name: str, call_id: str = "c1", approval_id: str = "", **args: object) -> tools_pb2.ToolCall:
    return tools_pb2.ToolCall(call_id=call_id, name=name, arguments_json=json.dumps(args), approval_id=approval_id)


def execute(name: str, request_id: str = "", **args: object) -> tools_pb2.ExecuteToolRequest:
    return tools_pb2.ExecuteToolRequest(request_id=request_id, tenant_id="acme", session_id="s1", role="dev",
                                        call=tool_call(name, **args))


async def test_list_tools_pages_through_builtins_and_mcp_tools(stub: tools_pb2_grpc.ToolServiceStub) -> None:
    seen: list[tools_pb2.ToolSpec] = []
    token = ""
    while True:
        page = await stub.ListTools(tools_pb2.ListToolsRequest(page_size=3, page_token=token))
        assert len(page.tools) <= 3
        seen.extend(page.tools)
        token = page.next_page_token
        if not token:
            break
    by_name = {t.name: t for t in seen}
    assert {"fs_read", "fs_write", "fs_list", "fs_search", "shell_exec"} <= set(by_name)
    assert "http_fetch" not in by_name  # off by default
    add = by_name["mcp__demo__add"]
    assert add.source == "mcp:demo" and add.original_name == "add" and add.idempotent
    assert add.risk_level == tools_pb2.RISK_LEVEL_READ_ONLY
    assert json.loads(add.parameters_json_schema)["required"] == ["a", "b"]
    assert by_name["mcp__demo__shout_text"].original_name == "shout.text"
    assert by_name["shell_exec"].risk_level == tools_pb2.RISK_LEVEL_DANGEROUS


async def test_mcp_tools_run_through_the_same_path(stub: tools_pb2_grpc.ToolServiceStub) -> None:
    reply = await stub.ExecuteTools(tools_pb2.ExecuteToolsRequest(session_id="s1", calls=[
        tool_call("mcp__demo__add", "c1", a=2, b=40),
        tool_call("mcp__demo__shout_text", "c2", text="quiet"),
        tool_call("mcp__demo__fail", "c3", message="broken on purpose"),
        tool_call("mcp__demo__add", "c4", a="two", b=1),
    ]))
    add, shout, fail, bad = reply.results
    assert add.status == tools_pb2.TOOL_STATUS_OK and add.content.text == "42"
    assert shout.content.text == "QUIET"
    assert fail.status == tools_pb2.TOOL_STATUS_ERROR and "broken on purpose" in fail.content.text
    # Our schema check catches bad arguments before the MCP server sees them.
    assert bad.status == tools_pb2.TOOL_STATUS_INVALID and "$.a" in bad.error_message


async def test_execute_tool_round_trip_and_structured_result(stub: tools_pb2_grpc.ToolServiceStub) -> None:
    wrote = await stub.ExecuteTool(execute("fs_write", path="notes/a.txt", content="hello"))
    assert wrote.result.status == tools_pb2.TOOL_STATUS_OK and wrote.result.attempts == 1
    read = await stub.ExecuteTool(execute("fs_read", path="notes/a.txt"))
    again = await stub.ExecuteTool(execute("fs_read", path="notes/a.txt"))
    assert read.result.content.text == "hello" and read.result.content.original_bytes == 5
    assert not read.result.from_cache and again.result.from_cache
    assert read.result.duration_ms > 0 and read.result.call_id == "c1" and read.result.name == "fs_read"


async def test_policy_denial_and_approval_travel_as_results(stub: tools_pb2_grpc.ToolServiceStub,
                                                            policy: tuple[PolicyApp, int]) -> None:
    denied = await stub.ExecuteTool(execute("shell_exec", command="echo hi"))
    assert denied.result.status == tools_pb2.TOOL_STATUS_DENIED
    assert denied.result.error_reason == "POLICY_FORBIDDEN" and denied.result.error_message == "no shells"
    ask = await stub.ExecuteTool(execute("fs_write", path="src/x.py", content="x"))
    assert ask.result.status == tools_pb2.TOOL_STATUS_APPROVAL_REQUIRED and ask.result.approval_id == "ap-1"
    approved = await stub.ExecuteTool(tools_pb2.ExecuteToolRequest(
        session_id="s1", tenant_id="acme",
        call=tool_call("fs_write", approval_id="ap-1", path="src/x.py", content="x")))
    assert approved.result.status == tools_pb2.TOOL_STATUS_OK
    last = policy[0].servicer.requests[-1]
    assert (last.tenant_id, last.session_id, last.tool_name, last.approval_id) == ("acme", "s1", "fs_write", "ap-1")
    assert last.risk_level == tools_pb2.RISK_LEVEL_WRITE and last.workspace_root.endswith("/acme/s1")


async def test_bad_input_is_invalid_argument_naming_the_field(stub: tools_pb2_grpc.ToolServiceStub) -> None:
    cases = [
        (execute("fs_read", path=3), "call.arguments_json"),
        (tools_pb2.ExecuteToolRequest(session_id="s1", call=tools_pb2.ToolCall(name="fs_read", arguments_json="[1]")),
         "call.arguments_json"),
        (tools_pb2.ExecuteToolRequest(call=tool_call("fs_read", path="a")), "session_id"),
        (tools_pb2.ExecuteToolRequest(session_id="../x", call=tool_call("fs_read", path="a")), "session_id"),
    ]
    for request, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ExecuteTool(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert error_info(err.value).metadata["field"] == field
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ExecuteTools(tools_pb2.ExecuteToolsRequest(session_id="s1", calls=[
            tool_call("fs_list", "same"), tool_call("fs_list", "same")]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(err.value).metadata["field"] == "calls[1].call_id"


async def test_escape_is_permission_denied(stub: tools_pb2_grpc.ToolServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ExecuteTool(execute("fs_read", path="/proc/self/environ"))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(err.value).reason == "PATH_OUTSIDE_WORKSPACE"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ExecuteTool(execute("no_such_tool"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_request_id_makes_a_retry_return_the_first_answer(stub: tools_pb2_grpc.ToolServiceStub) -> None:
    for _ in range(2):
        await stub.ExecuteTool(execute("fs_write", request_id="req-9", path="notes/log.txt", content="line\n",
                                       append=True))
    read = await stub.ExecuteTool(execute("fs_read", path="notes/log.txt"))
    assert read.result.content.text == "line\n"
