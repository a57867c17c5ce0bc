"""The agent surface over a WebSocket (/v1/sessions/{id}/ws), with the `websockets` client against a fake
orchestrator served over real gRPC; the socket's own logic also against in-memory stand-ins."""
from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import SimpleNamespace

import httpx
import pytest
import uvicorn
from llmesh.orchestrator.v1 import orchestrator_pb2 as pb
from prometheus_client import REGISTRY
from starlette.datastructures import QueryParams
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from services.common.authz import PRINCIPAL_HEADER
from services.common.runtime import running_service
from services.common.settings import ServerSettings
from services.gateway.config import Settings
from services.gateway.server import build_app, websocket_options
from services.gateway.websocket import SessionSocket
from tests.gateway.conftest import Keys, Mesh
from tests.gateway.fakes import FakeAgentApp, FakeAgentService
from tests.gateway.sse import read_sse
from tests.gateway.test_rest_agent import create_session

TIMEOUT_S = 5


def ws_url(base: str, session_id: str, query: str = "") -> str:
    return base.replace("http://", "ws://", 1) + f"/v1/sessions/{session_id}/ws" + (f"?{query}" if query else "")


def open_socket(mesh: Mesh | WsMesh, session_id: str, key: str | None = "acme", query: str = "",
                **kwargs) -> connect:
    token = {"acme": mesh.keys.acme, "globex": mesh.keys.globex}.get(key, key) if key else None
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return connect(ws_url(mesh.url, session_id, query), additional_headers=headers, proxy=None,
                   open_timeout=TIMEOUT_S, **kwargs)


async def send(ws: ClientConnection, **message) -> None:
    await ws.send(json.dumps(message))


async def receive(ws: ClientConnection) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT_S))


async def receive_until(ws: ClientConnection, done: Callable[[list[dict]], bool]) -> list[dict]:
    messages: list[dict] = []
    while not done(messages):
        messages.append(await receive(ws))
    return messages


def ended(messages: list[dict]) -> bool:
    return bool(messages) and messages[-1].get("type") == "end"


def ended_and_acked(messages: list[dict]) -> bool:
    """Both the stream's end and the ack have come, in whichever order."""
    return {"end", "ack"} <= {m.get("type") for m in messages}


def events_of(messages: list[dict]) -> list[dict]:
    return [m["event"] for m in messages if "event" in m]


def seqs_of(messages: list[dict]) -> list[int]:
    return [int(event["seq"]) for event in events_of(messages)]


def refusals(reason: str) -> float:
    return REGISTRY.get_sample_value("llmesh_auth_refusals_total", {
        "service": "gateway", "method": "WebSocket", "reason": reason, "caller": "unauthenticated"}) or 0.0


async def open_sockets_drop_to(count: float) -> None:
    """The gateway's handlers of closed sockets end (and their gRPC streams with them)."""
    for _ in range(200):
        if REGISTRY.get_sample_value("llmesh_ws_connections") == count:
            return
        await asyncio.sleep(0.01)
    assert REGISTRY.get_sample_value("llmesh_ws_connections") == count


class RecordingAgentService(FakeAgentService):
    """The fake orchestrator, noting the metadata each Run and SubmitApproval arrived with."""

    def __init__(self) -> None:
        super().__init__()
        self.metadata: list[tuple[str, dict[str, str]]] = []

    async def Run(self, request, context):
        self.metadata.append(("Run", dict(context.invocation_metadata())))
        async for reply in super().Run(request, context):
            yield reply

    async def SubmitApproval(self, request, context):
        self.metadata.append(("SubmitApproval", dict(context.invocation_metadata())))
        return await super().SubmitApproval(request, context)


@dataclass
class WsMesh:
    url: str
    agent: RecordingAgentService
    keys: Keys


