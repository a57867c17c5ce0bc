"""Orchestrator: the core behind AgentService, assembled from its parts.

Any replica may receive any call. Cancel and SubmitApproval act on a run here
directly; for a run on another replica they post a session control to the
store, which the replica running it follows (core/controls.py). Resume and
the next turn end a turn whose replica died (core/recovery.py).
"""
from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

from services.common.errors import FailedPrecondition, InvalidArgument, require
from services.common.tenants import TenantPolicy
from services.orchestrator.core.agent import AgentLoop
from services.orchestrator.core.approvals import ApprovalBook, not_waiting
from services.orchestrator.core.controls import SessionControls
from services.orchestrator.core.event_hub import EventHub
from services.orchestrator.core.events import AgentEvent
from services.orchestrator.core.ports import ABORT, APPROVAL_DECISIONS, InferencePort, PolicyPort, StorePort, ToolsPort
from services.orchestrator.core.rate_limit import RateLimiter
from services.orchestrator.core.recovery import DeadRunRecovery, SessionCheck, SessionState
from services.orchestrator.core.retry import RetryPolicy
from services.orchestrator.core.runs import ActiveRun, RunLimits, RunManager
from services.orchestrator.core.sessions import AgentSession, SessionDirectory, require_ids
from services.orchestrator.core.signals import NO_SIGNALS, Signals
from services.orchestrator.core.tasks import TaskClassLimits, TaskQueue, TaskView
from services.orchestrator.core.tool_runner import ToolOrchestrator

# What policy answers for a decision on an approval that was already answered.
ALREADY_ANSWERED = "APPROVAL_ALREADY_ANSWERED"
# How long start() waits for the session control watch to get live before serving anyway.
CONTROL_WATCH_START_S = 2.0


@dataclass(frozen=True)
class OrchestratorConfig:
    limits: RunLimits = RunLimits()
    retry: RetryPolicy = RetryPolicy()
    tenant_runs_per_s: float = 0.0
    tenant_burst: float = 10.0
    model_runs_per_s: float = 0.0
    model_burst: float = 50.0
    event_batch_interval_s: float = 0.02
    event_batch_max: int = 64
    approval_timeout_s: float = 600.0
    max_workers: int = 2
    task_lease_ms: int = 30_000
    task_idle_wait_s: float = 1.0
    task_max_attempts: int = 3
    task_class_limits: TaskClassLimits = TaskClassLimits()
    # Per-tenant economics settings; the orchestrator applies max_priority to tasks.
    tenant_policies: Mapping[str, TenantPolicy] = field(default_factory=dict)
    replica_id: str = ""


