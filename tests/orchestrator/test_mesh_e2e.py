"""The orchestrator against the real store, policy, tools and inference services.

Every service is started in process with its own `build_app` on port 0
(tests/support/mesh.py); the model is the bundled Gemma 3 270M through the
inference service, with grammar-constrained decoding.
"""
from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from llmesh.orchestrator.v1 import orchestrator_pb2 as pb

from services.orchestrator.adapters.grpc_store import GrpcStore
from services.orchestrator.core.orchestrator import Orchestrator, OrchestratorConfig
from services.orchestrator.core.runs import RunLimits
from tests.orchestrator.fakes import FakePolicy, FakeTools, Gate, ScriptedInference, call
from tests.orchestrator.test_tasks import DyingStore
from tests.support.auth import service_channel
from tests.support.mesh import TENANT, running_mesh
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.slow]


async def run_events(stub, session_id: str, message: str, on_event=None, **options) -> list[pb.AgentEvent]:
    events = []
    async for reply in stub.Run(pb.RunRequest(request_id=f"{session_id}:{message[:20]}", tenant_id=TENANT,
                                              session_id=session_id, user_message=message,
                                              options=pb.RunOptions(**options))):
        events.append(reply.event)
        if on_event is not None:
            await on_event(reply.event)
    return events


async def stored_events(stub, session_id: str, until_seq: int) -> list[pb.AgentEvent]:
    out = []
    async for reply in stub.Resume(pb.ResumeRequest(tenant_id=TENANT, session_id=session_id, after_seq=0)):
        out.append(reply.event)
        if reply.event.seq >= until_seq:
            break
    return out


@pytest.mark.model
async def test_model_calls_fs_read_and_fs_list_in_parallel_and_answers(tmp_path):
    async with running_mesh(tmp_path) as mesh:
        stub = mesh.agent
        session = (await stub.CreateSession(pb.CreateSessionRequest(
            tenant_id=TENANT, tools=["fs_read", "fs_list"], system_prompt="You are a file assistant."))).session
        live = await run_events(stub, session.session_id, "Read notes.txt and list the files here.",
                                max_steps=2, max_tokens=120, tool_choice="required", seed=7)
        names = [e.tool_call.name for e in live if e.HasField("tool_call")]
        assert {"fs_read", "fs_list"} <= set(names), names
        results = [e.tool_result for e in live if e.HasField("tool_result")]
        assert len(results) == len(names) and all(r.status.startswith("TOOL_STATUS_") for r in results)
        assert live[-1].HasField("final") and live[-1].final.reason == "stop"
        assert live[-1].final.usage.num_model_calls == 2
        # The stored log, read back through Resume from the store, is what the live client saw.
        assert await stored_events(stub, session.session_id, live[-1].seq) == live


@pytest.mark.model
async def test_history_past_the_fraction_compacts_and_goes_on(tmp_path):
    async with running_mesh(tmp_path, context_fraction=0.2) as mesh:
        stub = mesh.agent
        session = (await stub.CreateSession(pb.CreateSessionRequest(
            tenant_id=TENANT, tools=["fs_read"], system_prompt="Answer briefly."))).session
        long_text = " ".join(f"item{i}" for i in range(40))
        compactions = []
        for turn in range(5):
            events = await run_events(stub, session.session_id, f"turn {turn}: {long_text}", max_tokens=8,
                                      tool_choice="none", max_steps=1)
            assert events[-1].HasField("final"), events[-1]
            compactions += [e.compaction for e in events if e.HasField("compaction")]
            if compactions:
                break  # this turn compacted and still reached its final answer
        assert compactions, "history passed 0.2 x n_ctx without compaction"
        assert all(c.tokens_after < c.tokens_before for c in compactions)
        assert compactions[0].strategy in ("summarize", "drop_oldest", "minimal")


