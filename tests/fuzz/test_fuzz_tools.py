"""Hypothesis-built requests at every ToolService RPC: never UNKNOWN/INTERNAL, never a crash."""
from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from llmesh.tools.v1 import tools_pb2 as pb

from services.tools.config import Settings
from services.tools.server import SERVICE_NAME, App
from tests.fuzz.harness import FORBIDDEN_CODES, ServiceThread, describe, request_class, unary_request_methods
from tests.fuzz.strategies import messages
from tests.support.auth import service_identity

SERVICE = pb.DESCRIPTOR.services_by_name["ToolService"]
# Only harmless commands: the fuzzer drives a real shell tool.
HINTS = {
    "tenant_id": st.sampled_from(["acme"]),
    "session_id": st.sampled_from(["s1", "s2"]),
    "name": st.sampled_from(["shell_exec", "fs_read", "fs_write", "fs_list", "fs_search", "nope"]),
    "arguments_json": st.sampled_from(['{"command": "true"}', '{"command": "echo hi"}', '{"path": "a.txt"}',
                                       '{"path": "a.txt", "content": "x"}', '{"path": "../../etc/passwd"}',
                                       '{"pattern": "x"}', '{}', '{"command": 7}', '{"path": "."}']),
    "role": st.sampled_from(["developer", ""]),
}
FUZZ = settings(max_examples=40, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def tools() -> Iterator[ServiceThread]:
    # Not under pytest's tmp_path (0700 parents): keep the layout the sandbox expects.
    base = Path(tempfile.mkdtemp(prefix="llmesh-tools-fuzz-"))
    conf = Settings(port=0, data_dir=str(base / "data"), workspace_root=str(base / "ws"), sandbox="none",
                    sandbox_uid=-1, sandbox_gid=-1, shell_timeout_ms=2_000, max_timeout_ms=2_000,
                    retry_base_ms=1, retry_max_ms=5)
    # Only the orchestrator runs tools (ExecuteTool, ExecuteTools); it may list them too.
    harness = ServiceThread(App(conf), conf, identity=service_identity("orchestrator"))
    yield harness
    harness.close()
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("method", list(unary_request_methods(SERVICE)), ids=lambda m: m.name)
@FUZZ
@given(data=st.data())
def test_tools_rpc_answers_garbage_with_a_mapped_status(tools: ServiceThread, method, data) -> None:
    request = data.draw(messages(request_class(method), HINTS))
    code, replies = tools.invoke_with_replies(SERVICE, method, request)
    assert code not in FORBIDDEN_CODES, describe(code, request)
    # A tool that raised is reported as TOOL_CRASHED: a bug in the tool, even if the RPC is fine.
    results = [r.result for r in replies if r.HasField("result")] if method.name == "ExecuteTool" else \
        [result for r in replies for result in getattr(r, "results", [])]
    crashed = [r for r in results if r.error_reason == "TOOL_CRASHED"]
    assert not crashed, describe(code, request) + f" crashed: {crashed[0].error_message}"


def test_reading_a_directory_is_a_tool_error_not_a_crash(tools: ServiceThread) -> None:
    execute = SERVICE.methods_by_name["ExecuteTool"]
    request = pb.ExecuteToolRequest(tenant_id="acme", session_id="s1", role="developer",
                                    call=pb.ToolCall(call_id="c", name="fs_read", arguments_json='{"path": "."}'))
    code, (reply,) = tools.invoke_with_replies(SERVICE, execute, request)
    assert code.name == "OK"
    assert reply.result.error_reason == "NOT_A_FILE", reply.result


def test_tools_still_run_a_command_after_the_fuzz_run(tools: ServiceThread) -> None:
    assert tools.is_serving(SERVICE_NAME)
    execute = SERVICE.methods_by_name["ExecuteTool"]
    request = pb.ExecuteToolRequest(tenant_id="acme", session_id="s1", role="developer",
                                    call=pb.ToolCall(call_id="c", name="shell_exec",
                                                     arguments_json='{"command": "true"}'))
    assert tools.invoke(SERVICE, execute, request).name == "OK"
