"""StoreCore: one method per RPC; validates, then calls the repository.

Approvals and session controls have their own parts (``core.approvals``,
``core.controls``: core/approvals.py, core/session_controls.py), which follow
the same rule. Validation runs before any write, so a bad request changes
nothing.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from services.common.errors import NotFound, require
from services.common.paging import cursor_int, decode_token, encode_token, page_limit
from services.store.core import validation as check
from services.store.core.approvals import ApprovalRegistry
from services.store.core.event_writer import EventWriter
from services.store.core.models import (
    AuditRecord,
    EventRecord,
    LockResult,
    NewEvent,
    NewMessage,
    NewSession,
    NewTask,
    Page,
    SessionRecord,
    TaskRecord,
    TaskState,
)
from services.store.core.paging import page_after
from services.store.core.ports import StoreRepository
from services.store.core.session_controls import SessionControlBoard
from services.store.core.task_policy import RetryPolicy
from services.store.core.watch_hub import WatchHub
from services.store.core.webhooks import WebhookBook

Clock = Callable[[], int]
Row = TypeVar("Row")

# Entries one AppendAudit may carry (entry plus more_entries).
MAX_AUDIT_BATCH = 512


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class CoreOptions:
    default_max_attempts: int = 5
    retry: RetryPolicy = RetryPolicy()
    # Attempts of a webhook delivery before it is a dead letter.
    webhook_max_attempts: int = 8


class StoreCore:
    def __init__(self, repo: StoreRepository, writer: EventWriter, hub: WatchHub,
                 options: CoreOptions = CoreOptions(), clock: Clock = wall_clock_ms,
                 feed_hub: WatchHub | None = None) -> None:
        self.repo = repo
        self.writer = writer
        # Session event watches; feed_hub: the store-wide feeds (approvals, session controls).
        self.hub = hub
        self.feed_hub = feed_hub if feed_hub is not None else WatchHub()
        self.options = options
        self.clock = clock
        self.approvals = ApprovalRegistry(repo, self.feed_hub, clock)
        self.controls = SessionControlBoard(repo, self.feed_hub, clock)
        self.webhooks = WebhookBook(repo, clock, options.webhook_max_attempts)
        # Process-local first: contenders for one session's lock queue here
        # instead of all racing on the same database row.
        self._local_locks: dict[tuple[str, str], asyncio.Lock] = {}

    # -- sessions and messages -------------------------------------------------

    async def create_session(self, new: NewSession) -> tuple[SessionRecord, bool]:
        check.check_id(new.tenant_id, "tenant_id")
        check.check_id(new.session_id, "session_id", required=False)
        check.check_id(new.request_id, "request_id", required=False)
        check.check_title(new.title)
        check.check_json_object(new.metadata_json, "metadata_json")
        if not new.session_id:
            new = NewSession(new.tenant_id, uuid.uuid4().hex, new.title, new.metadata_json, new.request_id)
        return await self.repo.create_session(new, self.clock())

    async def get_session(self, tenant_id: str, session_id: str) -> SessionRecord:
        return await self._get_owned("session", tenant_id, session_id, self.repo.get_session)

    @staticmethod
    async def _get_owned(kind: str, tenant_id: str, ident: str,
                         get: Callable[[str, str], Awaitable[Row | None]]) -> Row:
        """The tenant's ``kind`` named ``ident`` (checked as ``<kind>_id``), read by ``get(tenant_id, ident)``."""
        check.check_id(tenant_id, "tenant_id")
        check.check_id(ident, f"{kind}_id")
        record = await get(tenant_id, ident)
        if record is None:
            # Same answer whether the id is unused or another tenant's.
            raise NotFound(f"{kind} {ident!r} not found", reason=f"{kind.upper()}_NOT_FOUND")
        return record

    async def list_sessions(self, tenant_id: str, page_size: int, page_token: str) -> Page:
        check.check_id(tenant_id, "tenant_id")
        limit = page_limit(page_size)
        cursor = decode_token(page_token, f"sessions:{tenant_id}")
        after = None
        if cursor is not None:
            require(isinstance(cursor, list) and len(cursor) == 2 and isinstance(cursor[1], str), "page_token",
                    "malformed")
            check.check_id(cursor[1], "page_token")
            after = (cursor_int(cursor[0]), cursor[1])
        rows = await self.repo.list_sessions(tenant_id, after, limit + 1)
        token = ""
        if len(rows) > limit:
            rows = rows[:limit]
            token = encode_token(f"sessions:{tenant_id}", [rows[-1].create_ms, rows[-1].session_id])
        return Page(rows, token)

    async def append_messages(self, tenant_id: str, session_id: str, messages: list[NewMessage],
                              request_id: str, fencing_token: int = 0) -> list[int]:
        check.check_id(tenant_id, "tenant_id")
        check.check_id(session_id, "session_id")
        check.check_id(request_id, "request_id", required=False)
        check.check_messages(messages)
        check.check_fencing_token(fencing_token)
        return await self.repo.append_messages(tenant_id, session_id, messages, request_id, self.clock(),
                                               fencing_token)

    async def list_messages(self, tenant_id: str, session_id: str, after_position: int, page_size: int,
                            page_token: str) -> Page:
        return await self._page_in_session("messages", tenant_id, session_id, after_position, "after_position",
                                           page_size, page_token, self.repo.list_messages, lambda row: row.position)

    async def _page_in_session(self, kind: str, tenant_id: str, session_id: str, after: int, after_field: str,
                               page_size: int, page_token: str,
                               read: Callable[[str, str, int, int], Awaitable[Sequence[Row]]],
                               position: Callable[[Row], int]) -> Page:
        """One page of a session's ``kind`` rows past ``after`` (a position or seq, named ``after_field``);
        ``read(tenant_id, session_id, after, limit)`` reads them once the session is known to exist."""
        check.check_id(tenant_id, "tenant_id")
        check.check_id(session_id, "session_id")
        check.check_seq(after, after_field)

        async def fetch(after: int, limit: int) -> Sequence[Row]:
            await self.get_session(tenant_id, session_id)
            return await read(tenant_id, session_id, after, limit)

        rows, token = await page_after(f"{kind}:{tenant_id}:{session_id}", after, page_size, page_token, fetch,
                                       position)
        return Page(rows, token)

    # -- events ----------------------------------------------------------------

    async def append_events(self, tenant_id: str, session_id: str, events: list[NewEvent],
                            request_id: str, *, no_drop: bool = False, fencing_token: int = 0) -> list[int]:
        """Seqs of ``events`` once committed. A non-zero ``fencing_token`` must still be the session
        lock's, checked in the transaction that writes (FAILED_PRECONDITION ``STALE_LOCK_OWNER``)."""
        check.check_id(tenant_id, "tenant_id")
        check.check_id(session_id, "session_id")
        check.check_id(request_id, "request_id", required=False)
        check.check_events(events)
        check.check_fencing_token(fencing_token)
        if request_id:
            # A retried request is idempotent even when its events carry no keys.
            events = [e if e.idempotency_key else
                      NewEvent(e.type, e.payload, f"{request_id}#{i}", e.schema_version)
                      for i, e in enumerate(events)]
        return await self.writer.append(tenant_id, session_id, events, no_drop=no_drop, fencing_token=fencing_token)

    async def read_events(self, tenant_id: str, session_id: str, after_seq: int, page_size: int,
                          page_token: str) -> Page:
        return await self._page_in_session("events", tenant_id, session_id, after_seq, "after_seq", page_size,
                                           page_token, self.repo.read_events, lambda row: row.seq)

    async def watch_events(self, tenant_id: str, session_id: str, after_seq: int,
                           batch: int = 500) -> AsyncIterator[EventRecord]:
        """Replay events after ``after_seq``, then follow commits until closed."""
        check.check_id(tenant_id, "tenant_id")
        check.check_id(session_id, "session_id")
        check.check_seq(after_seq, "after_seq")
        await self.get_session(tenant_id, session_id)
        cursor = after_seq
        with self.hub.subscribe(tenant_id, session_id) as subscription:
            while not self.hub.closed:
                rows = await self.repo.read_events(tenant_id, session_id, cursor, batch)
                for row in rows:
                    yield row
                    cursor = row.seq
                if len(rows) == batch:
                    continue
                # Woken by this replica's commits, and by the hub's shared
                # poller for appends committed by another store replica.
                await subscription.wait_beyond(cursor, None)

    # -- tasks -----------------------------------------------------------------

    async def enqueue_task(self, tenant_id: str, queue: str, priority: int, payload_json: str,
                           idempotency_key: str, max_attempts: int, request_id: str) -> tuple[TaskRecord, bool]:
        check.check_id(tenant_id, "tenant_id")
        check.check_id(queue, "queue")
        check.check_id(request_id, "request_id", required=False)
        check.check_id(idempotency_key, "idempotency_key", required=False)
        check.check_json_value(payload_json, "payload_json", max_bytes=check.MAX_CONTENT_BYTES)
        check.check_int(priority, "priority", -check.INT32_MAX - 1, check.INT32_MAX)
        require(max_attempts >= 0, "max_attempts", "must not be negative")
        require(max_attempts <= 1000, "max_attempts", "at most 1000")
        new = NewTask(tenant_id, queue, priority, payload_json, idempotency_key or request_id,
                      max_attempts or self.options.default_max_attempts)
        return await self.repo.enqueue_task(new, self.clock())

    async def claim_tasks(self, queue: str, worker_id: str, max_tasks: int, lease_ms: int,
                          request_id: str) -> list[TaskRecord]:
        check.check_id(queue, "queue")
        check.check_id(worker_id, "worker_id")
        check.check_id(request_id, "request_id", required=False)
        require(0 < max_tasks <= check.MAX_CLAIM, "max_tasks", f"must be between 1 and {check.MAX_CLAIM}")
        check.check_lease_ms(lease_ms)
        return await self.repo.claim_tasks(queue, worker_id, max_tasks, lease_ms, request_id, self.clock())

    async def heartbeat_task(self, task_id: str, lease_token: str, lease_ms: int) -> TaskRecord:
        self._check_lease_ref(task_id, lease_token)
        check.check_lease_ms(lease_ms)
        return await self.repo.heartbeat_task(task_id, lease_token, lease_ms, self.clock())

    async def ack_task(self, task_id: str, lease_token: str, result_json: str) -> TaskRecord:
        self._check_lease_ref(task_id, lease_token)
        check.check_json_value(result_json, "result_json", max_bytes=check.MAX_CONTENT_BYTES)
        return await self.repo.ack_task(task_id, lease_token, result_json, self.clock())

    async def fail_task(self, task_id: str, lease_token: str, error: str, permanent: bool) -> TaskRecord:
        self._check_lease_ref(task_id, lease_token)
        require(len(error) <= 64 * 1024, "error", "longer than 65536 characters")
        check.check_text(error, "error")
        return await self.repo.fail_task(task_id, lease_token, error, permanent, self.options.retry, self.clock())

    async def get_task(self, tenant_id: str, task_id: str) -> TaskRecord:
        return await self._get_owned("task", tenant_id, task_id, self.repo.get_task)

    async def cancel_task(self, tenant_id: str, task_id: str, reason: str) -> tuple[TaskRecord, TaskState]:
        check.check_id(tenant_id, "tenant_id")
        check.check_id(task_id, "task_id")
        require(len(reason) <= 1024, "reason", "longer than 1024 characters")
        check.check_text(reason, "reason")
        result = await self.repo.cancel_task(tenant_id, task_id, reason or "cancelled by request", self.clock())
        if result is None:
            raise NotFound(f"task {task_id!r} not found", reason="TASK_NOT_FOUND")
        return result

    @staticmethod
    def _check_lease_ref(task_id: str, lease_token: str) -> None:
        check.check_id(task_id, "task_id")
        check.check_id(lease_token, "lease_token")

    # -- session locks ---------------------------------------------------------

    async def acquire_session_lock(self, tenant_id: str, session_id: str, owner_id: str,
                                   lease_ms: int) -> LockResult:
        check.check_id(tenant_id, "tenant_id")
        check.check_id(session_id, "session_id")
        check.check_id(owner_id, "owner_id")
        check.check_lease_ms(lease_ms)
        async with self._local_lock(tenant_id, session_id):
            result = await self.repo.acquire_lock(tenant_id, session_id, owner_id, lease_ms, self.clock())
        next_seq = 0
        if result.acquired:
            # The holder is the session's only writer while its lease lasts, so
            # it can number its events from here without asking again.
            last = await self.repo.last_event_seqs([(tenant_id, session_id)])
            next_seq = last.get((tenant_id, session_id), 0) + 1
        return dataclasses.replace(result, next_event_seq=next_seq)

    async def release_session_lock(self, tenant_id: str, session_id: str, owner_id: str) -> bool:
        check.check_id(tenant_id, "tenant_id")
        check.check_id(session_id, "session_id")
        check.check_id(owner_id, "owner_id")
        async with self._local_lock(tenant_id, session_id):
            return await self.repo.release_lock(tenant_id, session_id, owner_id)

    @contextlib.asynccontextmanager
    async def _local_lock(self, tenant_id: str, session_id: str) -> AsyncIterator[None]:
        key = (tenant_id, session_id)
        lock = self._local_locks.setdefault(key, asyncio.Lock())
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and self._local_locks.get(key) is lock:
                del self._local_locks[key]

    # -- audit -----------------------------------------------------------------

    async def append_audit(self, entries: Sequence[AuditRecord]) -> list[AuditRecord]:
        """Append ``entries`` (one, or a run of consecutive entries of one chain) atomically."""
        require(len(entries) <= MAX_AUDIT_BATCH, "more_entries", f"at most {MAX_AUDIT_BATCH - 1} entries")
        for index, entry in enumerate(entries):
            name = "entry" if index == 0 else f"more_entries[{index - 1}]"
            check.check_id(entry.tenant_id, f"{name}.tenant_id")
            check.check_int(entry.seq, f"{name}.seq", 1, check.INT64_MAX)
            require(bool(entry.entry_hash), f"{name}.entry_hash", "is required")
            require(len(entry.entry_hash) <= 256 and len(entry.prev_hash) <= 256, f"{name}.entry_hash", "too long")
            check.check_text(entry.entry_hash, f"{name}.entry_hash")
            check.check_text(entry.prev_hash, f"{name}.prev_hash")
            require(entry.seq > 1 or not entry.prev_hash, f"{name}.prev_hash", "must be empty for the first entry")
            check.check_json_value(entry.payload_json, f"{name}.payload_json", max_bytes=check.MAX_CONTENT_BYTES)
            if index:
                before = entries[index - 1]
                require(entry.tenant_id == before.tenant_id and entry.seq == before.seq + 1
                        and entry.prev_hash == before.entry_hash, name,
                        "must follow the entry before it in the same chain (next seq, prev_hash = its hash)")
        return await self.repo.append_audit(entries, self.clock())

    async def get_audit_head(self, tenant_id: str) -> tuple[int, str]:
        check.check_id(tenant_id, "tenant_id")
        return await self.repo.audit_head(tenant_id)

    async def list_audit(self, tenant_id: str, after_seq: int, page_size: int, page_token: str) -> Page:
        check.check_id(tenant_id, "tenant_id")
        check.check_seq(after_seq, "after_seq")
        rows, token = await page_after(
            f"audit:{tenant_id}", after_seq, page_size, page_token,
            lambda after, limit: self.repo.list_audit(tenant_id, after, limit), lambda row: row.seq)
        return Page(rows, token)
