"""Orchestrator: the core behind AgentService, assembled from its parts."""
from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

from services.common.errors import InvalidArgument, require
from services.common.tenants import TenantPolicy
from services.orchestrator.core.agent import AgentLoop
from services.orchestrator.core.approvals import ApprovalBook
from services.orchestrator.core.event_hub import EventHub
from services.orchestrator.core.events import AgentEvent
from services.orchestrator.core.ports import ABORT, APPROVAL_DECISIONS, InferencePort, PolicyPort, StorePort, ToolsPort
from services.orchestrator.core.rate_limit import RateLimiter
from services.orchestrator.core.retry import RetryPolicy
from services.orchestrator.core.runs import ActiveRun, RunLimits, RunManager
from services.orchestrator.core.sessions import AgentSession, SessionDirectory, require_ids
from services.orchestrator.core.tasks import TaskClassLimits, TaskQueue, TaskView
from services.orchestrator.core.tool_runner import ToolOrchestrator


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
                 config: OrchestratorConfig = OrchestratorConfig(), rng: random.Random | None = None) -> None:
        self.config = config
        self.replica_id = config.replica_id or uuid.uuid4().hex[:12]
        self.store = store
        self.policy = policy
        self.approvals = ApprovalBook()
        self.hub = EventHub(store, batch_interval_s=config.event_batch_interval_s, batch_max=config.event_batch_max)
        self.sessions = SessionDirectory(store)
        tool_runner = ToolOrchestrator(tools, self.approvals, retry=config.retry,
                                       approval_timeout_s=config.approval_timeout_s, rng=rng)
        self.agent = AgentLoop(inference, tool_runner, retry=config.retry, rng=rng)
        limiter = RateLimiter(config.tenant_runs_per_s, config.tenant_burst, config.model_runs_per_s,
                              config.model_burst)
        self.runs = RunManager(store=store, inference=inference, tools=tools, hub=self.hub, agent=self.agent,
                               sessions=self.sessions, limiter=limiter, limits=config.limits,
                               replica_id=self.replica_id)
        self.tasks = TaskQueue(store, self.runs, worker_id=self.replica_id, max_workers=config.max_workers,
                               lease_ms=config.task_lease_ms, idle_wait_s=config.task_idle_wait_s,
                               max_attempts=config.task_max_attempts, class_limits=config.task_class_limits,
                               tenant_policies=config.tenant_policies)

    def start(self) -> None:
        if self.config.max_workers > 0:
            self.tasks.start()

    async def close(self) -> None:
        await self.tasks.close()
        await self.runs.close()

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
        require(after_seq >= 0, "after_seq", "must not be negative")
        await self.sessions.get(tenant_id, session_id)
        return self.hub.follow(tenant_id, session_id, after_seq)

    async def submit_approval(self, *, request_id: str, tenant_id: str, session_id: str, approval_id: str,
                              decision: str, approver: str) -> bool:
        require_ids(tenant_id, session_id)
        require(bool(approval_id.strip()), "approval_id", "must not be empty")
        if decision not in APPROVAL_DECISIONS:
            raise InvalidArgument(f"decision: must be one of {', '.join(APPROVAL_DECISIONS)}", field="decision")
        if self.approvals.was_decided(tenant_id, session_id, approval_id):
            return True  # a repeated submission (several calls shared this approval)
        pending = self.approvals.find(tenant_id, session_id, approval_id)
        if pending.decided:
            return True  # a repeated submission (several calls shared this approval)
        # Policy records it first: the audit trail must hold every decision that took effect.
        await self.policy.record_approval(request_id=request_id or uuid.uuid4().hex, tenant_id=tenant_id,
                                          session_id=session_id, approval_id=approval_id, decision=decision,
                                          approver=approver)
        self.approvals.resolve(pending, decision)
        return True

    async def enqueue_task(self, **kwargs) -> TaskView:
        return await self.tasks.enqueue(**kwargs)

    async def get_task(self, tenant_id: str, task_id: str) -> TaskView:
        return await self.tasks.get(tenant_id, task_id)

    async def cancel(self, tenant_id: str, session_id: str, run_id: str = "") -> bool:
        require_ids(tenant_id, session_id)
        return await self.runs.cancel(tenant_id, session_id, run_id)


__all__ = ["Orchestrator", "OrchestratorConfig", "ABORT"]
