"""A killed tool process, a killed inference node, a client that drops its stream."""
from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

import psutil
import pytest
from llmesh.inference.v1 import inference_pb2
from llmesh.store.v1 import store_pb2 as spb
from llmesh.store.v1 import store_pb2_grpc
from llmesh.tools.v1 import tools_pb2 as tpb
from llmesh.tools.v1 import tools_pb2_grpc

from services.common.runtime import running_service
from services.inference.client import Balancer
from services.inference.client.config import BalancerSettings
from services.store.config import Settings as StoreSettings
from services.store.server import App as StoreApp
from services.tools.config import Settings as ToolsSettings
from services.tools.server import build_app as build_tools
from tests.faults.processes import ServiceProcess
from tests.support.auth import service_channel, service_identity


async def test_killed_tool_process_is_a_tool_error_and_the_next_call_runs(tmp_path: Path) -> None:
    base = Path(tempfile.mkdtemp(prefix="llmesh-faults-"))
    conf = ToolsSettings(port=0, data_dir=str(base / "data"), workspace_root=str(base / "ws"), sandbox="none",
                         sandbox_uid=-1, sandbox_gid=-1, retry_max_attempts=1)
    try:
        async with running_service(build_tools(conf), conf) as svc, \
                service_channel(svc.address, "orchestrator") as channel:
            tools = tools_pb2_grpc.ToolServiceStub(channel)

            def run(command: str, call_id: str):
                return tools.ExecuteTool(tpb.ExecuteToolRequest(
                    tenant_id="t", session_id="s", role="developer",
                    call=tpb.ToolCall(call_id=call_id, name="shell_exec",
                                      arguments_json=f'{{"command": "{command}"}}')), timeout=30)

            pending = asyncio.ensure_future(run("sleep 27.5", "doomed"))
            victim = None
            for _ in range(100):
                victim = next((p for p in psutil.Process().children(recursive=True)
                               if "27.5" in " ".join(p.cmdline())), None)
                if victim is not None:
                    break
                await asyncio.sleep(0.05)
            assert victim is not None, "the tool process never started"
            victim.kill()
            reply = await asyncio.wait_for(pending, 10)
            assert reply.result.status != tpb.TOOL_STATUS_OK and reply.result.exit_code != 0, reply.result
            after = await run("echo alive", "next")
            assert after.result.status == tpb.TOOL_STATUS_OK and "alive" in after.result.stdout.text
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
async def test_killed_inference_node_traffic_moves_to_the_live_node(tmp_path: Path) -> None:
    nodes = [ServiceProcess("inference", "llmesh.inference.v1.InferenceService", tmp_path / f"n{i}",
                            ["--backend", "synthetic", "--n-ctx", "2048", "--synthetic-tokens-per-s", "0"])
             for i in range(2)]
    try:
        await asyncio.gather(*(n.start() for n in nodes))
        settings = BalancerSettings(nodes=tuple(n.target for n in nodes), health_interval_s=0.2, load_interval_s=0.2)
        async with Balancer(settings=settings, identity=service_identity("orchestrator")) as balancer:
            await balancer.wait_for_health(10)
            request = inference_pb2.GenerateRequest(prompt="hi", sampling=inference_pb2.SamplingParams(max_tokens=3))
            nodes[0].kill()
            for i in range(10):  # before and after the balancer notices: every request is served
                replies = [r async for r in balancer.generate(request, session_id=f"s{i}", timeout=10)]
                assert replies[-1].usage.generated_tokens == 3
            # The dead node took no traffic it could not serve; the live one took it all after the kill.
            assert balancer.nodes[nodes[1].target].num_picked >= 10
    finally:
        for node in nodes:
            node.stop()


async def test_dropped_watch_client_frees_its_stream_and_a_new_one_resumes_without_gaps(tmp_path: Path) -> None:
    conf = StoreSettings(port=0, data_dir=str(tmp_path), sqlite_synchronous="NORMAL")
    app = StoreApp(conf)
    async with running_service(app, conf) as svc:
        async with service_channel(svc.address, "orchestrator") as writer_channel:
            store = store_pb2_grpc.StoreServiceStub(writer_channel)
            await store.CreateSession(spb.CreateSessionRequest(tenant_id="t", session_id="s"))

            async def append(n: int) -> None:
                for _ in range(n):
                    await store.AppendEvents(spb.AppendEventsRequest(tenant_id="t", session_id="s",
                                                                     events=[spb.Event(type="final")]))

            seen: list[int] = []
            dropping = service_channel(svc.address, "orchestrator")
            watch = store_pb2_grpc.StoreServiceStub(dropping).WatchEvents(
                spb.WatchEventsRequest(tenant_id="t", session_id="s"))
            await append(5)
            for _ in range(3):
                seen.append((await watch.read()).event.seq)
            await dropping.close()  # the client vanishes mid-stream
            await append(5)  # the session goes on without it
            for _ in range(100):
                if app.core.hub.num_watchers == 0:
                    break
                await asyncio.sleep(0.02)
            assert app.core.hub.num_watchers == 0, "the dropped stream is still held by the store"

            resumed = store.WatchEvents(spb.WatchEventsRequest(tenant_id="t", session_id="s", after_seq=seen[-1]))
            rest = [(await resumed.read()).event.seq for _ in range(10 - len(seen))]
            resumed.cancel()
    assert seen + rest == list(range(1, 11))
