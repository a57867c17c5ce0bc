"""Fakes for the REST layer tests: an in-memory AgentService and a text generator.

The fake orchestrator keeps the real contract's shape: a run appends events
to the session log whether or not anyone listens, Run and Resume follow that
log, and seqs are gapless per session.
"""
from __future__ import annotations

import asyncio
import hashlib
import itertools
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from google.protobuf import message_factory
from llmesh.orchestrator.v1 import orchestrator_pb2 as pb
from llmesh.orchestrator.v1 import orchestrator_pb2_grpc

from services.common import errors
from services.gateway.core.ports import (
    EmbeddingParams,
    EmbeddingResult,
    GenerationChunk,
    GenerationParams,
    TokenLogprob,
)

AGENT_SERVICE = "llmesh.orchestrator.v1.AgentService"


@dataclass
class FakeSession:
    session: pb.Session
    events: list[pb.AgentEvent] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    run_task: asyncio.Task | None = None
    done_run_ids: set[str] = field(default_factory=set)
    # Approvals a run waits for, by approval_id: SubmitApproval sets the decision.
    waiting: dict[str, asyncio.Future] = field(default_factory=dict)


class FakeAgentService(orchestrator_pb2_grpc.AgentServiceServicer):
    """Each run emits TURN_STARTED, one TOKEN per word of the message, FINAL; ``step_s`` apart.

    With ``approval_prefix`` set, a word that starts with it is a tool call
    that needs approval: APPROVAL_REQUIRED, then (once SubmitApproval decides)
    TOOL_RESULT, OK when approved and DENIED otherwise.
    """

    def __init__(self, step_s: float = 0.01, approval_prefix: str = "") -> None:
        self.step_s = step_s
        self.approval_prefix = approval_prefix
        self.sessions: dict[str, FakeSession] = {}
        self.calls: list[tuple[str, object]] = []
        self.approvals: list[pb.SubmitApprovalRequest] = []
        self._ids = itertools.count(1)

    def _session(self, tenant_id: str, session_id: str) -> FakeSession:
        found = self.sessions.get(session_id)
        if found is None or found.session.tenant_id != tenant_id:
            raise errors.NotFound(f"session {session_id!r} not found", reason="SESSION_NOT_FOUND")
        return found

    async def CreateSession(self, request, context):
        self.calls.append(("CreateSession", request))
        errors.require(bool(request.tenant_id), "tenant_id", "must not be empty")
        session_id = f"s{next(self._ids)}"
        session = pb.Session(session_id=session_id, tenant_id=request.tenant_id, title=request.title,
                             model=request.model or "gemma-3-270m", tools=request.tools)
        session.create_time.GetCurrentTime()
        self.sessions[session_id] = FakeSession(session)
        return pb.CreateSessionResponse(session=session)

    async def GetSession(self, request, context):
        self.calls.append(("GetSession", request))
        return pb.GetSessionResponse(session=self._session(request.tenant_id, request.session_id).session)

    async def ListSessions(self, request, context):
        self.calls.append(("ListSessions", request))
        errors.require(request.page_size >= 0, "page_size", "must be >= 0")
        mine = [s.session for s in self.sessions.values() if s.session.tenant_id == request.tenant_id]
        return pb.ListSessionsResponse(sessions=mine[: request.page_size or None])

    async def _append(self, state: FakeSession, run_id: str, type_: int, **body) -> None:
        async with state.changed:
            event = pb.AgentEvent(session_id=state.session.session_id, seq=len(state.events) + 1, run_id=run_id,
                                  type=type_, schema_version=1, **body)
            event.create_time.GetCurrentTime()
            state.events.append(event)
            state.session.last_seq = event.seq
            state.changed.notify_all()

    async def _run(self, state: FakeSession, run_id: str, message: str) -> None:
        try:
            await self._append(state, run_id, pb.EVENT_TYPE_TURN_STARTED,
                               turn_started=pb.TurnStarted(user_message=message, model=state.session.model))
            for word in message.split():
                await asyncio.sleep(self.step_s)
                if self.approval_prefix and word.startswith(self.approval_prefix):
                    await self._ask_approval(state, run_id, word[len(self.approval_prefix):])
                    continue
                await self._append(state, run_id, pb.EVENT_TYPE_TOKEN, token=pb.TokenDelta(text=word + " "))
            await self._append(state, run_id, pb.EVENT_TYPE_FINAL,
                               final=pb.Final(text=message, reason="stop", usage=pb.Usage(num_model_calls=1)))
        except asyncio.CancelledError:
            await self._append(state, run_id, pb.EVENT_TYPE_FINAL, final=pb.Final(reason="cancelled"))

    async def _ask_approval(self, state: FakeSession, run_id: str, tool: str) -> None:
        call_id, approval_id = f"call{next(self._ids)}", f"ap{next(self._ids)}"
        decided = asyncio.get_running_loop().create_future()
        state.waiting[approval_id] = decided
        await self._append(state, run_id, pb.EVENT_TYPE_APPROVAL_REQUIRED, approval_required=pb.ApprovalRequired(
            tool_call_id=call_id, approval_id=approval_id, name=tool, arguments_json="{}", justification="asks"))
        try:
            decision = await decided
        finally:
            state.waiting.pop(approval_id, None)
        approved = decision in (pb.APPROVAL_DECISION_APPROVE_ONCE, pb.APPROVAL_DECISION_APPROVE_SESSION)
        await self._append(state, run_id, pb.EVENT_TYPE_TOOL_RESULT, tool_result=pb.ToolResultEvent(
            tool_call_id=call_id, name=tool, status="TOOL_STATUS_OK" if approved else "TOOL_STATUS_DENIED",
            output=f"ran {tool}" if approved else ""))

    async def _follow(self, state: FakeSession, after_seq: int) -> AsyncIterator[pb.AgentEvent]:
        """Stored events after ``after_seq``, then live ones, until the run that is current ends."""
        next_index = after_seq
        while True:
            async with state.changed:
                await state.changed.wait_for(
                    lambda seen=next_index: len(state.events) > seen or state.run_task is None
                    or state.run_task.done())
                fresh = state.events[next_index:]
            for event in fresh:
                next_index += 1
                yield event
            if not fresh and (state.run_task is None or state.run_task.done()):
                return

    async def Run(self, request, context):
        self.calls.append(("Run", request))
        state = self._session(request.tenant_id, request.session_id)
        errors.require(bool(request.user_message.strip()), "user_message", "must not be empty")
        if state.run_task is not None and not state.run_task.done():
            raise errors.FailedPrecondition("a run is already active", reason="RUN_ACTIVE")
        start = len(state.events)
        run_id = f"r{next(self._ids)}"
        state.run_task = asyncio.get_running_loop().create_task(self._run(state, run_id, request.user_message))
        async for event in self._follow(state, start):
            yield pb.RunResponse(event=event)

    async def Resume(self, request, context):
        self.calls.append(("Resume", request))
        state = self._session(request.tenant_id, request.session_id)
        errors.require(request.after_seq >= 0, "after_seq", "must be >= 0")
        async for event in self._follow(state, request.after_seq):
            yield pb.ResumeResponse(event=event)

    async def Cancel(self, request, context):
        self.calls.append(("Cancel", request))
        state = self._session(request.tenant_id, request.session_id)
        active = state.run_task is not None and not state.run_task.done()
        if active:
            state.run_task.cancel()
        return pb.CancelResponse(cancelled=active)

    async def SubmitApproval(self, request, context):
        self.calls.append(("SubmitApproval", request))
        state = self._session(request.tenant_id, request.session_id)
        errors.require(request.decision != pb.APPROVAL_DECISION_UNSPECIFIED, "decision", "must be set")
        self.approvals.append(request)
        waiting = state.waiting.get(request.approval_id)
        if waiting is not None and not waiting.done():
            waiting.set_result(request.decision)
        return pb.SubmitApprovalResponse(accepted=True)