class Orchestrator:
    def __init__(self, *, store: StorePort, inference: InferencePort, tools: ToolsPort, policy: PolicyPort,
                 config: OrchestratorConfig = OrchestratorConfig(), rng: random.Random | None = None,
                 signals: Signals = NO_SIGNALS) -> None:
        self.config = config
        self.replica_id = config.replica_id or uuid.uuid4().hex[:12]
        self.store = store
        self.policy = policy
        self.approvals = ApprovalBook()
        self.recovery = DeadRunRecovery(store, replica_id=self.replica_id, lease_ms=config.limits.lock_lease_ms,
                                        signals=signals)
        self.hub = EventHub(store, batch_interval_s=config.event_batch_interval_s, batch_max=config.event_batch_max)
        self.sessions = SessionDirectory(store)
        tool_runner = ToolOrchestrator(tools, self.approvals, retry=config.retry,
                                       approval_timeout_s=config.approval_timeout_s, rng=rng)
        self.agent = AgentLoop(inference, tool_runner, retry=config.retry, rng=rng)
        limiter = RateLimiter(config.tenant_runs_per_s, config.tenant_burst, config.model_runs_per_s,
                              config.model_burst)
        self.runs = RunManager(store=store, inference=inference, tools=tools, hub=self.hub, agent=self.agent,
                               sessions=self.sessions, limiter=limiter, limits=config.limits,
                               replica_id=self.replica_id, recovery=self.recovery, signals=signals)
        self.controls = SessionControls(store, cancel_run=self.runs.apply_cancel, approvals=self.approvals,
                                        signals=signals, rng=rng)
        self.tasks = TaskQueue(store, self.runs, worker_id=self.replica_id, max_workers=config.max_workers,
                               lease_ms=config.task_lease_ms, idle_wait_s=config.task_idle_wait_s,
                               max_attempts=config.task_max_attempts, class_limits=config.task_class_limits,
                               tenant_policies=config.tenant_policies)

    def start(self) -> None:
        self.controls.start()
        if self.config.max_workers > 0:
            self.tasks.start()

    async def wait_ready(self, timeout_s: float = CONTROL_WATCH_START_S) -> bool:
        """Whether the control watch got live in time (controls posted before it are not seen here)."""
        return await self.controls.wait_first_attempt(timeout_s)

    async def close(self) -> None:
        await self.tasks.close()
        await self.runs.close()
        await self.controls.close()

    async def get_session(self, tenant_id: str, session_id: str) -> AgentSession:
        session = await self.sessions.get(tenant_id, session_id)
        live = self.hub.live_run(session_id)
        if live is not None:
            last_seq = live.last_seq
        else:
            events = await self.store.read_events(tenant_id=tenant_id, session_id=session_id, after_seq=0)
            last_seq = events[-1].seq if events else 0
        return AgentSession(**{**session.__dict__, "last_seq": last_seq})

    async def run(self, **kwargs) -> tuple[ActiveRun, AsyncIterator[AgentEvent]]:
        """Start a run; the iterator yields its events until its final or error event."""
        run = await self.runs.start(**kwargs)
        return run, self._run_events(run)

    async def _run_events(self, run: ActiveRun) -> AsyncIterator[AgentEvent]:
        spec = run.spec
        async for event in self.hub.follow(spec.tenant_id, spec.session_id, run.first_seq - 1,
                                           until_run_ends=spec.run_id):
            yield event

    async def resume(self, tenant_id: str, session_id: str, after_seq: int) -> AsyncIterator[AgentEvent]:
        """Every event after `after_seq`, then live ones; a turn whose replica died is ended on the way."""
        require(after_seq >= 0, "after_seq", "must not be negative")
        await self.sessions.get(tenant_id, session_id)
        return self.recovery.guard(tenant_id, session_id, self.hub.follow(tenant_id, session_id, after_seq),
                                   is_local=lambda: self.runs.has_run(session_id), after_seq=after_seq)

    async def submit_approval(self, *, request_id: str, tenant_id: str, session_id: str, approval_id: str,
                              decision: str, approver: str) -> bool:
        """Record a person's decision and release the call waiting for it, on whichever replica it waits.

        True once the decision is recorded (and on a repeat of a recorded
        one); NOT_FOUND (APPROVAL_NOT_FOUND) when no turn of the session is
        going, or the turn runs here and does not wait for this approval.
        """
        require_ids(tenant_id, session_id)
        require(bool(approval_id.strip()), "approval_id", "must not be empty")
        if decision not in APPROVAL_DECISIONS:
            raise InvalidArgument(f"decision: must be one of {', '.join(APPROVAL_DECISIONS)}", field="decision")
        if self.approvals.was_decided(tenant_id, session_id, approval_id):
            return True  # a repeated submission (several calls shared this approval)
        request_id = request_id or uuid.uuid4().hex
        pending = self.approvals.waiting(tenant_id, session_id, approval_id)
        if pending is not None:
            if pending.decided:
                return True  # a repeated submission (several calls shared this approval)
            # Policy records it first: the audit trail must hold every decision that took effect.
            if await self._record_approval(request_id, tenant_id, session_id, approval_id, decision, approver):
                self.approvals.resolve(pending, decision)
            return True
        await self.sessions.get(tenant_id, session_id)
        if not self._run_elsewhere(await self.recovery.check(tenant_id, session_id)):
            raise not_waiting(session_id, approval_id)
        # Policy checks through the store that the approval exists and waits (NOT_FOUND otherwise).
        if await self._record_approval(request_id, tenant_id, session_id, approval_id, decision, approver):
            await self.controls.post_approval(request_id=request_id, tenant_id=tenant_id, session_id=session_id,
                                              approval_id=approval_id, decision=decision)
        self.approvals.note_decided(tenant_id, session_id, approval_id)
        return True

    async def _record_approval(self, request_id: str, tenant_id: str, session_id: str, approval_id: str,
                               decision: str, approver: str) -> bool:
        """Record with policy; False when it was already answered (a repeat: its first answer is on its way)."""
        try:
            await self.policy.record_approval(request_id=request_id, tenant_id=tenant_id, session_id=session_id,
                                              approval_id=approval_id, decision=decision, approver=approver)
        except FailedPrecondition as exc:
            if exc.reason != ALREADY_ANSWERED:
                raise
            return False
        return True

    def _run_elsewhere(self, check: SessionCheck) -> bool:
        """Whether the check found a turn going on another replica (a live owner that is not a run of ours)."""
        return check.state is SessionState.RUN_ACTIVE and not self.runs.holds_lock(check.holder_id)

    async def enqueue_task(self, **kwargs) -> TaskView:
        return await self.tasks.enqueue(**kwargs)

    async def get_task(self, tenant_id: str, task_id: str) -> TaskView:
        return await self.tasks.get(tenant_id, task_id)

    async def cancel_task(self, tenant_id: str, task_id: str, reason: str = "",
                          request_id: str = "") -> tuple[TaskView, bool]:
        """Cancel a background task: a queued one never runs; a running one's run is stopped wherever it
        runs. (The task now, whether it had started.)"""
        task, run_id = await self.tasks.cancel(tenant_id, task_id, reason)
        if run_id:
            # The store voided the worker's lease already; this stops the run now rather than at its next
            # heartbeat. A run that has not started yet finds its lease gone at its first heartbeat.
            await self.cancel(tenant_id, task.session_id, run_id, request_id=request_id)
        return task, bool(run_id)

    async def cancel(self, tenant_id: str, session_id: str, run_id: str = "", request_id: str = "") -> bool:
        """Stop the session's turn wherever it runs.

        True when a turn was going (here, or on the replica holding the
        session's lock, which gets the request as a control): it ends with
        `final` reason `cancelled` unless it ended first. Repeating the call
        while the turn goes on answers True again. False when no turn was
        going, or `run_id` names another run than the turn going here.
        """
        require_ids(tenant_id, session_id)
        await self.sessions.get(tenant_id, session_id)
        here = self.runs.cancel_local(tenant_id, session_id, run_id)
        if here is not None:
            return here
        check = await self.recovery.check(tenant_id, session_id)
        if not self._run_elsewhere(check):
            return False
        await self.controls.post_cancel(request_id=request_id, tenant_id=tenant_id, session_id=session_id,
                                        run_id=run_id, holder_id=check.holder_id)
        return True


__all__ = ["Orchestrator", "OrchestratorConfig", "ABORT"]