async def test_risky_command_waits_for_approval_and_session_approval_sticks(tmp_path):
    # Real store, policy and tools; the model is scripted so the risky command is exactly this one.
    command = call("shell_exec", command="rm -rf build")
    inference = ScriptedInference([command, "removed", command, "removed again"])
    async with running_mesh(tmp_path, inference=inference) as mesh:
        stub, ws = mesh.agent, mesh.workspace
        session = (await stub.CreateSession(pb.CreateSessionRequest(
            tenant_id=TENANT, tools=["shell_exec"], system_prompt="You run commands."))).session
        build = ws / TENANT / session.session_id / "build"
        build.mkdir(parents=True)
        approvals = []

        async def approve(event):
            if event.HasField("approval_required"):
                assert build.exists(), "the command ran before it was approved"
                approvals.append(event.approval_required)
                await stub.SubmitApproval(pb.SubmitApprovalRequest(
                    request_id=event.approval_required.approval_id, tenant_id=TENANT,
                    session_id=session.session_id, approval_id=event.approval_required.approval_id,
                    decision=pb.APPROVAL_DECISION_APPROVE_SESSION, approver="ops"))

        first = await run_events(stub, session.session_id, "Clean the build directory.", approve)
        assert len(approvals) == 1 and "rm -rf build" in approvals[0].arguments_json
        (result,) = [e.tool_result for e in first if e.HasField("tool_result")]
        assert result.status == "TOOL_STATUS_OK" and not build.exists()
        build.mkdir()
        second = await run_events(stub, session.session_id, "Clean it again.", approve)
        assert len(approvals) == 1, "approve-for-session asked again for the identical call"
        (result,) = [e.tool_result for e in second if e.HasField("tool_result")]
        assert result.status == "TOOL_STATUS_OK" and not build.exists()


async def test_killed_worker_task_is_finished_by_another_never_by_two(tmp_path):
    async with running_mesh(tmp_path, inference=ScriptedInference([]), max_workers=0) as mesh:
        stub, store_target = mesh.agent, mesh.targets["store"]
        session = (await stub.CreateSession(pb.CreateSessionRequest(tenant_id=TENANT))).session
        # Two orchestrator replicas sharing the real store; their own ports are scripted.
        async with service_channel(store_target, "orchestrator") as channel:
            shared = GrpcStore.for_channel(channel)
            stuck = Gate("never")
            dying = DyingStore(shared)
            config = OrchestratorConfig(max_workers=1, task_lease_ms=600, task_idle_wait_s=0.1,
                                        limits=RunLimits(lock_lease_ms=600))
            tools = FakeTools()
            replica_a = Orchestrator(store=dying, inference=ScriptedInference([stuck]), tools=tools,
                                     policy=FakePolicy(tools), config=replace(config, replica_id="replica-a"))
            replica_b = Orchestrator(store=shared, inference=ScriptedInference(["done by b"]), tools=tools,
                                     policy=FakePolicy(tools), config=replace(config, replica_id="replica-b"))
            task = await replica_a.enqueue_task(request_id="t", tenant_id=TENANT, session_id=session.session_id,
                                                user_message="work", options={})
            replica_a.start()
            await asyncio.wait_for(stuck.reached.wait(), 10)
            dying.dead = True  # replica A dies: nothing it sends reaches the store any more
            await replica_a.close()
            replica_b.start()
            views = []

            async def finished() -> bool:
                views.append(await replica_b.get_task(TENANT, task.task_id))
                return views[-1].state in ("SUCCEEDED", "FAILED")

            try:
                assert await wait_until(finished, 30, interval_s=0.05), views[-1]
            finally:
                await replica_b.close()
            view = views[-1]
            assert view.state == "SUCCEEDED" and view.result_text == "done by b", view
            record = await shared.get_task(tenant_id=TENANT, task_id=task.task_id)
            assert record.worker_id == "replica-b" and record.attempts >= 2
            events = await shared.read_events(tenant_id=TENANT, session_id=session.session_id, after_seq=0)
            finals = [e for e in events if e.type in ("final", "error")]
            assert len(finals) == 1 and finals[0].body["text"] == "done by b"
