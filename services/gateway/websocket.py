"""The agent surface over one WebSocket per session: ``GET /v1/sessions/{session_id}/ws``.

The client sends JSON messages (``core/ws_messages.py``): ``run``,
``resume``, ``cancel``, ``approve`` and ``ping``; the server sends each
event of the session as the SSE stream's data for it (the RunResponse or
ResumeResponse in proto JSON, ``{"event": {..., "seq": "7"}}``), and
``ack``, ``end``, ``pong`` and ``error`` messages (with a ``type``) that
answer the client's. Every call goes to the orchestrator through the
gateway's channel, as the client's principal (the middleware authenticated
the socket and set it), exactly as the REST routes call.

A socket streams at most one event stream at a time: a run's (until its
final event) or a resume's (the orchestrator's Resume: the events after
``after_seq``, then live ones). Every event passes the socket's outbox
(``core/outbox.py``): a bounded queue, so a client that does not read stops
the reading of the gRPC stream instead of growing a buffer, and a seq
cursor, so no event is sent twice on one socket and none is skipped when a
run replaces a resume that had not caught up.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from llmesh.orchestrator.v1 import orchestrator_pb2 as pb
from prometheus_client import Gauge
from starlette.websockets import WebSocket, WebSocketDisconnect

from services.common import authz, errors
from services.common.auth import Principal
from services.gateway import convert
from services.gateway.adapters.grpc_backend import GrpcBackends
from services.gateway.core import streaming
from services.gateway.core.outbox import Outbox
from services.gateway.core.ws_messages import ClientMessage, parse_client_message, refuse_fields
from services.gateway.http_errors import error_payload

log = logging.getLogger("llmesh.gateway")

BACKEND = "orchestrator"
_AGENT = pb.DESCRIPTOR.services_by_name["AgentService"]
RUN = _AGENT.methods_by_name["Run"]
RESUME = _AGENT.methods_by_name["Resume"]
CANCEL = _AGENT.methods_by_name["Cancel"]
SUBMIT_APPROVAL = _AGENT.methods_by_name["SubmitApproval"]
# Query parameters of the upgrade request.
QUERY_FIELDS = ("after_seq",)
# Requests of one socket in flight at once; the next message is read when one ends.
MAX_COMMANDS = 16

WS_CONNECTIONS = Gauge("llmesh_ws_connections", "Open WebSocket connections of the agent surface.")


class SessionSockets:
    """The endpoint: one SessionSocket per connection."""

    def __init__(self, backends: GrpcBackends, send_queue: int = 64) -> None:
        self.backends = backends
        self.send_queue = send_queue

    async def endpoint(self, websocket: WebSocket) -> None:
        await SessionSocket(websocket, self.backends, self.send_queue).serve()


class SessionSocket:
    def __init__(self, websocket: WebSocket, backends: GrpcBackends, send_queue: int) -> None:
        self.ws = websocket
        self.backends = backends
        self.session_id: str = websocket.path_params["session_id"]
        self.principal: Principal | None = getattr(websocket.state, "principal", None)
        self.outbox = Outbox(send_queue)
        self._stream: asyncio.Task[None] | None = None
        self._stream_lock = asyncio.Lock()
        self._slots = asyncio.Semaphore(MAX_COMMANDS)
        self._commands: set[asyncio.Task[None]] = set()

    async def serve(self) -> None:
        await self.ws.accept()
        WS_CONNECTIONS.inc()
        writer = asyncio.create_task(self.outbox.drain(self.ws.send_text))
        reader = asyncio.create_task(self._read())
        try:
            await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
            failure = _failure(reader) or _failure(writer)
            if failure is not None:
                log.error("WebSocket of session %s failed", self.session_id, exc_info=failure)
                # 1011: the server met a condition it cannot go on from.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.ws.close(1011, "internal error"), 1)
        finally:
            WS_CONNECTIONS.dec()
            tasks = [reader, writer, *self._commands, *([self._stream] if self._stream is not None else [])]
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)

    async def _read(self) -> None:
        """Client messages, in order, until the client goes; each is answered or started before the next is read."""
        await self._resume_from_query()
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            try:
                command = parse_client_message(message)
            except errors.DomainError as exc:
                await self._reply_error(exc)
                continue
            try:
                await self._dispatch(command)
            except errors.DomainError as exc:
                await self._reply_error(exc, command)

    async def _resume_from_query(self) -> None:
        """``?after_seq=N`` on the upgrade request: a resume message sent with the connection."""
        items = self.ws.query_params.multi_items()
        try:
            for key, _value in items:
                errors.require(key in QUERY_FIELDS, key,
                               f"not a query parameter of this endpoint (parameters: {', '.join(QUERY_FIELDS)})")
            values = [value for key, value in items if key == "after_seq"]
            if not values:
                return
            errors.require(len(values) == 1, "after_seq", "given more than once")
            after_seq = _parse_seq(values[0])
        except errors.DomainError as exc:
            await self._reply_error(exc)
            return
        command = ClientMessage("resume", None, {"after_seq": after_seq})
        try:
            await self._dispatch(command)
        except errors.DomainError as exc:
            await self._reply_error(exc, command)

    async def _dispatch(self, command: ClientMessage) -> None:
        if command.type == "ping":
            refuse_fields(command)
            await self.outbox.put({"type": "pong", **command.with_id()})
        elif command.type == "run":
            run = self._request(command, pb.RunRequest())
            await self._spawn(command, self._run, run)
        elif command.type == "resume":
            resume = self._request(command, pb.ResumeRequest())
            await self._spawn(command, self._resume, resume)
        elif command.type == "cancel":
            cancel = self._request(command, pb.CancelRequest())
            await self._spawn(command, self._unary, CANCEL, cancel)
        elif command.type == "approve":
            approval = self._request(command, pb.SubmitApprovalRequest())
            errors.require(bool(approval.approval_id), "approval_id", "must not be empty")
            await self._spawn(command, self._unary, SUBMIT_APPROVAL, approval)
        else:  # parse_client_message lets through only the types above
            raise AssertionError(command.type)

    def _request(self, command: ClientMessage, request: Any) -> Any:
        """The orchestrator request a message stands for: its fields, this socket's session, the key's tenant."""
        convert.merge_json_object(command.fields, request, source="message")
        errors.require(request.session_id in ("", self.session_id), "session_id",
                       "is the session of the URL; leave it out or name the same one")
        request.session_id = self.session_id
        if self.principal is not None:
            authz.bind_request(request, self.principal)
        return request

    async def _spawn(self, command: ClientMessage, handler: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Run ``handler`` beside the reader (a slow call must not hold up a cancel); at most MAX_COMMANDS at once."""
        await self._slots.acquire()

        async def guarded() -> None:
            try:
                await handler(*args, command)
            except Exception as exc:  # DomainErrors are the client's answer; anything else is logged there too
                await self._reply_error(exc, command)
            finally:
                self._slots.release()

        task = asyncio.create_task(guarded())
        self._commands.add(task)
        task.add_done_callback(self._commands.discard)

    async def _unary(self, method: Any, request: Any, command: ClientMessage) -> None:
        # Shielded: a cancel or an approval the client sent is carried out even if the socket closes meanwhile.
        reply = await asyncio.shield(_detach(self.backends.call(BACKEND, method, request)))
        await self.outbox.put({"type": "ack", "for": command.type, **command.with_id(),
                               "reply": convert.message_to_json(reply)})

    async def _run(self, request: pb.RunRequest, command: ClientMessage) -> None:
        """Start a run; once it has started, its stream replaces the socket's current one."""
        async with self._stream_lock:
            replies = self.backends.open_stream(BACKEND, RUN, request)
            started = _detach(_first(replies))
            try:
                # Refused (e.g. RUN_ACTIVE): the error is the answer, and the socket's current stream goes on.
                first = await asyncio.shield(started)
            except asyncio.CancelledError:
                # The socket closed: the run was asked for and goes on without it (Resume finds it);
                # only its stream is let go, once the call is under way.
                started.add_done_callback(lambda _started: _detach(_let_go(_started, replies)))
                raise
            await self._stop_stream()
            if first is not None:
                await self._catch_up(first.event.seq, request.tenant_id)
            self._stream = asyncio.create_task(self._forward(command, replies, first))

    async def _resume(self, request: pb.ResumeRequest, command: ClientMessage) -> None:
        async with self._stream_lock:
            if self._stream is not None and not self._stream.done():
                raise errors.FailedPrecondition(
                    "type: this socket streams the session's events already; a resume starts where that stream "
                    "ends, or on a new connection with after_seq", reason="STREAM_ACTIVE", field="type")
            # Not prefetched: a resume of a quiet session may wait for its first event for as long as it likes.
            self.outbox.cursor = request.after_seq
            replies = self.backends.open_stream(BACKEND, RESUME, request)
            self._stream = asyncio.create_task(self._forward(command, replies))

    async def _forward(self, command: ClientMessage, replies: AsyncGenerator[Any, None], first: Any = None) -> None:
        """The stream's events into the outbox (waiting while it is full), then an ``end`` or ``error`` message."""
        try:
            if first is not None:
                await self._deliver(first)
            async for reply in replies:
                await self._deliver(reply)
            await self.outbox.put({"type": "end", "for": command.type, **command.with_id()})
        except Exception as exc:
            await self._reply_error(exc, command)
        finally:
            await replies.aclose()

    async def _catch_up(self, next_seq: int, tenant_id: str) -> None:
        """Events this socket was owed before ``next_seq`` (a stream it stopped had not sent them yet), from Resume."""
        cursor = self.outbox.cursor
        if cursor is None or next_seq <= cursor + 1:
            return
        replay = self.backends.open_stream(BACKEND, RESUME, pb.ResumeRequest(
            tenant_id=tenant_id, session_id=self.session_id, after_seq=cursor))
        try:
            async for reply in replay:
                if reply.event.seq >= next_seq:
                    break
                await self._deliver(reply)
        finally:
            await replay.aclose()

    async def _deliver(self, reply: Any) -> None:
        await self.outbox.put_event(reply.event.seq, convert.message_to_json(reply))

    async def _stop_stream(self) -> None:
        task, self._stream = self._stream, None
        if task is not None and not task.done():
            task.cancel()
            # wait(), not await: the stream's cancellation must not be mistaken for this task's own.
            await asyncio.wait({task})

    async def _reply_error(self, exc: BaseException, command: ClientMessage | None = None) -> None:
        about = {"for": command.type, **command.with_id()} if command is not None else {}
        await self.outbox.put({"type": "error", **about, **error_payload(exc)})