@contextlib.asynccontextmanager
async def serving(app, settings: Settings, send_buffer: int) -> AsyncIterator[str]:
    """Like running_gateway, with small kernel send buffers (accepted sockets inherit the listener's)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="on",
                                           timeout_graceful_shutdown=1, **websocket_options(settings)))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await _until(lambda: server.started or task.done())
        assert server.started
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task
        sock.close()


@contextlib.asynccontextmanager
async def ws_mesh(keys: Keys, authenticator, **settings: object) -> AsyncIterator[WsMesh]:
    """The gateway with small send buffers and a recording fake orchestrator."""
    agent_app = FakeAgentApp(RecordingAgentService())
    async with running_service(agent_app, ServerSettings(port=0)) as agent:
        gateway_settings = Settings(port=0, orchestrator_target=f"127.0.0.1:{agent.port}", **settings)
        app = build_app(gateway_settings, authenticator=authenticator)
        async with serving(app, gateway_settings, send_buffer=8192) as url:
            yield WsMesh(url, agent_app.service, keys)


@pytest.fixture
async def wsmesh(keys: Keys, authenticator) -> AsyncIterator[WsMesh]:
    """Fast keep-alive pings (0.2 s, 0.3 s to answer) and a short wait for the auth message."""
    async with ws_mesh(keys, authenticator, ws_ping_interval_s=0.2, ws_ping_timeout_s=0.3,
                       ws_auth_timeout_s=0.5) as mesh:
        yield mesh


async def test_a_run_with_an_approval_over_one_socket(wsmesh: WsMesh):
    wsmesh.agent.approval_prefix = "!"
    async with httpx.AsyncClient(base_url=wsmesh.url, headers={"Authorization": f"Bearer {wsmesh.keys.acme}"},
                                 timeout=TIMEOUT_S) as http:
        session_id = await create_session(http)
        async with open_socket(wsmesh, session_id) as ws:
            await send(ws, type="run", id=1, user_message="list !shell done", options={"max_steps": 3})
            asked = await receive_until(ws, lambda m: bool(m) and "approvalRequired" in m[-1].get("event", {}))
            approval = asked[-1]["event"]["approvalRequired"]
            assert approval["name"] == "shell"
            await send(ws, type="approve", id="yes", approval_id=approval["approvalId"],
                       decision="APPROVAL_DECISION_APPROVE_ONCE", approver="ops")
            rest = await receive_until(ws, ended_and_acked)
        # The same JSON the SSE stream carries for each event.
        async with http.stream("GET", f"/v1/sessions/{session_id}/events", params={"after_seq": "0"}) as reply:
            sse = [event.data async for event in read_sse(reply)]
    messages = asked + rest
    assert [m for m in messages if "event" in m] == sse
    events = events_of(messages)
    assert seqs_of(messages) == list(range(1, 7))
    assert [e["type"] for e in events] == [
        "EVENT_TYPE_TURN_STARTED", "EVENT_TYPE_TOKEN", "EVENT_TYPE_APPROVAL_REQUIRED", "EVENT_TYPE_TOOL_RESULT",
        "EVENT_TYPE_TOKEN", "EVENT_TYPE_FINAL"]
    assert events[3]["toolResult"]["status"] == "TOOL_STATUS_OK"
    assert events[-1]["final"]["reason"] == "stop"
    assert {"type": "ack", "for": "approve", "id": "yes", "reply": {"accepted": True}} in messages
    assert {"type": "end", "for": "run", "id": 1} in messages
    run = next(r for name, r in wsmesh.agent.calls if name == "Run")
    assert (run.tenant_id, run.session_id, run.options.max_steps) == ("acme", session_id, 3)
    decision = wsmesh.agent.approvals[0]
    assert (decision.tenant_id, decision.session_id, decision.approval_id, decision.approver, decision.decision) == (
        "acme", session_id, approval["approvalId"], "ops", pb.APPROVAL_DECISION_APPROVE_ONCE)
    # The orchestrator is called as the client: the gateway's channel forwards the principal.
    for _name, metadata in wsmesh.agent.metadata:
        assert json.loads(metadata[PRINCIPAL_HEADER])["tenant_id"] == "acme"
    assert [name for name, _ in wsmesh.agent.metadata] == ["Run", "SubmitApproval"]


async def test_cancel_and_a_second_run_on_the_same_socket(mesh: Mesh):
    mesh.agent.step_s = 0.05
    async with mesh.client() as http:
        session_id = await create_session(http)
    async with open_socket(mesh, session_id) as ws:
        await send(ws, type="run", user_message="a b c d e f g h i j k l")
        first = await receive(ws)
        assert first["event"]["type"] == "EVENT_TYPE_TURN_STARTED"
        await send(ws, type="resume", id="r", after_seq=0)  # one stream at a time
        await send(ws, type="cancel", id="c")
        messages = await receive_until(ws, ended_and_acked)
        # A second run on the same socket follows on from the first, without a gap.
        await send(ws, type="run", user_message="x y")
        second = await receive_until(ws, ended)
    refused = next(m for m in messages if m.get("type") == "error")
    assert refused["for"] == "resume" and refused["id"] == "r"
    assert refused["error"]["details"][0]["reason"] == "STREAM_ACTIVE"
    assert refused["error"]["message"].startswith("type:")
    assert {"type": "ack", "for": "cancel", "id": "c", "reply": {"cancelled": True}} in messages
    assert events_of(messages)[-1]["final"]["reason"] == "cancelled"
    assert len(events_of(messages)) < 12
    seqs = seqs_of([first, *messages, *second])
    assert seqs == list(range(1, len(seqs) + 1))
    assert events_of(second)[-1]["final"]["text"] == "x y"


async def test_resume_replays_exactly_what_comes_after_seq(mesh: Mesh):
    async with mesh.client() as http:
        session_id = await create_session(http)
    async with open_socket(mesh, session_id) as ws:
        await send(ws, type="run", user_message="a b c")
        await receive_until(ws, ended)
    async with open_socket(mesh, session_id, query="after_seq=2") as ws:
        by_query = await receive_until(ws, ended)
        await send(ws, type="resume", id=7, after_seq="3")  # int64 as a string, as proto JSON allows
        by_message = await receive_until(ws, ended)
    assert seqs_of(by_query) == [3, 4, 5] and by_query[-1] == {"type": "end", "for": "resume"}
    assert seqs_of(by_message) == [4, 5] and by_message[-1] == {"type": "end", "for": "resume", "id": 7}
    assert [r.after_seq for name, r in mesh.agent.calls if name == "Resume"] == [2, 3]


async def test_a_socket_dropped_100_times_sees_every_event_exactly_once(mesh: Mesh):
    rng = random.Random(20260101)
    mesh.agent.step_s = 0.002
    words = [f"w{i}" for i in range(300)]
    async with mesh.client() as http:
        session_id = await create_session(http)
    seen: list[dict] = []
    ws = await open_socket(mesh, session_id)
    await send(ws, type="run", user_message=" ".join(words))
    drops = 0
    while True:
        final = bool(seen) and "final" in seen[-1]
        if final and drops >= 100:
            break
        # Read a few events (the first connection at least the run's start, so that the run surely began) ...
        budget = rng.randint(1 if drops == 0 else 0, 5) if drops < 100 else 10**6
        while budget > 0 and not (seen and "final" in seen[-1]):
            message = await receive(ws)
            if message.get("type") == "end":
                break
            assert "event" in message, message
            seen.append(message["event"])
            budget -= 1
        if drops >= 100:
            continue
        # ... then drop the connection, abruptly or cleanly, and come back after the last seq seen.
        if rng.random() < 0.5:
            ws.transport.abort()
        else:
            await ws.close()
        drops += 1
        after = int(seen[-1]["seq"]) if seen else 0
        if rng.random() < 0.5:
            ws = await open_socket(mesh, session_id, query=f"after_seq={after}")
        else:
            ws = await open_socket(mesh, session_id)
            await send(ws, type="resume", after_seq=after)
    await ws.close()
    seqs = [int(event["seq"]) for event in seen]
    assert seqs == list(range(1, len(words) + 3))  # turn start, a token per word, final: no gap, no repeat
    assert "".join(e["token"]["text"] for e in seen if "token" in e) == " ".join(words) + " "
    assert seen[-1]["final"]["reason"] == "stop"
    # A connection dropped right after it asked may go before its Resume call does.
    assert 50 < len([name for name, _ in mesh.agent.calls if name == "Resume"]) <= 100
    await open_sockets_drop_to(0)


async def test_auth_by_header_or_by_a_first_message(mesh: Mesh):
    async with mesh.client("globex") as http:
        session_id = await create_session(http)
    async with open_socket(mesh, session_id, key="globex") as ws:
        await send(ws, type="ping", id=1)
        assert await receive(ws) == {"type": "pong", "id": 1}
        await send(ws, type="auth", api_key=mesh.keys.globex)  # only ever a first message
        late = await receive(ws)
    assert late["type"] == "error" and late["error"]["details"][0]["metadata"]["field"] == "type"
    # A browser cannot set headers: the key comes as the first message.
    async with open_socket(mesh, session_id, key=None) as ws:
        await send(ws, type="auth", id="hi", api_key=mesh.keys.globex)
        assert await receive(ws) == {"type": "authenticated", "tenant_id": "globex", "id": "hi"}
        await send(ws, type="run", user_message="from a browser")
        messages = await receive_until(ws, ended)
    assert events_of(messages)[-1]["final"]["text"] == "from a browser"
    run = next(r for name, r in mesh.agent.calls if name == "Run")
    assert run.tenant_id == "globex"
    # Another tenant's key does not reach the session.
    async with open_socket(mesh, session_id, key="acme") as ws:
        await send(ws, type="run", user_message="mine now")
        refused = await receive(ws)
    assert refused["for"] == "run" and refused["error"]["details"][0]["reason"] == "SESSION_NOT_FOUND"


async def test_a_bad_or_missing_key_is_closed_with_1008_and_counted(wsmesh: WsMesh):
    before = {reason: refusals(reason) for reason in ("API_KEY_INVALID", "API_KEY_MISSING", "INVALID_ARGUMENT")}
    cases = [("lmk_abc_wrong", None, "API_KEY_INVALID"),
             (None, {"type": "auth", "api_key": "lmk_abc_wrong"}, "API_KEY_INVALID"),
             (None, {"type": "run", "user_message": "no key"}, "API_KEY_MISSING"),
             (None, {"type": "auth", "apiKey": wsmesh.keys.acme}, "INVALID_ARGUMENT"),
             (None, None, "API_KEY_MISSING")]  # says nothing: the auth message is late (0.5 s here)
    for key, first, reason in cases:
        async with open_socket(wsmesh, "s1", key=key) as ws:
            if first is not None:
                await ws.send(json.dumps(first))
            refused = await receive(ws)
            with pytest.raises(ConnectionClosed) as closed:
                await receive(ws)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008, (key, first)
        assert refused["type"] == "error" and refused["for"] == "auth"
        assert refused["error"]["details"][0]["reason"] == reason
    assert refusals("API_KEY_INVALID") == before["API_KEY_INVALID"] + 2
    assert refusals("API_KEY_MISSING") == before["API_KEY_MISSING"] + 2
    assert refusals("INVALID_ARGUMENT") == before["INVALID_ARGUMENT"] + 1
    assert wsmesh.agent.calls == []


async def test_unknown_types_fields_and_bad_values_are_refused_naming_them(mesh: Mesh):
    async with mesh.client() as http:
        session_id = await create_session(http)
    cases = [({"type": "dance"}, "type", None),
             ({"user_message": "no type"}, "type", None),
             ({"type": 5}, "type", None),
             ({"type": "run", "user_mesage": "typo"}, "user_mesage", "run"),
             ({"type": "run", "user_message": "x", "options": {"max_step": 1}}, "max_step", "run"),
             ({"type": "run", "user_message": "x", "id": [1]}, "id", None),
             ({"type": "run", "user_message": " "}, "user_message", "run"),
             ({"type": "ping", "extra": 1}, "extra", "ping"),
             ({"type": "approve", "decision": "APPROVAL_DECISION_DENY"}, "approval_id", "approve"),
             ({"type": "approve", "approval_id": "a1", "decision": "MAYBE"}, "decision", "approve"),
             ({"type": "resume", "after_seq": "x"}, "after_seq", "resume"),
             ({"type": "cancel", "session_id": "another"}, "session_id", "cancel"),
             ({"type": "cancel", "tenant_id": "globex"}, "tenant_id", "cancel"),
             ("{not json", "message", None),
             ([1, 2], "message", None),
             (b"\x00binary", "message", None)]
    async with open_socket(mesh, session_id, query="after_sequence=3") as ws:
        error = await receive(ws)
        assert error["error"]["details"][0]["metadata"]["field"] == "after_sequence", error
        for message, field, about in cases:
            await ws.send(message if isinstance(message, bytes)
                          else message if isinstance(message, str) else json.dumps(message))
            error = await receive(ws)
            assert error["type"] == "error", (message, error)
            assert error["error"]["details"][0]["metadata"]["field"] == field, (message, error)
            assert field in error["error"]["message"], (message, error)
            assert error.get("for") == about, (message, error)
        await send(ws, type="ping")  # refusals leave the socket usable
        assert await receive(ws) == {"type": "pong"}
    async with open_socket(mesh, session_id, query="after_seq=-1") as ws:
        error = await receive(ws)
    assert error["error"]["details"][0]["metadata"]["field"] == "after_seq"
    # Only the run with a blank message got as far as the orchestrator, which named the field itself.
    assert [name for name, _ in mesh.agent.calls] == ["CreateSession", "Run"]


async def test_keepalive_pings_keep_a_quiet_peer_and_close_a_dead_one(wsmesh: WsMesh):
    async with httpx.AsyncClient(base_url=wsmesh.url, headers={"Authorization": f"Bearer {wsmesh.keys.acme}"},
                                 timeout=TIMEOUT_S) as http:
        session_id = await create_session(http)
    wsmesh.agent.step_s = 0.05
    async with open_socket(wsmesh, session_id) as ws:
        await asyncio.sleep(1.0)  # quiet for five ping intervals; the client library answers each ping
        await send(ws, type="run", user_message=" ".join(["word"] * 100))
        assert (await receive(ws))["event"]["seq"] == "1"
        # The peer stops reading (a dead network looks the same): no pong comes back.
        ws.transport.pause_reading()
        await asyncio.sleep(1.0)
        ws.transport.resume_reading()
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await receive(ws)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
    await open_sockets_drop_to(0)


async def test_a_slow_reader_is_held_back_not_dropped(keys: Keys, authenticator):
    async with ws_mesh(keys, authenticator, ws_send_queue=8) as mesh:
        await _read_slowly(mesh)


async def _read_slowly(mesh: WsMesh) -> None:
    mesh.agent.step_s = 0
    words = [f"{i:04d}" + "x" * 2000 for i in range(200)]
    async with httpx.AsyncClient(base_url=mesh.url, headers={"Authorization": f"Bearer {mesh.keys.acme}"},
                                 timeout=TIMEOUT_S) as http:
        session_id = await create_session(http)
    # A small receive buffer and no compression: the bytes pile up at the gateway, not in the kernel.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    host, port = httpx.URL(mesh.url).host, httpx.URL(mesh.url).port
    await asyncio.get_running_loop().sock_connect(sock, (host, port))
    async with open_socket(mesh, session_id, max_size=None, compression=None, sock=sock) as ws:
        await send(ws, type="run", user_message=" ".join(words))
        ws.transport.pause_reading()  # reads nothing while the run goes on
        await asyncio.sleep(0.5)
        ws.transport.resume_reading()
        messages = await receive_until(ws, ended)
    assert seqs_of(messages) == list(range(1, len(words) + 3))
    assert [e["token"]["text"] for e in events_of(messages)[1:-1]] == [w + " " for w in words]


# The socket's own logic, against an in-memory socket that can stop reading and an in-memory session log.

class StalledSocket:
    """Stands in for starlette's WebSocket; sending blocks until the client "reads"."""

    def __init__(self) -> None:
        self.path_params = {"session_id": "s1"}
        self.state = SimpleNamespace()
        self.query_params = QueryParams("")
        self.inbox: asyncio.Queue[dict] = asyncio.Queue()
        self.reading = asyncio.Event()
        self.sent: list[dict] = []

    async def accept(self) -> None:
        return None

    async def receive(self) -> dict:
        return await self.inbox.get()

    async def send_text(self, text: str) -> None:
        await self.reading.wait()
        self.sent.append(json.loads(text))

    async def close(self, code: int = 1000, reason: str = "") -> None:
        return None

    def client_sends(self, **message) -> None:
        self.inbox.put_nowait({"type": "websocket.receive", "text": json.dumps(message)})


