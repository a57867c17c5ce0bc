"""AgentService over a real in-process gRPC server (ports are the in-memory store and fakes)."""
from __future__ import annotations

import grpc
import pytest
from llmesh.orchestrator.v1 import orchestrator_pb2 as pb
from llmesh.orchestrator.v1 import orchestrator_pb2_grpc

from services.common.interceptors import error_info
from services.common.runtime import running_service
from services.orchestrator.adapters.memory_store import MemoryStore
from services.orchestrator.config import Settings
from services.orchestrator.server import build_app
from tests.orchestrator.fakes import FakePolicy, FakeTools, Gate, ScriptedInference, call
from tests.support.auth import client_channel, service_channel
from tests.support.waiting import wait_until


@pytest.fixture
async def mesh(request: pytest.FixtureRequest):
    inference = ScriptedInference()
    tools = FakeTools()
    app = build_app(Settings(port=0, max_workers=1, task_idle_wait_ms=50, event_batch_ms=5),
                    store=MemoryStore(), inference=inference, tools=tools, policy=FakePolicy(tools))
    async with running_service(app, Settings(port=0)) as svc:
        # A client of acme, the tenant every request here names; "gateway" (indirect param) calls as the
        # gateway, whose requests name their tenant themselves (an empty one is not filled in).
        target = f"127.0.0.1:{svc.port}"
        caller = getattr(request, "param", "client")
        async with (service_channel(target, "gateway") if caller == "gateway" else client_channel(target, "acme")
                    ) as channel:
            yield orchestrator_pb2_grpc.AgentServiceStub(channel), inference, tools


async def new_session(stub, **kw) -> pb.Session:
    reply = await stub.CreateSession(pb.CreateSessionRequest(request_id="", tenant_id="acme", model="gemma", **kw))
    return reply.session


async def test_run_streams_typed_events_and_resume_replays_them(mesh):
    stub, inference, _tools = mesh
    inference.replies += [call("fs_read", path="a.txt") + "\n" + call("fs_list", path="."), "Both done."]
    session = await new_session(stub, tools=["fs_read", "fs_list"])
    live = [r.event async for r in stub.Run(pb.RunRequest(request_id="r1", tenant_id="acme",
                                                           session_id=session.session_id, user_message="go"))]
    assert [pb.EventType.Name(e.type) for e in live] == [
        "EVENT_TYPE_TURN_STARTED", "EVENT_TYPE_TOOL_CALL", "EVENT_TYPE_TOOL_CALL", "EVENT_TYPE_TOOL_RESULT",
        "EVENT_TYPE_TOOL_RESULT", "EVENT_TYPE_TOKEN", "EVENT_TYPE_TOKEN", "EVENT_TYPE_FINAL"]
    assert live[0].turn_started.user_message == "go"
    assert {e.tool_call.name for e in live if e.HasField("tool_call")} == {"fs_read", "fs_list"}
    assert live[-1].final.text == "Both done." and live[-1].final.usage.num_tool_calls == 2
    assert all(e.session_id == session.session_id and e.schema_version == 1 for e in live)
    got = await stub.GetSession(pb.GetSessionRequest(tenant_id="acme", session_id=session.session_id))
    assert got.session.last_seq == live[-1].seq and list(got.session.tools) == ["fs_read", "fs_list"]
    resumed = []
    async for reply in stub.Resume(pb.ResumeRequest(tenant_id="acme", session_id=session.session_id, after_seq=3)):
        resumed.append(reply.event)
        if reply.event.HasField("final"):
            break
    assert resumed == live[3:]


async def test_errors_are_statuses_naming_the_field(mesh):
    stub, _inference, _tools = mesh
    session = await new_session(stub)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stub.Run(pb.RunRequest(tenant_id="acme", session_id=session.session_id, user_message="")):
            pass
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(err.value).metadata["field"] == "user_message"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetSession(pb.GetSessionRequest(tenant_id="acme", session_id="missing"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.SubmitApproval(pb.SubmitApprovalRequest(tenant_id="acme", session_id=session.session_id,
                                                           approval_id="x"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(err.value).metadata["field"] == "decision"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CreateSession(pb.CreateSessionRequest(tenant_id="acme", tools=["bad name!"]))
    assert error_info(err.value).metadata["field"] == "tools"


async def test_disconnect_then_cancel_and_busy_session(mesh):
    stub, inference, _tools = mesh
    gate = Gate("unused")
    inference.replies += [gate]
    session = await new_session(stub)
    call_ = stub.Run(pb.RunRequest(request_id="r", tenant_id="acme", session_id=session.session_id,
                                   user_message="slow"))
    first = await call_.read()
    call_.cancel()  # the client goes away; the run goes on
    await gate.reached.wait()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stub.Run(pb.RunRequest(request_id="r2", tenant_id="acme", session_id=session.session_id,
                                              user_message="again")):
            pass
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and error_info(err.value).reason == "SESSION_BUSY"
    assert (await stub.Cancel(pb.CancelRequest(tenant_id="acme", session_id=session.session_id))).cancelled
    tail = []
    async for reply in stub.Resume(pb.ResumeRequest(tenant_id="acme", session_id=session.session_id,
                                                    after_seq=first.event.seq)):
        tail.append(reply.event)
        if reply.event.HasField("final"):
            break
    assert tail[-1].final.reason == "cancelled"


async def test_approval_over_grpc(mesh):
    stub, inference, tools = mesh
    inference.replies += [call("shell", command="make clean"), "cleaned"]
    session = await new_session(stub)
    events = []
    async for reply in stub.Run(pb.RunRequest(request_id="r", tenant_id="acme", session_id=session.session_id,
                                              user_message="clean")):
        events.append(reply.event)
        if reply.event.HasField("approval_required"):
            ok = await stub.SubmitApproval(pb.SubmitApprovalRequest(
                request_id="a1", tenant_id="acme", session_id=session.session_id,
                approval_id=reply.event.approval_required.approval_id,
                decision=pb.APPROVAL_DECISION_APPROVE_ONCE, approver="ops"))
            assert ok.accepted
    assert events[-1].final.text == "cleaned" and [c.name for c in tools.executed] == ["shell"]


async def test_enqueue_task_and_get_it(mesh):
    stub, inference, _tools = mesh
    inference.replies += ["task answer"]
    session = await new_session(stub)
    task = (await stub.EnqueueTask(pb.EnqueueTaskRequest(request_id="t", tenant_id="acme",
                                                         session_id=session.session_id,
                                                         user_message="in background"))).task
    assert task.state == pb.TASK_STATE_QUEUED and task.session_id == session.session_id
    got = task

    async def succeeded() -> bool:
        nonlocal got
        got = (await stub.GetTask(pb.GetTaskRequest(tenant_id="acme", task_id=task.task_id))).task
        return got.state == pb.TASK_STATE_SUCCEEDED

    assert await wait_until(succeeded, timeout_s=10), got
    assert got.result_text == "task answer"


@pytest.mark.parametrize("mesh", ["gateway"], indirect=True)
@pytest.mark.parametrize("method", [m.name for m in pb.DESCRIPTOR.services_by_name["AgentService"].methods])
async def test_every_rpc_rejects_an_empty_request_naming_a_field(mesh, method):
    stub, _inference, _tools = mesh
    descriptor = pb.DESCRIPTOR.services_by_name["AgentService"].methods_by_name[method]
    request = getattr(pb, descriptor.input_type.name)()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        if descriptor.server_streaming:
            async for _ in getattr(stub, method)(request):
                pass
        else:
            await getattr(stub, method)(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    field = error_info(err.value).metadata["field"]
    assert field.split(".")[0] in err.value.details()