# Calls that outlive the socket that made them; held here so that they are not collected midway.
_BACKGROUND: set[asyncio.Task[Any]] = set()


def _detach(awaitable: Awaitable[Any]) -> asyncio.Task[Any]:
    task = asyncio.ensure_future(awaitable)
    _BACKGROUND.add(task)
    task.add_done_callback(_finished)
    return task


def _finished(task: asyncio.Task[Any]) -> None:
    _BACKGROUND.discard(task)
    # Whoever awaited it has its outcome; with the socket gone, nobody does: note it, unraised.
    if not task.cancelled() and task.exception() is not None:
        log.debug("a call of a closed WebSocket failed: %s", task.exception())


async def _first(replies: AsyncGenerator[Any, None]) -> Any:
    """The first message of a stream (None if it has none); the stream is closed if that fails."""
    try:
        return await anext(replies)
    except StopAsyncIteration:
        return None
    except BaseException:
        await replies.aclose()
        raise


async def _let_go(started: asyncio.Task[Any], replies: AsyncGenerator[Any, None]) -> None:
    if not started.cancelled() and started.exception() is None:
        await replies.aclose()


def _parse_seq(raw: str) -> int:
    try:
        seq = streaming.parse_last_event_id(raw)
    except ValueError:
        seq = None
    errors.require(seq is not None, "after_seq",
                   f"must be an event seq between 0 and {streaming.MAX_EVENT_SEQ}, got {raw[:40]!r}")
    assert seq is not None
    return seq


def _failure(task: asyncio.Task[None]) -> BaseException | None:
    """What ended ``task`` if it was not the client going away."""
    if not task.done() or task.cancelled():
        return None
    exc = task.exception()
    return None if exc is None or isinstance(exc, (WebSocketDisconnect, OSError)) else exc
