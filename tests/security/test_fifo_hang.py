"""Named pipes in a workspace: refused at once, never a hung pool, never a service that ignores SIGTERM.

Before: six ``fs_read`` calls on a FIFO blocked in ``open()`` on the shared
thread pool, every other session's file tools queued behind them, and the
blocked threads kept the process alive after SIGTERM.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from llmesh.tools.v1 import tools_pb2, tools_pb2_grpc

from services.common.interceptors import error_info
from services.common.runtime import running_service
from services.tools.config import Settings
from services.tools.server import App
from tests.faults.processes import ROOT, ServiceProcess
from tests.support.auth import service_channel

NUM_FIFO_READS = 12  # twice what filled the old shared pool
PROMPT_S = 2.0  # what "answers promptly" means here; file tools time out at 10 s
GRACE_S = 2.0




def make_workspaces(workspaces: Path) -> Path:
    """acme/s1 with a FIFO nobody ever writes to; acme/s2 with a plain file. Returns the FIFO."""
    for session in ("s1", "s2"):
        (workspaces / "acme" / session).mkdir(parents=True)
    (workspaces / "acme" / "s2" / "a.txt").write_text("hello from s2")
    pipe = workspaces / "acme" / "s1" / "pipe"
    os.mkfifo(pipe)
    return pipe


def unblock(pipe: Path) -> None:
    """Open the FIFO as a writer once: frees any reader blocked in open() (so a failing run ends)."""
    fd = os.open(pipe, os.O_RDWR | os.O_NONBLOCK)  # O_RDWR never blocks on a FIFO
    os.close(fd)


def execute(session_id: str, name: str, **args: object) -> tools_pb2.ExecuteToolRequest:
    return tools_pb2.ExecuteToolRequest(tenant_id="acme", session_id=session_id, role="developer",
                                        call=tools_pb2.ToolCall(call_id="c1", name=name,
                                                                arguments_json=json.dumps(args)))


async def read_fifo(stub: tools_pb2_grpc.ToolServiceStub) -> grpc.StatusCode:
    try:
        reply = await stub.ExecuteTool(execute("s1", "fs_read", path="pipe"), timeout=30)
    except grpc.aio.AioRpcError as err:
        assert err.code() is not grpc.StatusCode.PERMISSION_DENIED or error_info(err).reason == "NOT_A_REGULAR_FILE"
        return err.code()
    pytest.fail(f"a FIFO read answered {reply.result}")


@pytest.fixture
async def service(base: Path) -> AsyncIterator[tuple[tools_pb2_grpc.ToolServiceStub, Path]]:
    settings = Settings(port=0, workspace_root=str(base / "ws"), data_dir=str(base / "data"), sandbox="none")
    pipe = make_workspaces(base / "ws")
    try:
        async with running_service(App(settings), settings) as svc:
            async with service_channel(svc.address, "orchestrator") as channel:  # the agent loop runs tools
                yield tools_pb2_grpc.ToolServiceStub(channel), pipe
    finally:
        unblock(pipe)


async def test_fifo_reads_are_refused_and_other_sessions_keep_working(service) -> None:  # type: ignore[no-untyped-def]
    stub, _pipe = service
    fifo_reads = [asyncio.ensure_future(read_fifo(stub)) for _ in range(NUM_FIFO_READS)]
    batch = asyncio.ensure_future(stub.ExecuteTools(tools_pb2.ExecuteToolsRequest(
        tenant_id="acme", session_id="s1", role="developer",
        calls=[tools_pb2.ToolCall(call_id=f"f{i}", name="fs_read", arguments_json='{"path": "pipe"}')
               for i in range(8)]), timeout=30))
    # While s1 hammers its FIFO, s2's file tools answer promptly.
    for name, args in [("fs_read", {"path": "a.txt"}), ("fs_list", {}), ("fs_write", {"path": "b.txt", "content": "x"}),
                       ("fs_search", {"pattern": "hello"})]:
        started = time.monotonic()
        reply = await stub.ExecuteTool(execute("s2", name, **args), timeout=PROMPT_S)
        assert reply.result.status == tools_pb2.TOOL_STATUS_OK, (name, reply.result)
        assert time.monotonic() - started < PROMPT_S
    # And the FIFO reads got a clear refusal, promptly too, naming the field.
    codes = await asyncio.wait_for(asyncio.gather(*fifo_reads), PROMPT_S)
    assert codes == [grpc.StatusCode.PERMISSION_DENIED] * NUM_FIFO_READS
    results = (await asyncio.wait_for(batch, PROMPT_S)).results
    assert [r.status for r in results] == [tools_pb2.TOOL_STATUS_DENIED] * 8
    assert {r.error_reason for r in results} == {"NOT_A_REGULAR_FILE"}
    assert "FIFO" in results[0].error_message and "arguments.path" in results[0].error_message
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ExecuteTool(execute("s1", "fs_read", path="pipe"), timeout=PROMPT_S)
    assert error_info(err.value).metadata["field"] == "arguments.path"


async def test_sigterm_stops_the_service_with_fifo_reads_in_flight(base: Path) -> None:
    pipe = make_workspaces(base / "ws")
    service = ServiceProcess("tools", "llmesh.tools.v1.ToolService", base / "data",
                             args=["--workspace-root", str(base / "ws"), "--sandbox", "none",
                                   "--grace-s", str(GRACE_S)])
    await service.start()
    assert service.process is not None
    try:
        async with service_channel(service.target, "orchestrator") as channel:
            stub = tools_pb2_grpc.ToolServiceStub(channel)

            async def keep_reading() -> None:
                while True:
                    try:
                        await stub.ExecuteTool(execute("s1", "fs_read", path="pipe"), timeout=30)
                    except grpc.aio.AioRpcError as err:
                        if err.code() is not grpc.StatusCode.PERMISSION_DENIED:
                            return  # the service went away

            readers = [asyncio.ensure_future(keep_reading()) for _ in range(NUM_FIFO_READS)]
            await asyncio.sleep(1.0)  # reads in flight all along
            assert not any(reader.done() for reader in readers), service.last_log()
            stopping = time.monotonic()
            service.process.terminate()
            exit_code = await asyncio.to_thread(_wait, service.process, GRACE_S + 5)
            took = time.monotonic() - stopping
            for reader in readers:
                reader.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
        assert exit_code is not None, f"still running {took:.1f}s after SIGTERM\n{service.last_log()}"
        assert took < GRACE_S + 3, took
    finally:
        unblock(pipe)
        service.kill()


def _wait(process: subprocess.Popen[bytes], timeout_s: float) -> int | None:
    try:
        return process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        return None


STUCK = """
import asyncio, os, sys
from services.tools.core.executor import SessionThreads

async def main():
    threads = SessionThreads(1)
    try:
        # A blocking open of a FIFO nobody writes to: the thread never comes back.
        await asyncio.wait_for(threads.run("s1", lambda stop: os.open(sys.argv[1], os.O_RDONLY)), 0.3)
    except asyncio.TimeoutError:
        print("timed out", flush=True)

asyncio.run(main())
"""


def test_a_thread_stuck_in_open_does_not_keep_the_process_alive(base: Path) -> None:
    os.mkfifo(base / "pipe")
    try:
        done = subprocess.run([sys.executable, "-c", STUCK, str(base / "pipe")], cwd=ROOT, capture_output=True,
                              text=True, timeout=10)
    finally:
        unblock(base / "pipe")
    assert done.returncode == 0 and done.stdout == "timed out\n", done.stderr
