"""An in-process StorePort: the store's contract kept in dicts.

For a single-process orchestrator (development, benchmarks) and for tests of
the core. It keeps the rules the real store keeps, and the store contract
suite (tests/orchestrator/store_contract.py) holds it to them: gapless seqs
with idempotency keys, leased task claims that expire, failed attempts that
wait out an exponential backoff and die after `max_attempts`, leased session
locks with fencing tokens that fence appends, and session controls with a
live watch. Where the store sweeps expired task leases in the background,
this store sweeps them before every task operation; a lock whose lease ran
out counts as free. Nothing survives the process.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial

from services.common.errors import FailedPrecondition, NotFound, require
from services.common.paging import cursor_int, decode_token, encode_token, page_limit
from services.orchestrator.core.events import AgentEvent
from services.orchestrator.core.lock_lease import STALE_LOCK_OWNER
from services.orchestrator.core.ports import (
    CONTROL_KINDS,
    ControlsLive,
    MessageRecord,
    SessionControl,
    SessionLockGrant,
    SessionRecord,
    TaskRecord,
)

# What the store accepts as a message role.
MESSAGE_ROLES = frozenset({"user", "assistant", "system", "tool", "summary"})
MAX_ATTEMPTS_LIMIT = 1000
MAX_CLAIM = 1000


@dataclass(frozen=True)
class TaskRetry:
    """Default attempts and the backoff after a failed one (the store's settings of the same name)."""

    default_max_attempts: int = 5
    backoff_base_ms: int = 1_000
    backoff_max_ms: int = 300_000

    def backoff_s(self, attempts: int) -> float:
        """Exponential: base, 2*base, 4*base, ... capped at backoff_max_ms."""
        exponent = min(max(0, attempts - 1), 40)
        return min(self.backoff_max_ms, self.backoff_base_ms * 2 ** exponent) / 1000.0


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
    priority: int
    max_attempts: int
    order: int
    lease_expires: float = 0.0
    run_after: float = 0.0


@dataclass
class _Lock:
    owner_id: str = ""
    expires: float = 0.0
    fencing_token: int = 0


def _lease_lost(task_id: str) -> FailedPrecondition:
    return FailedPrecondition(f"task {task_id!r}: lease token does not hold the current lease",
                              reason="LEASE_LOST", field="lease_token")


def _grown_past(log: _SessionLog, seq: int) -> bool:
    return len(log.events) > seq


def _control_matches(control: SessionControl, tenant_id: str, session_id: str) -> bool:
    return (not tenant_id or control.tenant_id == tenant_id) and (not session_id or control.session_id == session_id)


def _listing_key(record: SessionRecord) -> tuple[int, str]:
    return int(record.create_time * 1e6), record.session_id


def _require_id(value: str, name: str) -> None:
    require(bool(value), name, "is required")


class MemoryStore:
    def __init__(self, clock: Callable[[], float] = time.monotonic, retry: TaskRetry = TaskRetry()) -> None:
        self._clock = clock
        self._retry = retry
        self._sessions: dict[tuple[str, str], _SessionLog] = {}
        self._session_requests: dict[tuple[str, str], str] = {}
        self._tasks: dict[str, _Task] = {}
        self._task_keys: dict[tuple[str, str, str], str] = {}
        self._leased: set[str] = set()
        self._order = itertools.count()
        self._locks: dict[tuple[str, str], _Lock] = {}
        self.num_event_appends = 0
        self._controls: list[SessionControl] = []
        self._control_requests: dict[tuple[str, str], SessionControl] = {}
        self._controls_changed = asyncio.Condition()

    def _log(self, tenant_id: str, session_id: str) -> _SessionLog:
        _require_id(tenant_id, "tenant_id")
        _require_id(session_id, "session_id")
        log = self._sessions.get((tenant_id, session_id))
        if log is None:
            raise NotFound(f"session {session_id!r} not found", reason="SESSION_NOT_FOUND")
        return log

    # ---- sessions and messages -----------------------------------------------------------------
    async def create_session(self, *, request_id, tenant_id, title, metadata) -> SessionRecord:
        _require_id(tenant_id, "tenant_id")
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
        _require_id(tenant_id, "tenant_id")
        limit = page_limit(page_size)
        scope = f"sessions:{tenant_id}"
        cursor = decode_token(page_token, scope)
        records = sorted((log.record for (t, _s), log in self._sessions.items() if t == tenant_id), key=_listing_key)
        if cursor is not None:
            require(isinstance(cursor, list) and len(cursor) == 2 and isinstance(cursor[1], str), "page_token",
                    "malformed")
            after = (cursor_int(cursor[0]), cursor[1])
            records = [r for r in records if _listing_key(r) > after]
        page = records[:limit]
        if len(records) <= limit:
            return page, ""
        return page, encode_token(scope, list(_listing_key(page[-1])))

    def _check_fence(self, tenant_id: str, session_id: str, fencing_token: int) -> None:
        """Refuse a writer whose lock changed hands since it got `fencing_token` (0: unfenced)."""
        require(fencing_token >= 0, "fencing_token", "must not be negative")
        if not fencing_token:
            return
        lock = self._locks.get((tenant_id, session_id))
        if lock is None or lock.fencing_token != fencing_token:
            raise FailedPrecondition(f"session {session_id!r}: the session lock changed hands since fencing "
                                     f"token {fencing_token}", reason=STALE_LOCK_OWNER, field="fencing_token")

    async def append_messages(self, *, request_id, tenant_id, session_id, messages, fencing_token=0) -> list[int]:
        log = self._log(tenant_id, session_id)
        require(len(messages) > 0, "messages", "at least one message is required")
        for i, message in enumerate(messages):
            require(message.role in MESSAGE_ROLES, f"messages[{i}].role", f"must be one of {sorted(MESSAGE_ROLES)}")
            require(message.num_tokens >= 0, f"messages[{i}].num_tokens", "must not be negative")
        self._check_fence(tenant_id, session_id, fencing_token)
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
        require(after_position >= 0, "after_position", "must not be negative")
        return [m for m in self._log(tenant_id, session_id).messages if m.position > after_position]

    # ---- events --------------------------------------------------------------------------------
    async def append_events(self, *, request_id, tenant_id, session_id, events: Sequence[AgentEvent],
                            idempotency_keys: Sequence[str], fencing_token: int = 0) -> list[int]:
        log = self._log(tenant_id, session_id)
        require(len(events) > 0, "events", "at least one event is required")
        for i, event in enumerate(events):
            require(bool(event.type), f"events[{i}].type", "is required")
        self._check_fence(tenant_id, session_id, fencing_token)
        keys = list(idempotency_keys) + [""] * (len(events) - len(idempotency_keys))
        if request_id:
            # A retried request is idempotent even when its events carry no keys.
            keys = [key or f"{request_id}#{i}" for i, key in enumerate(keys)]
        self.num_event_appends += 1
        seqs = []
        # keys is padded to at least one per event; surplus keys match no event.
        for event, key in zip(events, keys, strict=False):
            if key and key in log.event_keys:
                seqs.append(log.event_keys[key])
                continue
            seq = len(log.events) + 1
            log.events.append(replace(event, session_id=session_id, seq=seq))
            if key:
                log.event_keys[key] = seq
            seqs.append(seq)
        async with log.changed:
            log.changed.notify_all()
        return seqs

    async def read_events(self, *, tenant_id, session_id, after_seq) -> list[AgentEvent]:
        require(after_seq >= 0, "after_seq", "must not be negative")
        return list(self._log(tenant_id, session_id).events[after_seq:])

    async def watch_events(self, *, tenant_id, session_id, after_seq) -> AsyncIterator[AgentEvent]:
        require(after_seq >= 0, "after_seq", "must not be negative")
        log = self._log(tenant_id, session_id)
        cursor = after_seq
        while True:
            async with log.changed:
                await log.changed.wait_for(partial(_grown_past, log, cursor))
                fresh = log.events[cursor:]
            for event in fresh:
                yield event
            cursor += len(fresh)

    # ---- task queue ----------------------------------------------------------------------------
    async def enqueue_task(self, *, request_id, tenant_id, queue, payload_json, idempotency_key,
                           max_attempts, priority=0) -> TaskRecord:
        _require_id(tenant_id, "tenant_id")
        _require_id(queue, "queue")
        try:
            json.loads(payload_json)
        except ValueError:
            require(False, "payload_json", "must be JSON")
        require(0 <= max_attempts <= MAX_ATTEMPTS_LIMIT, "max_attempts", f"must be between 0 and {MAX_ATTEMPTS_LIMIT}")
        key = (tenant_id, queue, idempotency_key or request_id)
        if key[2] and key in self._task_keys:
            return self._tasks[self._task_keys[key]].record
        now = self._clock()
        record = TaskRecord(task_id=uuid.uuid4().hex, tenant_id=tenant_id, payload_json=payload_json, state="READY",
                            create_time=time.time())
        self._tasks[record.task_id] = _Task(record, queue, priority, max_attempts or self._retry.default_max_attempts,
                                            next(self._order), run_after=now)
        if key[2]:
            self._task_keys[key] = record.task_id
        return record

    async def claim_tasks(self, *, queue, worker_id, max_tasks, lease_ms) -> list[TaskRecord]:
        _require_id(queue, "queue")
        _require_id(worker_id, "worker_id")
        require(0 < max_tasks <= MAX_CLAIM, "max_tasks", f"must be between 1 and {MAX_CLAIM}")
        require(lease_ms > 0, "lease_ms", "must be positive")
        now = self._sweep()
        ready = sorted((t for t in self._tasks.values()
                        if t.queue == queue and t.record.state == "READY" and t.run_after <= now),
                       key=lambda t: (t.priority, t.run_after, t.order))
        claimed = []
        for task in ready[:max_tasks]:
            task.record = replace(task.record, state="LEASED", attempts=task.record.attempts + 1,
                                  worker_id=worker_id, lease_token=uuid.uuid4().hex)
            task.lease_expires = now + lease_ms / 1000.0
            self._leased.add(task.record.task_id)
            claimed.append(task.record)
        return claimed

    def _sweep(self) -> float:
        """Expired leases count as a failed attempt and void their token, as the store's sweeper does."""
        now = self._clock()
        for task_id in [t for t in self._leased if self._tasks[t].lease_expires < now]:
            task = self._tasks[task_id]
            self._leased.discard(task_id)
            if task.record.attempts >= task.max_attempts:
                task.record = replace(task.record, state="DEAD", lease_token="", last_error="lease expired")
            else:
                task.record = replace(task.record, state="READY", lease_token="", worker_id="",
                                      last_error="lease expired")
                task.run_after = now
        return now

    def _owned(self, task_id: str, lease_token: str) -> _Task:
        _require_id(task_id, "task_id")
        _require_id(lease_token, "lease_token")
        self._sweep()
        task = self._tasks.get(task_id)
        if task is None:
            raise NotFound(f"task {task_id!r} not found", reason="TASK_NOT_FOUND")
        if task.record.lease_token != lease_token:
            raise _lease_lost(task_id)
        return task

    async def heartbeat_task(self, *, task_id, lease_token, lease_ms) -> None:
        require(lease_ms > 0, "lease_ms", "must be positive")
        task = self._owned(task_id, lease_token)
        if task.record.state != "LEASED":
            raise _lease_lost(task_id)
        task.lease_expires = self._clock() + lease_ms / 1000.0

    async def ack_task(self, *, task_id, lease_token, result_json) -> None:
        task = self._owned(task_id, lease_token)
        if task.record.state == "DONE":
            return  # a retried ack
        if task.record.state != "LEASED":
            raise _lease_lost(task_id)
        task.record = replace(task.record, state="DONE", result_json=result_json)
        self._leased.discard(task_id)

    async def fail_task(self, *, task_id, lease_token, error, permanent) -> None:
        task = self._owned(task_id, lease_token)
        if task.record.state in ("READY", "DEAD"):
            return  # a retried fail
        if task.record.state != "LEASED":
            raise _lease_lost(task_id)
        self._leased.discard(task_id)
        now = self._clock()
        if permanent or task.record.attempts >= task.max_attempts:
            task.record = replace(task.record, state="DEAD", last_error=error)
            return
        task.record = replace(task.record, state="READY", last_error=error)
        task.run_after = now + self._retry.backoff_s(task.record.attempts)

    async def get_task(self, *, tenant_id, task_id) -> TaskRecord:
        _require_id(tenant_id, "tenant_id")
        _require_id(task_id, "task_id")
        self._sweep()
        task = self._tasks.get(task_id)
        if task is None or task.record.tenant_id != tenant_id:
            raise NotFound(f"task {task_id!r} not found", reason="TASK_NOT_FOUND")
        return task.record

    async def cancel_task(self, *, tenant_id, task_id, reason) -> tuple[TaskRecord, str]:
        record = await self.get_task(tenant_id=tenant_id, task_id=task_id)
        previous = record.state
        if previous in ("DONE", "DEAD"):
            raise FailedPrecondition(f"task {task_id!r} has already ended ({previous})", reason="TASK_ENDED",
                                     field="task_id")
        task = self._tasks[task_id]
        if previous != "CANCELLED":
            task.record = replace(record, state="CANCELLED", lease_token="", last_error=reason)
            self._leased.discard(task_id)
        return task.record, previous

    # ---- session locks -------------------------------------------------------------------------
    async def acquire_session_lock(self, *, tenant_id, session_id, owner_id, lease_ms) -> SessionLockGrant:
        _require_id(tenant_id, "tenant_id")
        _require_id(session_id, "session_id")
        _require_id(owner_id, "owner_id")
        require(lease_ms > 0, "lease_ms", "must be positive")
        now = self._clock()
        lock = self._locks.setdefault((tenant_id, session_id), _Lock())
        lapsed = not lock.owner_id or lock.expires <= now
        if lock.owner_id != owner_id and not lapsed:
            return SessionLockGrant(acquired=False, fencing_token=lock.fencing_token, holder_id=lock.owner_id)
        if lock.owner_id != owner_id or lapsed:
            lock.fencing_token += 1  # the lock changes hands, or lapsed meanwhile
        lock.owner_id, lock.expires = owner_id, now + lease_ms / 1000.0
        log = self._sessions.get((tenant_id, session_id))
        return SessionLockGrant(acquired=True, next_event_seq=len(log.events) + 1 if log is not None else 1,
                                fencing_token=lock.fencing_token)

    async def release_session_lock(self, *, tenant_id, session_id, owner_id) -> bool:
        _require_id(tenant_id, "tenant_id")
        _require_id(session_id, "session_id")
        _require_id(owner_id, "owner_id")
        lock = self._locks.get((tenant_id, session_id))
        if lock is None or lock.owner_id != owner_id or lock.expires <= self._clock():
            return False
        lock.owner_id, lock.expires = "", 0.0
        return True

    # ---- session controls ----------------------------------------------------------------------
    async def post_session_control(self, *, request_id, control: SessionControl) -> SessionControl:
        _require_id(control.tenant_id, "control.tenant_id")
        _require_id(control.session_id, "control.session_id")
        require(control.kind in CONTROL_KINDS, "control.kind", f"must be one of {', '.join(CONTROL_KINDS)}")
        self._log(control.tenant_id, control.session_id)
        if request_id and (control.tenant_id, request_id) in self._control_requests:
            return self._control_requests[(control.tenant_id, request_id)]
        stored = replace(control, seq=len(self._controls) + 1, create_time=time.time())
        self._controls.append(stored)
        if request_id:
            self._control_requests[(control.tenant_id, request_id)] = stored
        async with self._controls_changed:
            self._controls_changed.notify_all()
        return stored

    def _controls_past(self, seq: int) -> bool:
        return len(self._controls) > seq

    async def watch_session_controls(self, *, after_seq=0, from_now=False, tenant_id="",
                                     session_id="") -> AsyncIterator[SessionControl | ControlsLive]:
        require(after_seq >= 0, "after_seq", "must not be negative")
        require(not (from_now and after_seq), "after_seq", "must be 0 with from_now")
        cursor = len(self._controls) if from_now else after_seq
        yield ControlsLive(seq=len(self._controls))  # live; the replay after after_seq follows
        while True:
            async with self._controls_changed:
                await self._controls_changed.wait_for(partial(self._controls_past, cursor))
                fresh = self._controls[cursor:]
            cursor += len(fresh)
            for control in fresh:
                if _control_matches(control, tenant_id, session_id):
                    yield control