class SessionLog:
    """Stands in for the orchestrator: ``stored`` past events; a run appends ``run_length`` more.

    A resume replays what is stored after its seq, then (``follow``) waits for more, as the real one does.
    """

    def __init__(self, stored: int, run_length: int = 10, follow: bool = False) -> None:
        self.seqs = list(range(1, stored + 1))
        self.run_length = run_length
        self.follow = follow
        self.grew = asyncio.Event()
        self.pulled = 0

    def open_stream(self, backend, method, request, metadata=()):
        if method.name == "Run":
            start = len(self.seqs) + 1
            self.seqs += range(start, start + self.run_length)
            self.grew.set()
            self.grew = asyncio.Event()
            return self._events(pb.RunResponse, start - 1, start - 1 + self.run_length, follow=False)
        return self._events(pb.ResumeResponse, request.after_seq, None, follow=self.follow)

    async def _events(self, reply, after: int, last: int | None, follow: bool):
        index = after
        while True:
            grew = self.grew
            while index < len(self.seqs) and (last is None or index < last):
                self.pulled += 1
                index += 1
                event = pb.AgentEvent(seq=index, type=pb.EVENT_TYPE_TOKEN, token=pb.TokenDelta(text=f"{index}"))
                yield reply(event=event)
            if not follow:
                return
            await grew.wait()


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)
    await asyncio.sleep(0.05)


