"""An in-process StorePort: the store's contract kept in dicts.

For a single-process orchestrator (development, benchmarks) and for tests of
the core. It keeps the rules the real store keeps: gapless seqs with
idempotency keys, leased task claims that expire, leased session locks.
Nothing survives the process.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Callable, Sequence

from services.common.errors import Aborted, FailedPrecondition, NotFound
from services.orchestrator.core.events import AgentEvent
from services.orchestrator.core.ports import MessageRecord, SessionLockGrant, SessionRecord, TaskRecord


@dataclass
class _SessionLog:
    record: SessionRecord
    messages: list[MessageRecord] = field(default_factory=list)
    events: list[AgentEvent] = field(default_factory=list)
    event_keys: dict[str, int] = field(default_factory=dict)
    message_requests: dict[str, list[int]] = field(default_factory=dict)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)


@dataclass
class _Task:
    record: TaskRecord
    queue: str
    max_attempts: int
    lease_expires: float = 0.0


class MemoryStore:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._sessions: dict[tuple[str, str], _SessionLog] = {}
        self._session_requests: dict[tuple[str, str], str] = {}
        self._tasks: dict[str, _Task] = {}
        self._task_keys: dict[str, str] = {}
        self._locks: dict[tuple[str, str], tuple[str, float]] = {}
        self.num_event_appends = 0

    def _log(self, tenant_id: str, session_id: str) -> _SessionLog:
        log = self._sessions.get((tenant_id, session_id))
        if log is None:
            raise NotFound(f"session {session_id!r} not found", reason="SESSION_NOT_FOUND")
        return log

    # ---- sessions and messages -----------------------------------------------------------------
    async def create_session(self, *, request_id, tenant_id, title, metadata) -> SessionRecord:
        if request_id and (tenant_id, request_id) in self._session_requests:
            return self._log(tenant_id, self._session_requests[(tenant_id, request_id)]).record
        session_id = uuid.uuid4().hex
        record = SessionRecord(tenant_id=tenant_id, session_id=session_id, title=title, metadata=dict(metadata),
                               create_time=time.time())
        self._sessions[(tenant_id, session_id)] = _SessionLog(record)
        if request_id:
            self._session_requests[(tenant_id, request_id)] = session_id
        return record

    async def get_session(self, *, tenant_id, session_id) -> SessionRecord:
        return self._log(tenant_id, session_id).record

    async def list_sessions(self, *, tenant_id, page_size, page_token) -> tuple[list[SessionRecord], str]:
        records = sorted((log.record for (t, _s), log in self._sessions.items() if t == tenant_id),
                         key=lambda r: (r.create_time, r.session_id))
        start = int(page_token or 0)
        page = records[start:start + page_size]
        return page, str(start + page_size) if start + page_size < len(records) else ""

    async def append_messages(self, *, request_id, tenant_id, session_id, messages) -> list[int]:
        log = self._log(tenant_id, session_id)
        if request_id and request_id in log.message_requests:
            return log.message_requests[request_id]
        positions = []
        for message in messages:
            position = len(log.messages) + 1
            log.messages.append(replace(message, position=position))
            positions.append(position)
        if request_id:
            log.message_requests[request_id] = positions
        return positions

    async def list_messages(self, *, tenant_id, session_id, after_position) -> list[MessageRecord]:
        return [m for m in self._log(tenant_id, session_id).messages if m.position > after_position]

    # ---- events --------------------------------------------------------------------------------
    async def append_events(self, *, request_id, tenant_id, session_id, events: Sequence[AgentEvent],
                            idempotency_keys: Sequence[str]) -> list[int]:
        log = self._log(tenant_id, session_id)
        self.num_event_appends += 1
        seqs = []
        for event, key in zip(events, idempotency_keys):
            if key and key in log.event_keys:
                seqs.append(log.event_keys[key])
                continue
            seq = len(log.events) + 1
            log.events.append(event.with_seq(seq))
            if key:
                log.event_keys[key] = seq
            seqs.append(seq)
        async with log.changed:
            log.changed.notify_all()
        return seqs

    async def read_events(self, *, tenant_id, session_id, after_seq) -> list[AgentEvent]:
        return list(self._log(tenant_id, session_id).events[max(after_seq, 0):])

    async def watch_events(self, *, tenant_id, session_id, after_seq) -> AsyncIterator[AgentEvent]:
        log = self._log(tenant_id, session_id)
        cursor = after_seq
        while True:
            async with log.changed:
                await log.changed.wait_for(lambda: len(log.events) > cursor)
                fresh = log.events[cursor:]
            for event in fresh:
                yield event
            cursor += len(fresh)

    # ---- task queue ----------------------------------------------------------------------------
    async def enqueue_task(self, *, request_id, tenant_id, queue, payload_json, idempotency_key,
                           max_attempts, priority=0) -> TaskRecord:
        if idempotency_key and idempotency_key in self._task_keys:
            return self._tasks[self._task_keys[idempotency_key]].record
        task_id = uuid.uuid4().hex
        record = TaskRecord(task_id=task_id, tenant_id=tenant_id, payload_json=payload_json, state="READY",
                            create_time=time.time())
        self._tasks[task_id] = _Task(record, queue, max_attempts or 3)
        if idempotency_key:
            self._task_keys[idempotency_key] = task_id
        return record

    async def claim_tasks(self, *, queue, worker_id, max_tasks, lease_ms) -> list[TaskRecord]:
        now = self._clock()
        claimed = []
        for task in sorted(self._tasks.values(), key=lambda t: t.record.create_time):
            if len(claimed) >= max_tasks:
                break
            state = task.record.state
            expired = state == "LEASED" and task.lease_expires <= now
            if task.queue != queue or not (state == "READY" or expired):
                continue
            if task.record.attempts >= task.max_attempts:
                task.record = replace(task.record, state="DEAD", last_error="lease expired too often")
                continue
            task.record = replace(task.record, state="LEASED", attempts=task.record.attempts + 1,
                                  worker_id=worker_id, lease_token=uuid.uuid4().hex)
            task.lease_expires = now + lease_ms / 1000.0
            claimed.append(task.record)
        return claimed

    def _leased(self, task_id: str, lease_token: str) -> _Task:
        task = self._tasks.get(task_id)
        if task is None:
            raise NotFound(f"task {task_id!r} not found", reason="TASK_NOT_FOUND")
        if task.record.state != "LEASED" or task.record.lease_token != lease_token \
                or task.lease_expires <= self._clock():
            raise Aborted(f"task {task_id!r} is not leased with this token", reason="LEASE_LOST")
        return task

    async def heartbeat_task(self, *, task_id, lease_token, lease_ms) -> None:
        self._leased(task_id, lease_token).lease_expires = self._clock() + lease_ms / 1000.0

    async def ack_task(self, *, task_id, lease_token, result_json) -> None:
        task = self._leased(task_id, lease_token)
        task.record = replace(task.record, state="DONE", result_json=result_json)

    async def fail_task(self, *, task_id, lease_token, error, permanent) -> None:
        task = self._leased(task_id, lease_token)
        dead = permanent or task.record.attempts >= task.max_attempts
        task.record = replace(task.record, state="DEAD" if dead else "READY", last_error=error, lease_token="")

    async def get_task(self, *, tenant_id, task_id) -> TaskRecord:
        task = self._tasks.get(task_id)
        if task is None or task.record.tenant_id != tenant_id:
            raise NotFound(f"task {task_id!r} not found", reason="TASK_NOT_FOUND")
        return task.record

    # ---- session locks -------------------------------------------------------------------------
    async def acquire_session_lock(self, *, tenant_id, session_id, owner_id, lease_ms) -> SessionLockGrant:
        now = self._clock()
        holder = self._locks.get((tenant_id, session_id))
        if holder is not None and holder[0] != owner_id and holder[1] > now:
            return SessionLockGrant(acquired=False)
        self._locks[(tenant_id, session_id)] = (owner_id, now + lease_ms / 1000.0)
        log = self._sessions.get((tenant_id, session_id))
        return SessionLockGrant(acquired=True, next_event_seq=len(log.events) + 1 if log is not None else 1)

    async def release_session_lock(self, *, tenant_id, session_id, owner_id) -> None:
        holder = self._locks.get((tenant_id, session_id))
        if holder is not None and holder[0] == owner_id:
            del self._locks[(tenant_id, session_id)]
        elif holder is not None and holder[1] > self._clock():
            raise FailedPrecondition("lock held by another owner", reason="LOCK_NOT_HELD")