class FakeAgentApp:
    service_names = (AGENT_SERVICE,)

    def __init__(self, service: FakeAgentService | None = None) -> None:
        self.service = service or FakeAgentService()

    def register(self, server: grpc.aio.Server) -> None:
        orchestrator_pb2_grpc.add_AgentServiceServicer_to_server(self.service, server)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        for state in self.service.sessions.values():
            if state.run_task is not None:
                state.run_task.cancel()


class EmptyReplyApp:
    """Answers every RPC of the given services with an empty reply (one message for streams).

    For fuzzing the REST layer itself: what the backend says is beside the point.
    """

    def __init__(self, services) -> None:
        self.services = list(services)
        self.service_names = tuple(s.full_name for s in self.services)
        self.num_calls = 0

    def register(self, server: grpc.aio.Server) -> None:
        for service in self.services:
            handlers = {}
            for method in service.methods:
                reply_class = message_factory.GetMessageClass(method.output_type)
                request_class = message_factory.GetMessageClass(method.input_type)
                handlers[method.name] = self._handler(method.server_streaming, request_class, reply_class)
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))

    def _handler(self, streaming: bool, request_class, reply_class):
        async def unary(request, context):
            self.num_calls += 1
            return reply_class()

        async def stream(request, context):
            self.num_calls += 1
            yield reply_class()

        build = grpc.unary_stream_rpc_method_handler if streaming else grpc.unary_unary_rpc_method_handler
        return build(stream if streaming else unary, request_deserializer=request_class.FromString,
                     response_serializer=reply_class.SerializeToString)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


