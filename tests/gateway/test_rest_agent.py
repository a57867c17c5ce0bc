"""The agent surface over REST, against a fake orchestrator served over real gRPC."""
from __future__ import annotations

import json

from tests.gateway.conftest import Mesh
from tests.gateway.sse import read_sse


async def create_session(client, **body) -> str:
    reply = await client.post("/v1/sessions", json={"title": "t", **body})
    assert reply.status_code == 200, reply.text
    return reply.json()["session"]["sessionId"]


async def test_create_and_get_session_uses_the_keys_tenant(mesh: Mesh):
    async with mesh.client() as client:
        session_id = await create_session(client, requestId="req-1")
        reply = await client.get(f"/v1/sessions/{session_id}")
    assert reply.status_code == 200
    session = reply.json()["session"]
    assert session["tenantId"] == "acme"
    assert session["title"] == "t"
    # int64 is a string in proto JSON, and zero values are printed.
    assert session["lastSeq"] == "0"
    created = mesh.agent.calls[0][1]
    assert created.tenant_id == "acme" and created.request_id == "req-1"


async def test_other_tenant_cannot_see_or_claim_a_session(mesh: Mesh):
    async with mesh.client("acme") as acme, mesh.client("globex") as globex:
        session_id = await create_session(acme)
        hidden = await globex.get(f"/v1/sessions/{session_id}")
        claimed = await globex.get(f"/v1/sessions/{session_id}", params={"tenant_id": "acme"})
    assert hidden.status_code == 404
    assert hidden.json()["error"]["status"] == "NOT_FOUND"
    assert claimed.status_code == 403
    assert claimed.json()["error"]["details"][0]["reason"] == "TENANT_MISMATCH"


async def test_run_streams_sse_with_seq_ids(mesh: Mesh):
    async with mesh.client() as client:
        session_id = await create_session(client)
        async with client.stream("POST", f"/v1/sessions/{session_id}:run",
                                 json={"userMessage": "one two three"}) as reply:
            assert reply.status_code == 200
            assert reply.headers["content-type"].startswith("text/event-stream")
            events = [e async for e in read_sse(reply)]
    seqs = [int(e.data["event"]["seq"]) for e in events]
    assert seqs == [1, 2, 3, 4, 5]
    assert [e.id for e in events] == [str(s) for s in seqs]
    assert events[0].data["event"]["type"] == "EVENT_TYPE_TURN_STARTED"
    assert "".join(e.data["event"]["token"]["text"] for e in events[1:4]) == "one two three "
    assert events[-1].data["event"]["final"]["reason"] == "stop"


async def test_dropped_sse_client_resumes_with_last_event_id_and_loses_nothing(mesh: Mesh):
    message = " ".join(f"w{i}" for i in range(12))
    async with mesh.client() as client:
        session_id = await create_session(client)
        seen = []
        async with client.stream("POST", f"/v1/sessions/{session_id}:run", json={"userMessage": message}) as reply:
            async for event in read_sse(reply):
                seen.append(event)
                if len(seen) == 4:
                    break  # the connection drops mid-run
        async with client.stream("GET", f"/v1/sessions/{session_id}/events",
                                 headers={"Last-Event-ID": seen[-1].id}) as reply:
            assert reply.status_code == 200
            seen += [e async for e in read_sse(reply)]
    seqs = [int(e.id) for e in seen]
    assert seqs == list(range(1, 12 + 3))  # turn start, 12 tokens, final: no gap, no duplicate
    tokens = "".join(e.data["event"]["token"]["text"] for e in seen if "token" in e.data["event"])
    assert tokens == message + " "
    # The run went on while nobody listened: Resume started where the client left off.
    resume = [r for name, r in mesh.agent.calls if name == "Resume"]
    assert resume[0].after_seq == 4


async def test_resume_as_ndjson_replays_after_query_seq(mesh: Mesh):
    async with mesh.client() as client:
        session_id = await create_session(client)
        async with client.stream("POST", f"/v1/sessions/{session_id}:run", json={"userMessage": "a b"}) as reply:
            [e async for e in read_sse(reply)]
        reply = await client.get(f"/v1/sessions/{session_id}/events", params={"after_seq": "2"},
                                 headers={"Accept": "application/x-ndjson"})
    assert reply.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in reply.text.splitlines()]
    assert [line["event"]["seq"] for line in lines] == ["3", "4"]