async def test_a_client_that_does_not_read_stops_the_reading_of_the_stream():
    socket, log = StalledSocket(), SessionLog(stored=1000)
    served = asyncio.create_task(SessionSocket(socket, log, send_queue=4).serve())
    socket.client_sends(type="resume", after_seq=0)
    await settle()
    # The queue (4), the message the writer holds, the one waiting to be queued, and one being read: no more.
    assert log.pulled <= 7
    socket.reading.set()
    await _until(lambda: socket.sent and socket.sent[-1].get("type") == "end")
    assert seqs_of(socket.sent) == list(range(1, 1001))
    socket.inbox.put_nowait({"type": "websocket.disconnect", "code": 1000})
    await asyncio.wait_for(served, TIMEOUT_S)


async def test_a_run_that_replaces_an_unfinished_resume_misses_nothing_and_repeats_nothing():
    socket, log = StalledSocket(), SessionLog(stored=50)
    served = asyncio.create_task(SessionSocket(socket, log, send_queue=4).serve())
    socket.client_sends(type="resume", after_seq=10)
    await settle()  # the resume is held up after a few events: the client does not read
    socket.client_sends(type="run", id="go", user_message="next")
    await settle()
    socket.reading.set()
    await _until(lambda: any(m.get("type") == "end" for m in socket.sent))
    assert seqs_of(socket.sent) == list(range(11, 61))
    assert socket.sent[-1] == {"type": "end", "for": "run", "id": "go"}
    socket.inbox.put_nowait({"type": "websocket.disconnect", "code": 1000})
    await asyncio.wait_for(served, TIMEOUT_S)


async def test_a_run_on_a_socket_that_follows_live_sends_each_event_once():
    socket, log = StalledSocket(), SessionLog(stored=50, follow=True)
    socket.reading.set()
    served = asyncio.create_task(SessionSocket(socket, log, send_queue=4).serve())
    socket.client_sends(type="resume", after_seq=45)
    await _until(lambda: seqs_of(socket.sent)[-1:] == [50])
    # The resume sees the run's events too (it follows the session); the run's stream takes over from it.
    socket.client_sends(type="run", user_message="next")
    await _until(lambda: any(m.get("type") == "end" for m in socket.sent))
    assert seqs_of(socket.sent) == list(range(46, 61))
    assert [m for m in socket.sent if "event" not in m] == [{"type": "end", "for": "run"}]
    socket.inbox.put_nowait({"type": "websocket.disconnect", "code": 1000})
    await asyncio.wait_for(served, TIMEOUT_S)


async def _until(condition: Callable[[], object]) -> None:
    for _ in range(int(TIMEOUT_S / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    assert condition()
