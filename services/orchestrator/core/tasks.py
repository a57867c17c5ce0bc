"""Durable agent task queue: background runs claimed from the store under leases.

`EnqueueTask` stores a task; up to `max_workers` workers on each replica
claim tasks with a lease, run them as ordinary runs (events stored as usual)
and heartbeat the lease while they run. A worker that dies stops
heartbeating, its lease expires and the store hands the task to another
worker. A worker whose heartbeat is refused (the lease went to someone else)
cancels its run and does not ack, so a task is completed by one worker only;
the session lock also keeps two runs of a session apart.

Workers wait for work on an event set by local enqueues; tasks enqueued on
other replicas or released by expired leases are found by a claim every
`idle_wait_s`, which is the one periodic check (the store has no push).

Tasks come in three classes, from the run's priority (capped by the
tenant's `max_priority`): interactive, normal and batch, each in its own
store queue. A free worker claims from the best class first, so a batch
flood never delays interactive work by more than the run already in hand;
batch may never hold the last `batch_reserved_workers` workers, and each
class may have its own cap on running tasks. A class that has not been
looked at for its `max_wait_s` is tried first, so the better classes cannot
starve it either.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from services.common.errors import DomainError, FailedPrecondition, NotFound, ResourceExhausted, Unavailable, require
from services.common.tenants import PRIORITY_NAMES, TenantPolicy, policy_for
from services.orchestrator.core.ports import StorePort, TaskRecord
from services.orchestrator.core.runs import ActiveRun, RunManager

log = logging.getLogger("llmesh.orchestrator.tasks")

QUEUE = "agent-runs"
# The same classes as the inference queue and the tenant policies, best first.
CLASSES = PRIORITY_NAMES
# llmesh.orchestrator.v1.Priority numbers them 1, 2, 3 in this order; UNSPECIFIED (0) runs as normal.
_CLASS_OF_PRIORITY = {0: "normal", **{number: name for number, name in enumerate(CLASSES, start=1)}}


def queue_of(task_class: str) -> str:
    """Store queue of a class; normal keeps the original queue name, so older tasks still run."""
    return QUEUE if task_class == "normal" else f"{QUEUE}.{task_class}"


@dataclass(frozen=True)
class TaskClassLimits:
    #: Most tasks of a class running at once on this replica; 0 or absent: only max_workers.
    max_running: Mapping[str, int] = field(default_factory=dict)
    #: Workers batch tasks may never hold (at least one worker always takes batch).
    batch_reserved_workers: int = 1
    #: A class not looked at for this long is tried first; 0 or absent: never.
    max_wait_s: Mapping[str, float] = field(default_factory=lambda: {"normal": 10.0, "batch": 30.0})

    def __post_init__(self) -> None:
        for task_class, cap in self.max_running.items():
            require(task_class in CLASSES and cap >= 0, f"task_max_running_{task_class}", "must be >= 0")
        for task_class, wait_s in self.max_wait_s.items():
            require(task_class in CLASSES and wait_s >= 0, f"task_max_wait_ms_{task_class}", "must be >= 0")
        require(self.batch_reserved_workers >= 0, "task_batch_reserved_workers", "must be >= 0")

_STATES = {"READY": "QUEUED", "LEASED": "RUNNING", "DONE": "SUCCEEDED", "DEAD": "FAILED", "CANCELLED": "CANCELLED"}


def task_run_id(task_id: str, attempt: int) -> str:
    """The run id of a task's attempt: CancelTask stops exactly that run, not another turn of its session."""
    return f"task-{task_id}-{attempt}"


@dataclass(frozen=True)
class TaskView:
    task_id: str
    session_id: str
    # QUEUED, RUNNING, SUCCEEDED, FAILED or CANCELLED.
    state: str
    attempts: int
    result_text: str
    error: str
    create_time: float


def view(record: TaskRecord) -> TaskView:
    payload = json.loads(record.payload_json or "{}")
    result = json.loads(record.result_json) if record.result_json else {}
    return TaskView(task_id=record.task_id, session_id=payload.get("session_id", ""),
                    state=_STATES.get(record.state, "QUEUED"), attempts=record.attempts,
                    result_text=result.get("text", ""), error=record.last_error, create_time=record.create_time)