class ScriptedGenerator:
    """A TextGenerator that answers with fixed text in a few chunks and records what it was asked."""

    def __init__(self, text: str = "Hello from llmesh", models: tuple[str, ...] = ("gemma-3-270m",)) -> None:
        self.text = text
        self.models = models
        self.requests: list[GenerationParams] = []
        # The model the last chunk names as having answered ("" names none).
        self.answered_by = ""
        self.embed_requests: list[EmbeddingParams] = []

    async def generate(self, params: GenerationParams) -> AsyncIterator[GenerationChunk]:
        self.requests.append(params)
        words = self.text.split(" ")
        # Several choices interleave word by word, as a node's parallel sequences do.
        steps = [(i, word, choice) for i, word in enumerate(words) for choice in range(params.n)]
        for i, word, choice in steps:
            last = i == len(words) - 1
            text = word if i == 0 else " " + word
            # One token per word; with logprobs, word i has log-probability -i/10 and rivals "<i>a", "<i>b".
            tokens = (TokenLogprob(text.encode(), -i / 10,
                                   tuple((f"{i}{c}".encode(), -1.0 - j) for j, c in enumerate("ab"))
                                   [:params.top_logprobs]),) if params.logprobs else ()
            yield GenerationChunk(text=text, finish_reason="stop" if last else None,
                                  prompt_tokens=len(params.prompt) // 4 if last else 0,
                                  generated_tokens=len(words) if last else 0,
                                  model=self.answered_by if last else "", tokens=tokens, index=choice)

    async def list_models(self) -> list[str]:
        return list(self.models)

    async def embed(self, params: EmbeddingParams) -> EmbeddingResult:
        """Like a node's Embed: a vector per text (a hash of it), refusals naming the node's field names.

        A text containing ``TOO LONG`` stands for one over the node's token limit.
        """
        self.embed_requests.append(params)
        errors.require(params.dimensions in (0, EMBED_DIM), "dimensions",
                       f"this model's embeddings have {EMBED_DIM} dimensions")
        for i, text in enumerate(params.inputs):
            errors.require("TOO LONG" not in text, f"inputs[{i}]", "more tokens than one input may take")
        return EmbeddingResult(tuple(fake_vector(text) for text in params.inputs),
                               sum(len(text.split()) for text in params.inputs), params.model or self.models[0])


EMBED_DIM = 8


def fake_vector(text: str) -> tuple[float, ...]:
    """A unit vector that depends on the text only."""
    raw = [b - 127.5 for b in hashlib.sha256(text.encode()).digest()[:EMBED_DIM]]
    norm = math.sqrt(sum(v * v for v in raw))
    return tuple(v / norm for v in raw)
