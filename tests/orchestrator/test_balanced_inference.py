"""The orchestrator on two real inference nodes (synthetic backend) through the client-side balancer.

Set through `inference_nodes`, as in production: a session's turns stick to
the node holding its KV cache, and when that node dies between turns the
next turn moves to the other node and succeeds.
"""
from __future__ import annotations

from llmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from llmesh.orchestrator.v1 import orchestrator_pb2 as pb

from tests.orchestrator.balanced_mesh import balanced_orchestrator
from tests.support.auth import service_channel

TENANT = "acme"


async def _sessions_held(address: str) -> int:
    """How many sessions keep their KV cache on the node, as the node itself reports."""
    async with service_channel(address, "orchestrator") as channel:
        load = await inference_pb2_grpc.InferenceServiceStub(channel).GetLoad(inference_pb2.GetLoadRequest(),
                                                                              timeout=5)
    return load.num_sessions


async def _turn(stub, session_id: str, message: str) -> list[pb.AgentEvent]:
    options = pb.RunOptions(max_steps=1, max_tokens=6, tool_choice="none")
    return [reply.event async for reply in stub.Run(pb.RunRequest(
        request_id=f"{session_id}:{message}", tenant_id=TENANT, session_id=session_id, user_message=message,
        options=options), timeout=30)]


async def test_session_sticks_to_its_node_and_moves_when_the_node_dies(tmp_path):
    async with balanced_orchestrator(tmp_path, synthetic_ttft_ms=100) as mesh:
        session_id = (await mesh.stub.CreateSession(pb.CreateSessionRequest(tenant_id=TENANT))).session.session_id
        for message in ("first", "second", "third"):
            events = await _turn(mesh.stub, session_id, message)
            assert events[-1].HasField("final") and events[-1].final.text, events[-1]
        holder = mesh.balancer.holder_of(session_id)
        other = next(a for a in mesh.nodes if a != holder)
        assert [await _sessions_held(holder), await _sessions_held(other)] == [1, 0], "turns did not stick"

        assert await mesh.kill_node_of(session_id) == holder  # the session's node dies between turns
        events = await _turn(mesh.stub, session_id, "after the node died")
        assert events[-1].HasField("final") and events[-1].final.text, events[-1]
        assert [e.seq for e in events] == list(range(events[0].seq, events[0].seq + len(events)))
        assert mesh.balancer.holder_of(session_id) == other
        assert await _sessions_held(other) == 1