class TaskQueue:
    def __init__(self, store: StorePort, runs: RunManager, *, worker_id: str = "", max_workers: int = 2,
                 lease_ms: int = 30_000, idle_wait_s: float = 1.0, max_attempts: int = 3,
                 class_limits: TaskClassLimits = TaskClassLimits(),
                 tenant_policies: Mapping[str, TenantPolicy] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._runs = runs
        self.worker_id = worker_id or uuid.uuid4().hex[:12]
        self.max_workers = max_workers
        self._limits = class_limits
        self._tenants = tenant_policies or {}
        self._clock = clock
        self.busy_by_class = {c: 0 for c in CLASSES}
        # Tasks claimed here since start, by class (exported as a counter by the server's metrics).
        self.num_claimed_by_class = {c: 0 for c in CLASSES}
        # When each class was last claimed from or found empty.
        self._looked_at = {c: clock() for c in CLASSES}
        self._lease_ms = lease_ms
        self._idle_wait_s = idle_wait_s
        self._max_attempts = max_attempts
        self._wake = asyncio.Event()
        self._workers: list[asyncio.Task] = []
        self.num_busy = 0
        # Tasks cancelled through this replica since start.
        self.num_cancelled = 0

    async def enqueue(self, *, request_id: str, tenant_id: str, session_id: str, user_message: str,
                      options: dict) -> TaskView:
        require(bool(user_message.strip()), "user_message", "must not be empty")
        await self._runs.sessions.get(tenant_id, session_id)
        task_class = self.class_of(tenant_id, int(options.get("priority", 0)))
        # The run is queued in the inference pool with the class it was queued in here.
        options = {**options, "priority": CLASSES.index(task_class) + 1}
        payload = {"tenant_id": tenant_id, "session_id": session_id, "user_message": user_message,
                   "options": options}
        record = await self._store.enqueue_task(
            request_id=request_id or uuid.uuid4().hex, tenant_id=tenant_id, queue=queue_of(task_class),
            priority=CLASSES.index(task_class),
            payload_json=json.dumps(payload, sort_keys=True),
            idempotency_key=f"{tenant_id}:{request_id}" if request_id else "", max_attempts=self._max_attempts)
        self._wake.set()
        return view(record)

    async def get(self, tenant_id: str, task_id: str) -> TaskView:
        require(bool(tenant_id.strip()), "tenant_id", "must not be empty")
        require(bool(task_id.strip()), "task_id", "must not be empty")
        record = await self._store.get_task(tenant_id=tenant_id, task_id=task_id)
        if record.tenant_id != tenant_id:
            raise NotFound(f"task {task_id!r} not found", reason="TASK_NOT_FOUND")
        return view(record)

    async def cancel(self, tenant_id: str, task_id: str, reason: str) -> tuple[TaskView, str]:
        """Cancel the tenant's task in the store: (its view, the run id to stop, empty if it had not started)."""
        require(bool(tenant_id.strip()), "tenant_id", "must not be empty")
        require(bool(task_id.strip()), "task_id", "must not be empty")
        record, previous = await self._store.cancel_task(tenant_id=tenant_id, task_id=task_id,
                                                          reason=reason or "cancelled by request")
        self.num_cancelled += previous != "CANCELLED"
        return view(record), task_run_id(task_id, record.attempts) if previous == "LEASED" else ""

    def start(self) -> None:
        for i in range(self.max_workers):
            self._workers.append(asyncio.create_task(self._work(), name=f"task-worker-{self.worker_id}-{i}"))

    async def close(self) -> None:
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers.clear()

    def class_of(self, tenant_id: str, priority: int) -> str:
        """The class a task asking for ``priority`` is queued in (the tenant's max_priority caps it)."""
        require(priority in _CLASS_OF_PRIORITY, "options.priority", f"unknown priority {priority}")
        return policy_for(self._tenants, tenant_id).clamp_priority(_CLASS_OF_PRIORITY[priority])

    def _may_take(self, task_class: str) -> bool:
        cap = self._limits.max_running.get(task_class, 0)
        if cap and self.busy_by_class[task_class] >= cap:
            return False
        if task_class == "batch":
            allowed = max(1, self.max_workers - self._limits.batch_reserved_workers)
            return self.busy_by_class["batch"] < allowed
        return True

    def claim_order(self) -> list[str]:
        """Classes this worker may take now, best first, any class overdue for a look moved ahead."""
        now = self._clock()
        open_classes = [c for c in CLASSES if self._may_take(c)]
        overdue = [c for c in open_classes
                   if self._limits.max_wait_s.get(c, 0) and now - self._looked_at[c] >= self._limits.max_wait_s[c]]
        return overdue + [c for c in open_classes if c not in overdue]

    async def _claim(self) -> tuple[str, TaskRecord] | None:
        for task_class in self.claim_order():
            # Counted before the claim so concurrent workers respect the caps.
            self.busy_by_class[task_class] += 1
            try:
                tasks = await self._store.claim_tasks(queue=queue_of(task_class), worker_id=self.worker_id,
                                                      max_tasks=1, lease_ms=self._lease_ms)
            except Unavailable:
                tasks = []
            finally:
                self._looked_at[task_class] = self._clock()
            if tasks:
                return task_class, tasks[0]
            self.busy_by_class[task_class] -= 1
        return None

    async def _work(self) -> None:
        while True:
            claimed = await self._claim()
            if claimed is None:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), self._idle_wait_s)
                except TimeoutError:
                    pass
                continue
            task_class, task = claimed
            self.num_busy += 1
            self.num_claimed_by_class[task_class] += 1
            try:
                await self.process(task)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("task failed unexpectedly", extra={"task_id": task.task_id})
            finally:
                self.num_busy -= 1
                self.busy_by_class[task_class] -= 1

    async def process(self, task: TaskRecord) -> None:
        payload = json.loads(task.payload_json)
        options = payload.get("options", {})
        try:
            run = await self._runs.start(
                request_id=f"task:{task.task_id}:{task.attempts}", run_id=task_run_id(task.task_id, task.attempts),
                tenant_id=payload["tenant_id"],
                session_id=payload["session_id"], user_message=payload["user_message"],
                max_steps=int(options.get("max_steps", 0)), max_tokens=int(options.get("max_tokens", 0)),
                temperature=float(options.get("temperature", 0.0)), seed=options.get("seed"),
                priority=int(options.get("priority", 0)), tool_choice=str(options.get("tool_choice", "")))
        except (FailedPrecondition, ResourceExhausted, Unavailable) as exc:
            await self._fail(task, f"{exc.reason}: {exc.message}", permanent=False)
            return
        except DomainError as exc:
            await self._fail(task, f"{exc.reason}: {exc.message}", permanent=True)
            return
        lost = asyncio.Event()
        beat = asyncio.create_task(self._heartbeat(task, run, lost))
        try:
            await run.done.wait()
        finally:
            beat.cancel()
        if lost.is_set():
            log.warning("lease lost; not acking", extra={"task_id": task.task_id})
            return
        result = run.result
        if result.reason in ("stop", "max_steps"):
            await self._store.ack_task(task_id=task.task_id, lease_token=task.lease_token, result_json=json.dumps(
                {"text": result.text, "reason": result.reason, "run_id": run.spec.run_id,
                 "usage": result.usage.as_dict()}))
        else:
            await self._fail(task, result.error_reason or result.reason,
                             permanent=result.reason in ("cancelled", "aborted"))

    async def _heartbeat(self, task: TaskRecord, run: ActiveRun, lost: asyncio.Event) -> None:
        while True:
            await asyncio.sleep(self._lease_ms / 3000.0)
            try:
                await self._store.heartbeat_task(task_id=task.task_id, lease_token=task.lease_token,
                                                 lease_ms=self._lease_ms)
            except Unavailable:
                continue
            except DomainError:
                lost.set()
                run.token.cancel("lease lost")
                return

    async def _fail(self, task: TaskRecord, error: str, *, permanent: bool) -> None:
        try:
            await self._store.fail_task(task_id=task.task_id, lease_token=task.lease_token, error=error,
                                        permanent=permanent)
        except DomainError:
            log.warning("could not fail task: it was cancelled, or its lease will expire",
                        extra={"task_id": task.task_id})
