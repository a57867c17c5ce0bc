"""RunManager: starts runs, keeps one active run per session, cancels by token.

One run per session holds on this replica (a dict) and across replicas (the
store's leased session lock, renewed while the run lives; every append of the
run carries the lock's fencing token, and a refused append stops the run at
once). A run is an asyncio task of its own: the client that started it only
follows its events, so a disconnect does not stop it. Cancel fires the run's
token, which cancels the task where it waits (inference stream, tools,
approval); a Cancel received by another replica reaches it as a session
control (core/controls.py).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from services.common.errors import DomainError, FailedPrecondition, NotFound, ResourceExhausted, Unavailable, require
from services.orchestrator.core import events as ev
from services.orchestrator.core.agent import AgentLoop, RunResult, RunSpec
from services.orchestrator.core.cancel import CancelToken
from services.orchestrator.core.context import ContextManager, MessageLog
from services.orchestrator.core.event_hub import EventHub, RunStream
from services.orchestrator.core.history import system_item
from services.orchestrator.core.lock_lease import LockLease, write_fenced
from services.orchestrator.core.ports import InferencePort, SessionControl, StorePort, ToolSpec, ToolsPort
from services.orchestrator.core.prompt import PromptPipeline
from services.orchestrator.core.rate_limit import RateLimiter
from services.orchestrator.core.recovery import DeadRunRecovery, is_checker
from services.orchestrator.core.run_phase import RunPhase
from services.orchestrator.core.sessions import AgentSession, SessionDirectory
from services.orchestrator.core.signals import NO_SIGNALS, Signals
from services.orchestrator.core.tool_format import describe_tools
from services.orchestrator.core.tool_runner import RunAborted

log = logging.getLogger("llmesh.orchestrator.runs")

TOOL_CHOICES = ("", "auto", "required", "none")
MAX_CACHED_CONTEXTS = 256
# Earlier runs of a session whose tails may still be on their way to the store
# when a new run starts; past this a new run waits, so a slow store slows turns.
MAX_UNSTORED_RUNS = 2
# A start that finds another replica's check holding the session's lock (a few
# store round trips) tries again this often, waiting 10, 20, 40 ... ms between.
MAX_LOCK_ATTEMPTS = 6


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
    token: CancelToken
    phase: RunPhase = RunPhase.STARTING
    # The session's store lock; set once the run has it (a next run on this replica may inherit it).
    lease: LockLease | None = None
    stream: RunStream | None = None
    first_seq: int = 0
    result: RunResult = field(default_factory=RunResult)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None
    # The run's message writes; the final event's store write waits for them.
    message_writes: asyncio.Future | None = None

    def move_to(self, phase: RunPhase) -> None:
        self.phase = self.phase.to(phase)


class _StoreMessageLog(MessageLog):
    def __init__(self, store: StorePort, tenant_id: str, session_id: str, run_id: str, lease: LockLease) -> None:
        self._store, self._tenant_id, self._session_id, self._run_id = store, tenant_id, session_id, run_id
        self._lease = lease
        self._num_appends = 0

    async def append(self, records):
        self._num_appends += 1
        request_id = f"{self._run_id}:m{self._num_appends}"
        return await write_fenced(self._lease, lambda token: self._store.append_messages(
            request_id=request_id, tenant_id=self._tenant_id, session_id=self._session_id, messages=list(records),
            fencing_token=token))


class RunManager:
    def __init__(self, *, store: StorePort, inference: InferencePort, tools: ToolsPort, hub: EventHub,
                 agent: AgentLoop, sessions: SessionDirectory, limiter: RateLimiter, limits: RunLimits,
                 replica_id: str, tool_cache_s: float = 30.0, clock: Callable[[], float] | None = None,
                 recovery: DeadRunRecovery | None = None, signals: Signals = NO_SIGNALS) -> None:
        self._store, self._inference, self._tools, self._hub = store, inference, tools, hub
        self._agent, self.sessions, self._limiter, self._limits = agent, sessions, limiter, limits
        self._replica_id = replica_id
        self._recovery = recovery or DeadRunRecovery(store, replica_id=replica_id, lease_ms=limits.lock_lease_ms,
                                                     signals=signals)
        self._signals = signals
        # Runs stopped because the store refused their append (another replica took the session).
        self.num_fenced_runs = 0
        # The session's current run, from STARTING until it is DONE or handed over.
        self._active: dict[str, ActiveRun] = {}
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
        run = self._active.get(session_id)
        return run if run is not None and run.phase is not RunPhase.STARTING else None

    def has_run(self, session_id: str) -> bool:
        """Whether this replica has a run of the session in any phase (its lock is this replica's)."""
        return session_id in self._active

    def holds_lock(self, owner_id: str) -> bool:
        """Whether `owner_id` (a lock holder seen in the store) is one of this replica's runs."""
        runs = [*self._active.values(), *self._unfinished]
        return any(run.lease is not None and run.lease.owner_id == owner_id for run in runs)

    async def start(self, *, request_id: str, tenant_id: str, session_id: str, user_message: str,
                    max_steps: int = 0, max_tokens: int = 0, temperature: float = 0.0, seed: int | None = None,
                    priority: int = 0, tool_choice: str = "", run_id: str = "") -> ActiveRun:
        self._check_options(user_message, max_steps, max_tokens, temperature, tool_choice)
        key = f"{tenant_id}:{request_id}" if request_id else ""
        if key and key in self._by_request:
            return self._by_request[key]  # a retried Run joins the run it started
        session = await self.sessions.get(tenant_id, session_id)
        handoff = await self._make_way(session_id)
        self._admit(tenant_id, session.model)
        spec = RunSpec(tenant_id=tenant_id, session_id=session_id, run_id=run_id or uuid.uuid4().hex,
                       user_message=user_message, model=session.model,
                       max_steps=max_steps or self._limits.default_max_steps,
                       max_tokens=max_tokens or self._limits.default_max_tokens, temperature=temperature,
                       seed=seed, priority=priority, tool_choice=tool_choice or "auto")
        run = self._reserve(spec, handoff)
        try:
            run.lease = self._inherit_lock(handoff) if handoff is not None else await self._take_lock(spec)
            run.lease.on_fenced = lambda: self._on_fenced(run)
            if handoff is None:
                await self._end_dead_run(spec, run.lease)
            await self._open_stream(run, session, handoff)
        except BaseException:
            await self._abandon(run)
            raise
        self._launch(run, session, key)
        return run

    def _check_options(self, user_message: str, max_steps: int, max_tokens: int, temperature: float,
                       tool_choice: str) -> None:
        require(bool(user_message.strip()), "user_message", "must not be empty")
        require(0 <= max_steps <= self._limits.max_max_steps, "options.max_steps",
                f"must be between 0 and {self._limits.max_max_steps}")
        require(0 <= max_tokens <= self._limits.max_max_tokens, "options.max_tokens",
                f"must be between 0 and {self._limits.max_max_tokens}")
        require(0.0 <= temperature <= 2.0, "options.temperature", "must be between 0 and 2")
        require(tool_choice in TOOL_CHOICES, "options.tool_choice", "must be auto, required or none")

    async def _make_way(self, session_id: str) -> ActiveRun | None:
        """Make way for a new run: the previous run to take over from, if any; SESSION_BUSY if it runs."""
        previous = self._active.get(session_id)
        handoff = previous if previous is not None and self._can_take_over(previous) else None
        if previous is not None and previous.phase.turn_is_over and handoff is None:
            # Its last event is out and it is only flushing and unlocking: a client that
            # starts the next turn on seeing that event waits for it instead of failing.
            await previous.done.wait()
        if session_id in self._active and handoff is None:
            raise FailedPrecondition(f"session {session_id!r} already has an active run", reason="SESSION_BUSY",
                                     field="session_id")
        return handoff

    def _admit(self, tenant_id: str, model: str) -> None:
        if len(self._active) >= self._limits.max_active_runs:
            raise ResourceExhausted("this replica runs as many turns as it may", reason="TOO_MANY_RUNS",
                                    retry_after_ms=500)
        self._limiter.admit(tenant_id, model)

    def _reserve(self, spec: RunSpec, handoff: ActiveRun | None) -> ActiveRun:
        """Hold the session for the new run while it takes the lock and opens its stream."""
        if handoff is not None:
            handoff.move_to(RunPhase.HANDED_OVER)
        run = ActiveRun(spec=spec, token=CancelToken())
        self._active[spec.session_id] = run
        return run

    @staticmethod
    def _inherit_lock(handoff: ActiveRun) -> LockLease:
        # The previous run's last event is out and it only writes its tail: keep
        # its lock (same owner renews) and continue its seqs, no store round trip.
        assert handoff.lease is not None and handoff.stream is not None
        return handoff.lease.passed_on(handoff.stream.next_seq)

    async def _take_lock(self, spec: RunSpec) -> LockLease:
        for attempt in range(MAX_LOCK_ATTEMPTS):
            grant = await self._store.acquire_session_lock(tenant_id=spec.tenant_id, session_id=spec.session_id,
                                                           owner_id=spec.run_id, lease_ms=self._limits.lock_lease_ms)
            if grant.acquired:
                return LockLease.granted(spec.run_id, grant)
            if not is_checker(grant.holder_id) or attempt + 1 == MAX_LOCK_ATTEMPTS:
                break
            # A replica is only looking at the session (Resume, Cancel): it lets go in a moment.
            await asyncio.sleep(0.01 * 2 ** attempt)
        raise FailedPrecondition(f"session {spec.session_id!r} has an active run on another replica",
                                 reason="SESSION_BUSY", field="session_id")

    async def _end_dead_run(self, spec: RunSpec, lease: LockLease) -> None:
        """Before the first event under a fresh lock: end the session's last run if its replica died mid-turn."""
        context = self._contexts.get(spec.session_id)
        if context is not None and context.current_at_event_seq == lease.next_event_seq - 1 > 0:
            return  # the last events are this replica's own finished run, stored through its final event
        await self._recovery.end_dead_run(spec.tenant_id, spec.session_id, lease)

    def _on_fenced(self, run: ActiveRun) -> None:
        """The store refused an append of the run: another replica owns the session now."""
        self.num_fenced_runs += 1
        self._signals.run_fenced()
        log.error("the store refused this run's append: another replica took the session; the run stops here",
                  extra={"session_id": run.spec.session_id, "run_id": run.spec.run_id})
        run.token.cancel("session lock taken over")

    async def _open_stream(self, run: ActiveRun, session: AgentSession, handoff: ActiveRun | None) -> None:
        spec, lease = run.spec, run.lease
        assert lease is not None
        run.stream, first = await self._hub.open_run(ev.AgentEvent(
            session_id=spec.session_id, run_id=spec.run_id, type=ev.TURN_STARTED,
            body={"user_message": spec.user_message, "model": session.model}), spec.tenant_id,
            next_seq=lease.next_event_seq, after=handoff.stream if handoff is not None else None, lease=lease)
        run.first_seq = first.seq

    async def _abandon(self, run: ActiveRun) -> None:
        """Undo a start that failed: give back the lock it holds, free the session."""
        try:
            if run.lease is not None:
                await self._release_lock(run.spec, run.lease.owner_id)
        finally:
            run.move_to(RunPhase.DONE)
            if self._active.get(run.spec.session_id) is run:
                del self._active[run.spec.session_id]

    def _launch(self, run: ActiveRun, session: AgentSession, key: str) -> None:
        run.move_to(RunPhase.RUNNING)
        self._unfinished.add(run)
        if key:
            self._by_request[key] = run
            while len(self._by_request) > 1024:
                self._by_request.popitem(last=False)
        run.task = asyncio.create_task(self._drive(run, session), name=f"run-{run.spec.run_id}")

    def cancel_local(self, tenant_id: str, session_id: str, run_id: str = "") -> bool | None:
        """Cancel the session's turn if it runs here: None when the session has no run here at all,
        else whether a turn was going (and, with `run_id`, was that run). Repeating it answers the same."""
        run = self._active.get(session_id)
        if run is None or run.spec.tenant_id != tenant_id:
            return None
        if run.phase.turn_is_over or (run_id and run.spec.run_id != run_id):
            return False
        run.token.cancel("cancelled by request")
        return True

    def apply_cancel(self, control: SessionControl) -> bool:
        """A cancel posted by another replica: stop the session's turn here if it is the one meant."""
        run = self._active.get(control.session_id)
        if run is None or run.spec.tenant_id != control.tenant_id or run.phase.turn_is_over:
            return False
        if control.run_id:
            meant = run.spec.run_id == control.run_id
        else:
            # The lock holder the poster saw: a later turn that took the lock anew is not stopped.
            holder = str(control.payload.get("holder_id", ""))
            meant = not holder or (run.lease is not None and run.lease.owner_id == holder)
        if meant:
            run.token.cancel(str(control.payload.get("reason") or "cancelled by request"))
        return meant

    async def close(self) -> None:
        runs = list(self._unfinished)
        for run in runs:
            run.token.cancel("server shutting down")
        for run in runs:
            await run.done.wait()

    @staticmethod
    def _can_take_over(previous: ActiveRun) -> bool:
        """Whether a new run may inherit this finishing run's lock and event stream."""
        return (previous.phase is RunPhase.FINISHING and previous.stream is not None
                and previous.lease is not None and not previous.lease.lost
                and previous.stream.num_predecessors + 1 <= MAX_UNSTORED_RUNS)

    # ---- the run itself ------------------------------------------------------------------------
    async def _drive(self, run: ActiveRun, session: AgentSession) -> None:
        renew = asyncio.create_task(self._keep_lock(run))
        try:
            await self._play_turn(run, session)
        finally:
            run.move_to(RunPhase.FINISHING)
            renew.cancel()
            await self._wind_down(run)

    async def _play_turn(self, run: ActiveRun, session: AgentSession) -> None:
        """Run the agent loop, then publish the turn's final or error event."""
        spec, stream = run.spec, run.stream
        assert stream is not None

        def emit(type_: str, body: dict) -> ev.AgentEvent:
            return self._hub.publish(stream, ev.AgentEvent(spec.session_id, spec.run_id, type_, body))

        inner = asyncio.create_task(self._execute(run, session, emit))
        run.token.on_cancel(inner.cancel)
        try:
            await inner
            if run.message_writes is not None:
                self._hub.hold_terminal(stream, run.message_writes)
            emit(ev.FINAL, {"text": run.result.text, "reason": run.result.reason,
                            "usage": run.result.usage.as_dict()})
        except asyncio.CancelledError:
            if not run.token.cancelled:
                raise
            reason = "aborted" if run.lease is not None and run.lease.lost else "cancelled"
            run.result.reason = reason
            emit(ev.FINAL, {"text": run.result.text, "reason": reason, "usage": run.result.usage.as_dict()})
        except RunAborted as exc:
            run.result.reason = "aborted"
            emit(ev.FINAL, {"text": exc.message, "reason": "aborted", "usage": run.result.usage.as_dict()})
        except DomainError as exc:
            run.result.error_reason = exc.reason
            emit(ev.ERROR, {"reason": exc.reason, "message": exc.message,
                            "retryable": isinstance(exc, (Unavailable, ResourceExhausted))})
        except Exception as exc:
            log.exception("run failed", extra={"session_id": spec.session_id, "run_id": spec.run_id})
            run.result.error_reason = "INTERNAL"
            emit(ev.ERROR, {"reason": "INTERNAL", "message": type(exc).__name__, "retryable": False})

    async def _wind_down(self, run: ActiveRun) -> None:
        """Flush the run's events, then give the lock back unless the next run took it over."""
        stream, lease = run.stream, run.lease
        assert stream is not None and lease is not None
        try:
            await self._hub.close_run(stream)
            if run.phase is not RunPhase.HANDED_OVER:
                self._note_context_current(run, stream)
        finally:
            try:
                if run.phase is RunPhase.FINISHING:
                    run.move_to(RunPhase.RELEASING)
                    if not lease.fenced:  # a fenced lock is another replica's now
                        await self._release_lock(run.spec, lease.owner_id)
            finally:
                run.move_to(RunPhase.DONE)
                if self._active.get(run.spec.session_id) is run:
                    del self._active[run.spec.session_id]
                self._unfinished.discard(run)
                run.done.set()

    async def _execute(self, run: ActiveRun, session: AgentSession, emit) -> None:
        spec = run.spec
        tools = await self._session_tools(session)
        pipeline = self._pipelines.setdefault(spec.model, PromptPipeline(self._inference, model=spec.model))
        n_ctx = self._n_ctx.get(spec.model) or await self._inference.context_size(spec.model)
        self._n_ctx[spec.model] = n_ctx
        assert run.lease is not None
        context = await self._context(spec, session, pipeline, n_ctx, tools, run.lease.next_event_seq,
                                      took_over=run.lease.inherited, run_lease=run.lease)
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
                       tools: list[ToolSpec], granted_next_seq: int, took_over: bool = False,
                       run_lease: LockLease | None = None) -> ContextManager:
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
        assert run_lease is not None
        context.message_log = _StoreMessageLog(self._store, spec.tenant_id, spec.session_id, spec.run_id, run_lease)
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
        if run.lease is not None and run.lease.next_event_seq > 0:
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
        spec, lease = run.spec, run.lease
        assert lease is not None
        interval = self._limits.lock_lease_ms / 3000.0
        while True:
            await asyncio.sleep(interval)
            try:
                grant = await self._store.acquire_session_lock(tenant_id=spec.tenant_id, session_id=spec.session_id,
                                                               owner_id=lease.owner_id,
                                                               lease_ms=self._limits.lock_lease_ms)
            except Unavailable:
                continue  # the lease outlives a few missed renewals
            if not lease.renewed(grant):
                log.error("session lock lost", extra={"session_id": spec.session_id, "run_id": spec.run_id})
                run.token.cancel("session lock lost")
                return

    async def _release_lock(self, spec: RunSpec, owner_id: str) -> None:
        try:
            released = await self._store.release_session_lock(tenant_id=spec.tenant_id, session_id=spec.session_id,
                                                              owner_id=owner_id)
        except DomainError:
            log.warning("session lock not released; it will expire", extra={"session_id": spec.session_id})
            return
        if not released:
            log.warning("session lock was no longer this run's to release", extra={"session_id": spec.session_id})