async def test_cancel_stops_the_active_run(mesh: Mesh):
    mesh.agent.step_s = 0.2
    async with mesh.client() as client:
        session_id = await create_session(client)
        async with client.stream("POST", f"/v1/sessions/{session_id}:run",
                                 json={"userMessage": "a b c d e f g h"}) as reply:
            events = []
            async for event in read_sse(reply):
                events.append(event)
                if len(events) == 1:
                    cancel = await client.post(f"/v1/sessions/{session_id}:cancel", json={"requestId": "c1"})
                    assert cancel.status_code == 200
                    assert cancel.json() == {"cancelled": True}
    assert events[-1].data["event"]["final"]["reason"] == "cancelled"
    assert len(events) < 10


async def test_approve_passes_path_fields_and_enum_names(mesh: Mesh):
    async with mesh.client() as client:
        session_id = await create_session(client)
        reply = await client.post(f"/v1/sessions/{session_id}/approvals/ap-7",
                                  json={"decision": "APPROVAL_DECISION_APPROVE_ONCE", "approver": "ops"})
    assert reply.status_code == 200 and reply.json() == {"accepted": True}
    approval = mesh.agent.approvals[0]
    assert (approval.session_id, approval.approval_id, approval.approver) == (session_id, "ap-7", "ops")
    assert approval.tenant_id == "acme"


async def test_bad_input_is_400_naming_the_field(mesh: Mesh):
    async with mesh.client() as client:
        session_id = await create_session(client)
        bad_enum = await client.post(f"/v1/sessions/{session_id}/approvals/a1", json={"decision": "MAYBE"})
        bad_int = await client.get("/v1/sessions", params={"page_size": "ten"})
        unknown_field = await client.post("/v1/sessions", json={"titel": "typo"})
        not_json = await client.post("/v1/sessions", content=b"{nope", headers={"Content-Type": "application/json"})
        empty_message = await client.post(f"/v1/sessions/{session_id}:run", json={"userMessage": " "})
        bad_resume = await client.get(f"/v1/sessions/{session_id}/events", headers={"Last-Event-ID": "x"})
    for reply, field in [(bad_enum, "decision"), (bad_int, "page_size"), (unknown_field, "titel"),
                         (not_json, "body"), (empty_message, "user_message"), (bad_resume, "Last-Event-ID")]:
        assert reply.status_code == 400, (field, reply.text)
        error = reply.json()["error"]
        assert error["status"] == "INVALID_ARGUMENT"
        assert field in error["message"], (field, error)


async def test_unknown_session_and_route_and_method(mesh: Mesh):
    async with mesh.client() as client:
        missing = await client.post("/v1/sessions/nope:run", json={"userMessage": "hi"})
        no_route = await client.get("/v1/nothing/here")
        wrong_method = await client.delete("/v1/sessions")
    assert missing.status_code == 404
    assert missing.json()["error"]["details"][0]["reason"] == "SESSION_NOT_FOUND"
    assert no_route.status_code == 404
    assert wrong_method.status_code == 405 and set(wrong_method.headers["allow"].split(", ")) == {"GET", "POST"}


async def test_backend_down_is_503(keys, authenticator):
    import httpx

    from services.gateway.config import Settings
    from services.gateway.server import build_app, running_gateway

    app = build_app(Settings(port=0, orchestrator_target="127.0.0.1:1"), authenticator=authenticator)
    async with running_gateway(app) as url:
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {keys.acme}"}) as client:
            down = await client.get("/v1/sessions")
            unconfigured = await client.get("/v1/tools")
    assert down.status_code == 503 and down.json()["error"]["status"] == "UNAVAILABLE"
    assert unconfigured.status_code == 503
    assert unconfigured.json()["error"]["details"][0]["reason"] == "BACKEND_NOT_CONFIGURED"
