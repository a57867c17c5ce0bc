"""ToolExecutor: policy -> cache -> breaker -> bounded, timed, retried run."""
from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from services.common.errors import (
    DomainError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from services.tools.core.breaker import CircuitBreaker
from services.tools.core.cache import ResultCache, cache_key
from services.tools.core.model import (
    CallContext,
    ToolContext,
    ToolFailure,
    ToolInvocation,
    ToolOutcome,
    ToolOutput,
    ToolSpec,
    ToolStatus,
)
from services.tools.core.ports import PolicyDecision, PolicyPort, PolicyQuery, PolicyUnavailable
from services.tools.core.registry import ToolRegistry
from services.tools.core.workspace import Workspace, WorkspaceRoots

log = logging.getLogger("llmesh.tools.executor")


@dataclass(frozen=True)
class ExecutorLimits:
    max_concurrent_calls: int = 16
    max_concurrent_calls_per_session: int = 8
    max_batch_calls: int = 64
    output_cap_bytes: int = 64 * 1024
    max_timeout_ms: int = 600_000
    retry_max_attempts: int = 3
    retry_base_delay_ms: float = 100.0
    retry_max_delay_ms: float = 2_000.0
    breaker_failure_threshold: int = 5
    breaker_window_s: float = 60.0
    breaker_reset_s: float = 30.0


def backoff_delay_s(attempt: int, base_ms: float, max_ms: float, rand: Callable[[], float]) -> float:
    """Exponential backoff with full jitter around it: base * 2^(attempt-1) * [0.5, 1.5)."""
    nominal = min(max_ms, base_ms * (2 ** (attempt - 1)))
    return nominal * (0.5 + rand()) / 1000.0


class _SessionSlots:
    """One semaphore per session, dropped when no call of the session is running."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.slots: dict[tuple[str, str], list] = {}

    def acquire_ref(self, key: tuple[str, str]) -> asyncio.Semaphore:
        entry = self.slots.setdefault(key, [asyncio.Semaphore(self.size), 0])
        entry[1] += 1
        return entry[0]

    def release_ref(self, key: tuple[str, str]) -> None:
        entry = self.slots[key]
        entry[1] -= 1
        if entry[1] == 0:
            del self.slots[key]


T = TypeVar("T")
# What a worker thread hands back: its result, or what it raised.
_Outcome = tuple[Literal[True], T] | tuple[Literal[False], BaseException]


@dataclass(eq=False)
class _Job:
    stop: threading.Event = field(default_factory=threading.Event)
    abandoned: bool = False  # its caller gave up (timeout, cancel); its thread may still run


@dataclass(eq=False)
class _SessionLoad:
    jobs: set[_Job] = field(default_factory=set)
    waiters: deque[asyncio.Future[None]] = field(default_factory=deque)


class SessionThreads:
    """Blocking work of tools on daemon threads, at most ``per_session`` jobs of one session at once.

    A job holds its session's slot until its thread returns, not until its
    caller gives up: a session whose calls timed out with their threads still
    stuck cannot start more, and other sessions never wait for those threads.
    When every slot of a session is held by such an abandoned job, a new call
    is refused at once (RESOURCE_EXHAUSTED, ``SESSION_BUSY``) instead of
    waiting for a slot that may never come back. Threads are daemons started
    per job, so there is no shared pool to exhaust, and a thread stuck in a
    system call never keeps the process from exiting.
    """

    def __init__(self, per_session: int, name: str = "tool-io") -> None:
        if per_session < 1:
            raise ValueError(f"per_session must be >= 1, got {per_session}")
        self.per_session = per_session
        self.name = name
        self.sessions: dict[Hashable, _SessionLoad] = {}
        self.closed = False

    @property
    def num_running(self) -> int:
        return sum(len(load.jobs) for load in self.sessions.values())

    async def run(self, key: Hashable, work: Callable[[threading.Event], T]) -> T:
        """``work(stop)`` on a thread of its own, once ``key`` has a free slot.

        ``stop`` is set when the caller gives up; long work checks it and ends early.
        """
        if self.closed:
            raise Unavailable("the tool service is shutting down", reason="SHUTTING_DOWN")
        loop = asyncio.get_running_loop()
        load = self.sessions.setdefault(key, _SessionLoad())
        try:
            await self._acquire(load)
        except BaseException:
            self._forget_if_idle(key, load)
            raise
        job = _Job()
        load.jobs.add(job)
        done: asyncio.Future[T] = loop.create_future()

        def body() -> None:
            try:
                outcome: _Outcome[T] = (True, work(job.stop))
            except BaseException as exc:
                outcome = (False, exc)
            try:
                loop.call_soon_threadsafe(self._finish, key, load, job, done, outcome)
            except RuntimeError:
                pass  # the loop is closed: nobody waits for this answer any more

        try:
            threading.Thread(target=body, name=f"{self.name}-{key}", daemon=True).start()
        except BaseException:
            load.jobs.discard(job)
            self._wake(load)
            self._forget_if_idle(key, load)
            raise
        try:
            return await done
        except asyncio.CancelledError:
            if job in load.jobs:
                job.abandoned = True
                job.stop.set()
                self._wake_all(load)  # waiters may now find every slot abandoned
            raise

    def close(self) -> None:
        """Refuse new work and ask running work to stop; never waits for a thread."""
        self.closed = True
        for load in self.sessions.values():
            for job in load.jobs:
                job.stop.set()

    async def _acquire(self, load: _SessionLoad) -> None:
        loop = asyncio.get_running_loop()
        while len(load.jobs) >= self.per_session:
            if all(job.abandoned for job in load.jobs):
                raise ResourceExhausted(
                    f"this session's {self.per_session} file tool slots are held by calls that timed out "
                    "and are still running; try again later", reason="SESSION_BUSY")
            waiter: asyncio.Future[None] = loop.create_future()
            load.waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake(load)  # it was woken for a free slot it will not take: pass it on
                raise
            finally:
                if waiter in load.waiters:
                    load.waiters.remove(waiter)

    def _finish(self, key: Hashable, load: _SessionLoad, job: _Job, done: asyncio.Future[T],
                outcome: _Outcome[T]) -> None:
        load.jobs.discard(job)
        self._wake(load)
        self._forget_if_idle(key, load)
        if done.done():
            return
        if outcome[0]:
            done.set_result(outcome[1])
        else:
            done.set_exception(outcome[1])

    @staticmethod
    def _wake(load: _SessionLoad) -> None:
        for waiter in load.waiters:
            if not waiter.done():
                waiter.set_result(None)
                return

    @staticmethod
    def _wake_all(load: _SessionLoad) -> None:
        for waiter in load.waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _forget_if_idle(self, key: Hashable, load: _SessionLoad) -> None:
        if not load.jobs and not load.waiters and self.sessions.get(key) is load:
            del self.sessions[key]


class ToolExecutor:
    def __init__(self, registry: ToolRegistry, policy: PolicyPort, roots: WorkspaceRoots,
                 cache: ResultCache[ToolOutcome], limits: ExecutorLimits = ExecutorLimits(), *,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 rand: Callable[[], float] = random.random,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = registry
        self.policy = policy
        self.roots = roots
        self.cache = cache
        self.limits = limits
        self.sleep = sleep
        self.rand = rand
        self.clock = clock
        self.global_slots = asyncio.Semaphore(limits.max_concurrent_calls)
        self.session_slots = _SessionSlots(limits.max_concurrent_calls_per_session)
        self.breakers: dict[str, CircuitBreaker] = {}
        # Queue depth for metrics: calls waiting for a slot, and calls holding one.
        self.num_waiting = 0
        self.num_running = 0

    def breaker(self, tool: str) -> CircuitBreaker:
        breaker = self.breakers.get(tool)
        if breaker is None:
            breaker = self.breakers[tool] = CircuitBreaker(
                self.limits.breaker_failure_threshold, self.limits.breaker_window_s,
                self.limits.breaker_reset_s, clock=self.clock)
        return breaker

    async def execute_batch(self, ctx: CallContext, calls: Sequence[ToolInvocation]) -> list[ToolOutcome]:
        """Run ``calls`` concurrently; one outcome per call, in call order."""
        if len(calls) > self.limits.max_batch_calls:
            raise InvalidArgument(f"calls: at most {self.limits.max_batch_calls} calls per batch, got {len(calls)}",
                                  field="calls")
        workspace = await self.workspace(ctx)
        # gather cancels every call when the batch is cancelled (client gone).
        return list(await asyncio.gather(*(self._execute(ctx, workspace, call) for call in calls)))

    async def execute(self, ctx: CallContext, call: ToolInvocation) -> ToolOutcome:
        workspace = await self.workspace(ctx)
        return await self._execute(ctx, workspace, call)

    async def workspace(self, ctx: CallContext) -> Workspace:
        """The session's workspace; the first call makes it on a thread, since that
        waits for the session's lock (another replica may be making it too)."""
        found = self.roots.find(ctx.tenant_id, ctx.session_id)
        if found is not None:
            return found
        return await asyncio.to_thread(self.roots.for_session, ctx.tenant_id, ctx.session_id)

    async def _execute(self, ctx: CallContext, workspace: Workspace, call: ToolInvocation) -> ToolOutcome:
        start = time.perf_counter()
        outcome = await self._decide_and_run(ctx, workspace, call)
        return outcome.with_(call_id=call.call_id, duration_ms=(time.perf_counter() - start) * 1000.0)

    async def _decide_and_run(self, ctx: CallContext, workspace: Workspace, call: ToolInvocation) -> ToolOutcome:
        blank = ToolOutcome(call_id=call.call_id, name=call.name, status=ToolStatus.UNSPECIFIED)
        try:
            spec = self.registry.get(call.name)
            self.registry.validate(spec.name, call.arguments)
        except (NotFound, InvalidArgument) as exc:
            return blank.with_(status=ToolStatus.INVALID, error_reason=exc.reason, error_message=exc.message,
                               request_error=exc)
        try:
            verdict = await self.policy.evaluate(PolicyQuery(
                tenant_id=ctx.tenant_id, session_id=ctx.session_id, role=ctx.role, tool_name=spec.name,
                arguments_json=call.arguments_json, workspace_root=str(workspace.root),
                risk_level=int(spec.risk_level), approval_id=call.approval_id))
        except PolicyUnavailable as exc:
            return blank.with_(status=ToolStatus.UNAVAILABLE, error_reason="POLICY_UNAVAILABLE",
                               error_message=f"policy could not be checked, the call did not run: {exc}")
        if verdict.decision is PolicyDecision.PROMPT:
            return blank.with_(status=ToolStatus.APPROVAL_REQUIRED, error_reason="APPROVAL_REQUIRED",
                               error_message=verdict.justification, approval_id=verdict.approval_id)
        if verdict.decision is not PolicyDecision.ALLOW:
            return blank.with_(status=ToolStatus.DENIED, error_reason="POLICY_FORBIDDEN",
                               error_message=verdict.justification or "forbidden by policy")
        timeout_ms = min(call.timeout_ms if call.timeout_ms > 0 else spec.timeout_ms, self.limits.max_timeout_ms)
        tctx = ToolContext(ctx.tenant_id, ctx.session_id, workspace, timeout_ms / 1000.0, self.limits.output_cap_bytes)
        key = None
        try:
            if spec.cacheable and self.cache.enabled:
                assert spec.state_token is not None
                # Inside the call's timeout like the handler: it may touch the filesystem too.
                token = await asyncio.wait_for(spec.state_token(call.arguments, tctx), tctx.timeout_s)
                if token is not None:
                    key = cache_key(spec.name, spec.version, call.arguments, str(workspace.root), token)
                    cached = self.cache.get(key)
                    if cached is not None:
                        return cached.with_(from_cache=True, attempts=0)
        except DomainError as exc:
            return self._refused(blank, exc)
        except TimeoutError:
            return blank.with_(status=ToolStatus.TIMEOUT, error_reason="TIMEOUT", exit_code=-1,
                               error_message=f"{spec.name} did not finish within {tctx.timeout_s:g}s")
        outcome = await self._run_with_retries(spec, call, tctx, blank)
        if key is not None and outcome.status is ToolStatus.OK:
            self.cache.put(key, outcome)
        return outcome

    async def _run_with_retries(self, spec: ToolSpec, call: ToolInvocation, tctx: ToolContext,
                                blank: ToolOutcome) -> ToolOutcome:
        breaker = self.breaker(spec.name)
        max_attempts = self.limits.retry_max_attempts if spec.retryable else 1
        attempt = 0
        while True:
            attempt += 1
            if not breaker.allow():
                return blank.with_(status=ToolStatus.UNAVAILABLE, error_reason="BREAKER_OPEN", attempts=attempt - 1,
                                   error_message=f"{spec.name} failed repeatedly and is paused; retry in "
                                                 f"{breaker.retry_after_s():.1f}s")
            try:
                output = await self._run_once(spec, call, tctx)
            except ToolFailure as exc:
                breaker.record_failure()
                if exc.transient and attempt < max_attempts:
                    await self.sleep(backoff_delay_s(attempt, self.limits.retry_base_delay_ms,
                                                     self.limits.retry_max_delay_ms, self.rand))
                    continue
                return blank.with_(status=ToolStatus.ERROR, error_reason=exc.reason, error_message=str(exc),
                                   exit_code=-1, attempts=attempt)
            except TimeoutError:
                # The handler was cancelled by the timeout and killed what it started.
                breaker.record_failure()
                return blank.with_(status=ToolStatus.TIMEOUT, error_reason="TIMEOUT", exit_code=-1, attempts=attempt,
                                   error_message=f"{spec.name} did not finish within {tctx.timeout_s:g}s")
            except DomainError as exc:
                breaker.release_probe()  # the caller's fault says nothing about the tool's health
                return self._refused(blank, exc).with_(attempts=attempt)
            except asyncio.CancelledError:
                breaker.release_probe()
                raise
            except Exception as exc:
                log.exception("tool %s crashed", spec.name)
                breaker.record_failure()
                return blank.with_(status=ToolStatus.ERROR, error_reason="TOOL_CRASHED", exit_code=-1,
                                   error_message=f"{type(exc).__name__}: {exc}", attempts=attempt)
            breaker.record_success()
            return blank.with_(
                status=ToolStatus.OK if output.ok else ToolStatus.ERROR, exit_code=output.exit_code,
                content=output.content, stdout=output.stdout, stderr=output.stderr,
                error_reason=output.error_reason, error_message=output.error_message, attempts=attempt)

    async def _run_once(self, spec: ToolSpec, call: ToolInvocation, tctx: ToolContext) -> ToolOutput:
        key = (tctx.tenant_id, tctx.session_id)
        session_slots = self.session_slots.acquire_ref(key)
        self.num_waiting += 1
        waiting = True
        try:
            async with session_slots, self.global_slots:
                self.num_waiting -= 1
                waiting = False
                self.num_running += 1
                try:
                    return await asyncio.wait_for(spec.handler(call.arguments, tctx), tctx.timeout_s)
                finally:
                    self.num_running -= 1
        finally:
            if waiting:  # cancelled or timed out before it got a slot
                self.num_waiting -= 1
            self.session_slots.release_ref(key)

    @staticmethod
    def _refused(blank: ToolOutcome, exc: DomainError) -> ToolOutcome:
        if isinstance(exc, PermissionDenied):
            status = ToolStatus.DENIED
        elif isinstance(exc, InvalidArgument):
            status = ToolStatus.INVALID
        elif isinstance(exc, ResourceExhausted):
            status = ToolStatus.UNAVAILABLE  # back-pressure: a single call's RPC answers RESOURCE_EXHAUSTED
        else:
            return blank.with_(status=ToolStatus.ERROR, error_reason=exc.reason, error_message=exc.message,
                               exit_code=1)
        return blank.with_(status=status, error_reason=exc.reason, error_message=exc.message, request_error=exc)
