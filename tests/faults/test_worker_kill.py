"""An orchestrator replica SIGKILLed in the middle of a background task: the
task is finished by another replica, once, and the session stays usable."""
from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest
from llmesh.orchestrator.v1 import orchestrator_pb2 as pb
from llmesh.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from llmesh.store.v1 import store_pb2, store_pb2_grpc

from services.common.runtime import running_service
from services.inference.config import Settings as InferenceSettings
from services.inference.server import build_app as build_inference
from services.policy.config import Settings as PolicySettings
from services.policy.server import build_app as build_policy
from services.store.config import Settings as StoreSettings
from services.store.server import build_app as build_store
from services.tools.config import Settings as ToolsSettings
from services.tools.server import build_app as build_tools
from tests.faults.processes import ServiceProcess
from tests.support.auth import client_channel, service_channel

pytestmark = pytest.mark.slow

TENANT = "acme"
LEASE_MS = 1500


@contextlib.asynccontextmanager
async def backing_services(tmp_path: Path):
    """Store, policy, tools and a slow synthetic inference node, in this process."""
    async with contextlib.AsyncExitStack() as stack:
        async def start(build, settings):
            return await stack.enter_async_context(running_service(build(settings), settings))

        store = await start(build_store, StoreSettings(port=0, data_dir=str(tmp_path / "store")))
        policy = await start(build_policy, PolicySettings(port=0, data_dir=str(tmp_path / "policy"),
                                                          store_target=store.address))
        tools = await start(build_tools, ToolsSettings(port=0, data_dir=str(tmp_path / "tools"),
                                                       policy_target=policy.address))
        # 10 tokens/s: a 20-token answer takes ~2 s, long enough to die in the middle of.
        inference = await start(build_inference, InferenceSettings(
            port=0, backend="synthetic", node_id="slow", synthetic_tokens_per_s=10.0))
        yield {"store": store.address, "policy": policy.address, "tools": tools.address,
               "inference": inference.address}


def replica(name: str, tmp_path: Path, targets: dict[str, str]) -> ServiceProcess:
    args = ["--store-target", targets["store"], "--policy-target", targets["policy"],
            "--tools-target", targets["tools"], "--inference-target", targets["inference"],
            "--replica-id", name, "--max-workers", "1", "--task-lease-ms", str(LEASE_MS),
            "--session-lock-lease-ms", str(LEASE_MS), "--task-idle-wait-ms", "100",
            "--default-max-tokens", "20", "--default-max-steps", "1"]
    return ServiceProcess("orchestrator", "llmesh.orchestrator.v1.AgentService", tmp_path / name, args)


async def test_sigkilled_worker_task_is_finished_by_another_replica_once(tmp_path: Path) -> None:
    async with backing_services(tmp_path) as targets:
        replica_a = replica("replica-a", tmp_path, targets)
        replica_b = replica("replica-b", tmp_path, targets)
        await replica_a.start()
        try:
            async with client_channel(replica_a.target, TENANT, credentials=replica_a.credentials) as channel:
                agent = pb_grpc.AgentServiceStub(channel)
                session = (await agent.CreateSession(pb.CreateSessionRequest(tenant_id=TENANT))).session
                task = (await agent.EnqueueTask(pb.EnqueueTaskRequest(
                    request_id="task-1", tenant_id=TENANT, session_id=session.session_id,
                    user_message="write a short answer"))).task
                # Wait until replica A is streaming the answer (token events stored).
                async with service_channel(targets["store"], "orchestrator") as store_channel:
                    store = store_pb2_grpc.StoreServiceStub(store_channel)
                    for _ in range(200):
                        events = (await store.ReadEvents(store_pb2.ReadEventsRequest(
                            tenant_id=TENANT, session_id=session.session_id, after_seq=0))).events
                        if any(e.type == "token" for e in events):
                            break
                        await asyncio.sleep(0.05)
                    assert any(e.type == "token" for e in events), [e.type for e in events]
                    assert not any(e.type == "final" for e in events)
            replica_a.kill()  # SIGKILL mid-answer: no ack, no lock release, no flush

            await replica_b.start()
            async with client_channel(replica_b.target, TENANT, credentials=replica_a.credentials) as channel:
                agent = pb_grpc.AgentServiceStub(channel)
                for _ in range(300):
                    view = (await agent.GetTask(pb.GetTaskRequest(tenant_id=TENANT, task_id=task.task_id))).task
                    if view.state in (pb.TASK_STATE_SUCCEEDED, pb.TASK_STATE_FAILED):
                        break
                    await asyncio.sleep(0.1)
                assert view.state == pb.TASK_STATE_SUCCEEDED, (view, replica_b.last_log())
                assert view.attempts >= 2, view
                # The session is usable afterwards: a normal run on replica B ends with a final.
                run = [r.event async for r in agent.Run(pb.RunRequest(
                    tenant_id=TENANT, session_id=session.session_id, user_message="again",
                    options=pb.RunOptions(max_tokens=3)))]
                assert run[-1].type == pb.EVENT_TYPE_FINAL, run[-1]
            async with service_channel(targets["store"], "orchestrator") as store_channel:
                store = store_pb2_grpc.StoreServiceStub(store_channel)
                # The run's events reach the store in batches behind the live stream.
                for _ in range(100):
                    events = (await store.ReadEvents(store_pb2.ReadEventsRequest(
                        tenant_id=TENANT, session_id=session.session_id, after_seq=0, page_size=1000))).events
                    if events and events[-1].seq >= run[-1].seq:
                        break
                    await asyncio.sleep(0.05)
        finally:
            replica_a.kill()
            replica_b.stop()
    seqs = [e.seq for e in events]
    assert seqs == list(range(1, len(seqs) + 1)), "gapless after the crash"
    assert events[-1].seq == run[-1].seq, "the stored log ends where the live stream ended"
    # Exactly one final for the task's turn (plus one for the later run): never finished twice.
    assert [e.type for e in events].count("final") == 2
