"""RunManager: starts runs, keeps one active run per session, cancels by token.

One run per session holds on this replica (a dict) and across replicas (the
store's leased session lock, renewed while the run lives). A run is an
asyncio task of its own: the client that started it only follows its events,
so a disconnect does not stop it. Cancel fires the run's token, which
cancels the task where it waits (inference stream, tools, approval).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from services.common.errors import DomainError, FailedPrecondition, NotFound, ResourceExhausted, Unavailable, require
from services.orchestrator.core import events as ev
from services.orchestrator.core.agent import AgentLoop, RunResult, RunSpec
from services.orchestrator.core.cancel import CancelToken
from services.orchestrator.core.context import ContextManager, MessageLog
from services.orchestrator.core.event_hub import EventHub, RunStream
from services.orchestrator.core.history import system_item
from services.orchestrator.core.ports import InferencePort, StorePort, ToolSpec, ToolsPort
from services.orchestrator.core.prompt import PromptPipeline
from services.orchestrator.core.rate_limit import RateLimiter
from services.orchestrator.core.sessions import AgentSession, SessionDirectory
from services.orchestrator.core.tool_format import describe_tools
from services.orchestrator.core.tool_runner import RunAborted

log = logging.getLogger("llmesh.orchestrator.runs")

TOOL_CHOICES = ("", "auto", "required", "none")
MAX_CACHED_CONTEXTS = 256
# Earlier runs of a session whose tails may still be on their way to the store
# when a new run starts; past this a new run waits, so a slow store slows turns.
MAX_UNSTORED_RUNS = 2


@dataclass(frozen=True)
class RunLimits:
    default_max_steps: int = 8
    max_max_steps: int = 32
    default_max_tokens: int = 256
    max_max_tokens: int = 4096
    context_fraction: float = 0.8
    max_active_runs: int = 64
    lock_lease_ms: int = 30_000


@dataclass(eq=False)
class ActiveRun:
    spec: RunSpec
    first_seq: int
    token: CancelToken
    result: RunResult = field(default_factory=RunResult)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None
    # Set once the final or error event is published.
    finishing: bool = False
    # The session's next event seq from the lock grant (0 = the store did not say).
    granted_next_seq: int = 0
    # The run's message writes; the final event's store write waits for them.
    message_writes: asyncio.Future | None = None
    # Owner of the session's store lock; a next run on this replica inherits it.
    lock_owner: str = ""
    stream: RunStream | None = None
    # Set when the next run of the session took over the lock and the event stream.
    handed_over: bool = False
    releasing: bool = False
    # Took over from the session's previous run on this replica (see _can_take_over).
    took_over: bool = False


class _StoreMessageLog(MessageLog):
    def __init__(self, store: StorePort, tenant_id: str, session_id: str, run_id: str) -> None:
        self._store, self._tenant_id, self._session_id, self._run_id = store, tenant_id, session_id, run_id
        self._num_appends = 0

    async def append(self, records):
        self._num_appends += 1
        return await self._store.append_messages(request_id=f"{self._run_id}:m{self._num_appends}",
                                                 tenant_id=self._tenant_id, session_id=self._session_id,
                                                 messages=list(records))


class RunManager:
    def __init__(self, *, store: StorePort, inference: InferencePort, tools: ToolsPort, hub: EventHub,
                 agent: AgentLoop, sessions: SessionDirectory, limiter: RateLimiter, limits: RunLimits,
                 replica_id: str, tool_cache_s: float = 30.0, clock: Callable[[], float] | None = None) -> None:
        self._store, self._inference, self._tools, self._hub = store, inference, tools, hub
        self._agent, self.sessions, self._limiter, self._limits = agent, sessions, limiter, limits
        self._replica_id = replica_id
        self._active: dict[str, ActiveRun | None] = {}
        # Runs whose task has not ended, including ones still writing a handed-over tail.
        self._unfinished: set[ActiveRun] = set()
        self._by_request: OrderedDict[str, ActiveRun] = OrderedDict()
        self._pipelines: dict[str, PromptPipeline] = {}
        self._contexts: OrderedDict[str, ContextManager] = OrderedDict()
        self._n_ctx: dict[str, int] = {}
        self._tool_specs: list[ToolSpec] | None = None
        self._tool_specs_at = 0.0
        self._tool_cache_s = tool_cache_s
        self._clock = clock or time.monotonic

    @property
    def num_active(self) -> int:
        return len(self._active)

    def active_run(self, session_id: str) -> ActiveRun | None:
        return self._active.get(session_id)

    async def start(self, *, request_id: str, tenant_id: str, session_id: str, user_message: str,
                    max_steps: int = 0, max_tokens: int = 0, temperature: float = 0.0, seed: int | None = None,
                    priority: int = 0, tool_choice: str = "") -> ActiveRun:
        require(bool(user_message.strip()), "user_message", "must not be empty")
        require(0 <= max_steps <= self._limits.max_max_steps, "options.max_steps",
                f"must be between 0 and {self._limits.max_max_steps}")
        require(0 <= max_tokens <= self._limits.max_max_tokens, "options.max_tokens",
                f"must be between 0 and {self._limits.max_max_tokens}")
        require(0.0 <= temperature <= 2.0, "options.temperature", "must be between 0 and 2")
        require(tool_choice in TOOL_CHOICES, "options.tool_choice", "must be auto, required or none")
        key = f"{tenant_id}:{request_id}" if request_id else ""
        if key and key in self._by_request:
            return self._by_request[key]  # a retried Run joins the run it started
        session = await self.sessions.get(tenant_id, session_id)
        previous = self._active.get(session_id)
        handoff = previous if previous is not None and self._can_take_over(previous) else None
        if previous is not None and previous.finishing and handoff is None:
            # Its last event is out and it is only flushing and unlocking: a client that
            # starts the next turn on seeing that event waits for it instead of failing.
            await previous.done.wait()
        if session_id in self._active and handoff is None:
            raise FailedPrecondition(f"session {session_id!r} already has an active run", reason="SESSION_BUSY",
                                     field="session_id")
        if len(self._active) >= self._limits.max_active_runs:
            raise ResourceExhausted("this replica runs as many turns as it may", reason="TOO_MANY_RUNS",
                                    retry_after_ms=500)
        self._limiter.admit(tenant_id, session.model)
        run_id = uuid.uuid4().hex
        spec = RunSpec(tenant_id=tenant_id, session_id=session_id, run_id=run_id, user_message=user_message,
                       model=session.model, max_steps=max_steps or self._limits.default_max_steps,
                       max_tokens=max_tokens or self._limits.default_max_tokens, temperature=temperature,
                       seed=seed, priority=priority, tool_choice=tool_choice or "auto")
        lock_owner = run_id
        if handoff is not None:
            # The previous run's last event is out and it only writes its tail: keep
            # its lock (same owner renews) and continue its seqs, no store round trip.
            handoff.handed_over = True
            lock_owner, next_seq = handoff.lock_owner, handoff.stream.next_seq
        self._active[session_id] = None  # reserved while we take the lock
        try:
            if handoff is None:
                grant = await self._store.acquire_session_lock(tenant_id=tenant_id, session_id=session_id,
                                                               owner_id=lock_owner,
                                                               lease_ms=self._limits.lock_lease_ms)
                if not grant.acquired:
                    raise FailedPrecondition(f"session {session_id!r} has an active run on another replica",
                                             reason="SESSION_BUSY", field="session_id")
                next_seq = grant.next_event_seq
            try:
                stream, first = await self._hub.open_run(ev.AgentEvent(
                    session_id=session_id, run_id=run_id, type=ev.TURN_STARTED,
                    body={"user_message": user_message, "model": session.model}), tenant_id,
                    next_seq=next_seq, after=handoff.stream if handoff is not None else None)
            except BaseException:
                await self._release_lock(spec, lock_owner)
                raise
        except BaseException:
            self._active.pop(session_id, None)
            raise
        run = ActiveRun(spec=spec, first_seq=first.seq, token=CancelToken(), granted_next_seq=next_seq,
                        lock_owner=lock_owner, stream=stream, took_over=handoff is not None)
        self._active[session_id] = run
        self._unfinished.add(run)
        if key:
            self._by_request[key] = run
            while len(self._by_request) > 1024:
                self._by_request.popitem(last=False)
        run.task = asyncio.create_task(self._drive(run, session, stream), name=f"run-{run_id}")
        return run

    async def cancel(self, tenant_id: str, session_id: str, run_id: str = "") -> bool:
        await self.sessions.get(tenant_id, session_id)
        run = self._active.get(session_id)
        if run is None or (run_id and run.spec.run_id != run_id):
            return False
        return run.token.cancel("cancelled by request")

    async def close(self) -> None:
        runs = list(self._unfinished)
        for run in runs:
            run.token.cancel("server shutting down")
        for run in runs:
            await run.done.wait()

    @staticmethod
    def _can_take_over(previous: ActiveRun) -> bool:
        """Whether a new run may inherit this finishing run's lock and event stream."""
        return (previous.finishing and not previous.releasing and not previous.handed_over
                and previous.stream is not None and previous.stream.num_predecessors + 1 <= MAX_UNSTORED_RUNS
                and previous.token.reason != "lock lost")

    # ---- the run itself ------------------------------------------------------------------------
    async def _drive(self, run: ActiveRun, session: AgentSession, stream: RunStream) -> None:
        spec = run.spec

        def emit(type_: str, body: dict) -> ev.AgentEvent:
            return self._hub.publish(stream, ev.AgentEvent(spec.session_id, spec.run_id, type_, body))

        inner = asyncio.create_task(self._execute(run, session, emit))
        run.token.on_cancel(inner.cancel)
        renew = asyncio.create_task(self._keep_lock(run))
        try:
            try:
                await inner
                if run.message_writes is not None:
                    self._hub.hold_terminal(stream, run.message_writes)
                emit(ev.FINAL, {"text": run.result.text, "reason": run.result.reason,
                                "usage": run.result.usage.as_dict()})
            except asyncio.CancelledError:
                if not run.token.cancelled:
                    raise
                reason = "cancelled" if run.token.reason != "lock lost" else "aborted"
                run.result.reason = reason
                emit(ev.FINAL, {"text": run.result.text, "reason": reason, "usage": run.result.usage.as_dict()})
            except RunAborted as exc:
                run.result.reason = "aborted"
                emit(ev.FINAL, {"text": exc.message, "reason": "aborted", "usage": run.result.usage.as_dict()})
            except DomainError as exc:
                run.result.error_reason = exc.reason
                emit(ev.ERROR, {"reason": exc.reason, "message": exc.message,
                                "retryable": isinstance(exc, (Unavailable, ResourceExhausted))})
            except Exception as exc:  # noqa: BLE001 - the session must stay usable
                log.exception("run failed", extra={"session_id": spec.session_id, "run_id": spec.run_id})
                run.result.error_reason = "INTERNAL"
                emit(ev.ERROR, {"reason": "INTERNAL", "message": type(exc).__name__, "retryable": False})
        finally:
            run.finishing = True
            renew.cancel()
            try:
                await self._hub.close_run(stream)
                if not run.handed_over:
                    self._note_context_current(run, stream)
            finally:
                if not run.handed_over:
                    run.releasing = True
                    await self._release_lock(spec, run.lock_owner)
                if self._active.get(spec.session_id) is run:
                    del self._active[spec.session_id]
                self._unfinished.discard(run)
                run.done.set()

    async def _execute(self, run: ActiveRun, session: AgentSession, emit) -> None:
        spec = run.spec
        tools = await self._session_tools(session)
        pipeline = self._pipelines.setdefault(spec.model, PromptPipeline(self._inference, model=spec.model))
        n_ctx = self._n_ctx.get(spec.model) or await self._inference.context_size(spec.model)
        self._n_ctx[spec.model] = n_ctx
        context = await self._context(spec, session, pipeline, n_ctx, tools, run.granted_next_seq,
                                      took_over=run.took_over)
        try:
            await self._agent.run(spec, context, tools, emit, run.result)
            # Off the turn's critical path: the final event goes out at once and
            # its store write waits for these (EventHub.hold_terminal).
            run.message_writes = context.pending_writes()
        except BaseException:
            # Memory may now hold items the store has not: rebuild from the store next time.
            self._contexts.pop(spec.session_id, None)
            with contextlib.suppress(Exception):
                await asyncio.shield(context.flush())
            raise

    async def _context(self, spec: RunSpec, session: AgentSession, pipeline: PromptPipeline, n_ctx: int,
                       tools: list[ToolSpec], granted_next_seq: int, took_over: bool = False) -> ContextManager:
        """The session's context, kept between runs; rebuilt when the store has news for it."""
        system = system_item(session.system_prompt, describe_tools(tools))
        context = self._contexts.pop(spec.session_id, None)
        # This run's first event took the seq our last run left next, so no other
        # replica ran a turn since: the cached context is current without asking.
        # A run that took over from this replica's previous one needs no check either.
        known_current = context is not None and (
            took_over or context.current_at_event_seq == granted_next_seq - 1 > 0)
        if context is not None and context.pipeline is pipeline and context.n_ctx == n_ctx:
            newer = [] if known_current else await self._store.list_messages(
                tenant_id=spec.tenant_id, session_id=spec.session_id, after_position=context.last_position)
            if newer:  # another replica ran a turn here since
                context = None
        else:
            context = None
        if context is None:
            context = ContextManager(pipeline, n_ctx=n_ctx, fraction=self._limits.context_fraction, system=system)
            context.restore(await self._store.list_messages(tenant_id=spec.tenant_id, session_id=spec.session_id,
                                                            after_position=0))
        context.system = system
        context.current_at_event_seq = 0  # until this run has stored everything it adds
        context.message_log = _StoreMessageLog(self._store, spec.tenant_id, spec.session_id, spec.run_id)
        context.summarizer = self._agent.make_summarizer(pipeline, n_ctx, spec)
        self._contexts[spec.session_id] = context
        while len(self._contexts) > MAX_CACHED_CONTEXTS:
            self._contexts.popitem(last=False)
        return context

    def _note_context_current(self, run: ActiveRun, stream: RunStream) -> None:
        """Remember up to which event seq the cached context matches the store."""
        context = self._contexts.get(run.spec.session_id)
        writes = run.message_writes
        if context is None or writes is None or not writes.done() or writes.cancelled():
            return
        if writes.exception() is not None:
            # The store may lack some of this turn's messages: rebuild from it next time.
            self._contexts.pop(run.spec.session_id, None)
            return
        if run.granted_next_seq > 0:
            # The next run's grant names last_seq + 1 unless another replica wrote since.
            context.current_at_event_seq = stream.last_seq

    async def _session_tools(self, session: AgentSession) -> list[ToolSpec]:
        now = self._clock()
        if self._tool_specs is None or now - self._tool_specs_at > self._tool_cache_s:
            self._tool_specs = await self._tools.list_tools()
            self._tool_specs_at = now
        if not session.tools:
            return list(self._tool_specs)
        known = {t.name: t for t in self._tool_specs}
        missing = [name for name in session.tools if name not in known]
        if missing:
            raise NotFound(f"tools not registered: {', '.join(missing)}", reason="TOOL_NOT_FOUND")
        return [known[name] for name in session.tools]

    async def _keep_lock(self, run: ActiveRun) -> None:
        spec = run.spec
        interval = self._limits.lock_lease_ms / 3000.0
        while True:
            await asyncio.sleep(interval)
            try:
                held = await self._store.acquire_session_lock(tenant_id=spec.tenant_id, session_id=spec.session_id,
                                                              owner_id=run.lock_owner,
                                                              lease_ms=self._limits.lock_lease_ms)
            except Unavailable:
                continue  # the lease outlives a few missed renewals
            if not held.acquired:
                log.error("session lock lost", extra={"session_id": spec.session_id, "run_id": spec.run_id})
                run.token.cancel("lock lost")
                return

    async def _release_lock(self, spec: RunSpec, owner_id: str) -> None:
        try:
            await self._store.release_session_lock(tenant_id=spec.tenant_id, session_id=spec.session_id,
                                                   owner_id=owner_id)
        except DomainError:
            log.warning("session lock not released; it will expire", extra={"session_id": spec.session_id})
