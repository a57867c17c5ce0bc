"""REST and polyglot clients against the real orchestrator, on the real store, policy, tools and model.

One mesh per module (the model loads once); turns use a few tokens only.
"""
from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from services.common.identity import client_key
from tests.gateway.sse import SseEvent, read_sse
from tests.gateway.test_node_client import node_client_dir, run_node_turn  # noqa: F401 (fixture)
from tests.support.auth import CREDENTIALS
from tests.support.mesh import TENANT, Mesh, running_mesh

pytestmark = [pytest.mark.model, pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def real_mesh(tmp_path_factory, model_path) -> AsyncIterator[Mesh]:
    async with running_mesh(tmp_path_factory.mktemp("real-mesh"), model_path=model_path, gateway=True) as mesh:
        yield mesh


async def _events_until_final(reply) -> list[SseEvent]:
    # Resume stays open after the run ends (it follows the session), so stop at the last event of the turn.
    events = []
    async for event in read_sse(reply):
        events.append(event)
        if {"final", "error"} & set(event.data["event"]):
            break
    return events


async def test_node_client_runs_an_agent_turn_on_the_real_orchestrator(node_client_dir, real_mesh):  # noqa: F811
    # LLMESH_TEST_ORCHESTRATOR_TARGET points the same test at an external mesh (``make run``: 127.0.0.1:50052).
    target = os.environ.get("LLMESH_TEST_ORCHESTRATOR_TARGET") or real_mesh.orchestrator_target
    # The node client names tenant acme (TENANT); LLMESH_TEST_API_KEY is a key of it on an external mesh.
    api_key = os.environ.get("LLMESH_TEST_API_KEY") or client_key(CREDENTIALS, TENANT)
    result = await run_node_turn(node_client_dir, target, api_key)
    assert result["stage"] == "done", result
    events = result["events"]
    assert [int(e["seq"]) for e in events] == list(range(1, len(events) + 1))
    assert events[0]["type"] == "EVENT_TYPE_TURN_STARTED"
    # The agent ran the model: it streamed tokens (and maybe tool calls) and ended the turn with an answer.
    assert any(e["type"] == "EVENT_TYPE_TOKEN" for e in events), events
    assert events[-1]["type"] == "EVENT_TYPE_FINAL", events[-1]
    assert int(events[-1]["value"]["usage"]["num_model_calls"]) >= 1


async def test_dropped_sse_run_resumes_with_last_event_id_on_the_real_orchestrator(real_mesh):
    async with real_mesh.client() as client:
        created = await client.post("/v1/sessions", json={"title": "resume", "systemPrompt": "Answer briefly."})
        assert created.status_code == 200, created.text
        session_id = created.json()["session"]["sessionId"]
        seen = []
        run_body = {"userMessage": "Count from one to twenty.",
                    "options": {"maxTokens": 24, "maxSteps": 1, "toolChoice": "none", "seed": 3}}
        async with client.stream("POST", f"/v1/sessions/{session_id}:run", json=run_body) as reply:
            assert reply.status_code == 200
            async for event in read_sse(reply):
                seen.append(event)
                if len(seen) == 3:
                    break  # the connection drops while the model is still generating
        async with client.stream("GET", f"/v1/sessions/{session_id}/events",
                                 headers={"Last-Event-ID": seen[-1].id}) as reply:
            assert reply.status_code == 200
            rest = await _events_until_final(reply)
        async with client.stream("GET", f"/v1/sessions/{session_id}/events") as reply:
            stored = await _events_until_final(reply)
    joined = seen + rest
    assert [int(e.id) for e in joined] == list(range(1, len(joined) + 1)), "a gap or a duplicate after resume"
    assert [e.data for e in joined] == [e.data for e in stored]
    final = joined[-1].data["event"]["final"]
    assert final["reason"] in ("stop", "length")
    tokens = "".join(e.data["event"]["token"]["text"] for e in joined if "token" in e.data["event"])
    assert tokens.strip() and tokens.strip() == final["text"].strip()


async def test_session_approval_over_rest_is_asked_once_and_covers_the_next_run(real_mesh):
    # The real model repeats the system prompt's example call, often several times in one reply; the
    # policy gives the copies one approval id and the orchestrator must ask the person only once.
    async with real_mesh.client() as client:
        created = await client.post("/v1/sessions", json={"tools": ["shell_exec"], "systemPrompt": "Run commands."})
        session_id = created.json()["session"]["sessionId"]
        asked, results = [], []
        for turn in range(2):
            body = {"userMessage": "Run the command.", "requestId": f"approval-run-{turn}",
                    "options": {"maxTokens": 120, "maxSteps": 2, "toolChoice": "required", "seed": 7}}
            async with client.stream("POST", f"/v1/sessions/{session_id}:run", json=body) as reply:
                async for event in read_sse(reply):
                    assert "event" in event.data, f"turn {turn}: the stream sent {event.data}"
                    agent_event = event.data["event"]
                    if "approvalRequired" in agent_event:
                        approval_id = agent_event["approvalRequired"]["approvalId"]
                        asked.append((turn, approval_id))
                        answer = await client.post(f"/v1/sessions/{session_id}/approvals/{approval_id}",
                                                   json={"decision": "APPROVAL_DECISION_APPROVE_SESSION",
                                                         "approver": "ops", "requestId": approval_id})
                        assert answer.status_code == 200, answer.text
                    if "toolResult" in agent_event:
                        results.append((turn, agent_event["toolResult"]["status"]))
                    if {"final", "error"} & set(agent_event):
                        assert "final" in agent_event, agent_event
                        break
    assert [turn for turn, _ in asked] == [0], f"asked {asked}"
    assert {turn for turn, _ in results} == {0, 1}, "both runs should have called shell_exec"
    assert all(status == "TOOL_STATUS_OK" for _, status in results), results
