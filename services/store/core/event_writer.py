"""Batched event writer: many append requests, one transaction per flush.

A request is acknowledged only after the transaction holding its events has
committed, so an acknowledged event survives a crash of the store process.

Overflow policy, applied when more than ``max_pending_events`` wait:
- droppable events (token deltas) already queued are dropped oldest-first,
  then droppable events of the incoming request; each drop is counted;
- other events (final, tool_result, compaction, approval, ...), and every
  event of a request marked ``no_drop``, are never dropped: the request waits
  up to ``block_timeout_ms`` for room, then fails with RESOURCE_EXHAUSTED
  having written nothing.
"""
from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from services.common.errors import DomainError, ResourceExhausted, Unavailable
from services.store.core.models import EventAppend, NewEvent

log = logging.getLogger("llmesh.store.events")

# Flush one batch; per append, the seqs assigned or the error it alone hit.
FlushFn = Callable[[list[EventAppend]], Awaitable[list["list[int] | DomainError"]]]
# Called after a commit with (tenant_id, session_id, last_seq) per session touched.
CommitFn = Callable[[list[tuple[str, str, int]]], None]


@dataclass(eq=False)
class _Pending:
    tenant_id: str
    session_id: str
    events: list[NewEvent]
    droppable: list[bool]
    future: asyncio.Future
    dropped: list[bool] = field(default_factory=list)
    taken: bool = False
    fencing_token: int = 0

    @property
    def num_live(self) -> int:
        return len(self.events) - sum(self.dropped)


class EventWriter:
    def __init__(
        self,
        flush: FlushFn,
        *,
        max_batch_events: int = 256,
        max_batch_delay_ms: float = 2.0,
        max_pending_events: int = 20_000,
        block_timeout_ms: int = 5_000,
        droppable_types: Sequence[str] = ("token",),
        on_commit: CommitFn | None = None,
        on_drop: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch_events < 1 or max_pending_events < max_batch_events:
            raise ValueError("need 1 <= max_batch_events <= max_pending_events")
        self._flush = flush
        self._max_batch = max_batch_events
        self._delay_s = max(0.0, max_batch_delay_ms) / 1000
        self._max_pending = max_pending_events
        self._block_timeout_s = block_timeout_ms / 1000
        self._droppable_types = frozenset(droppable_types)
        self._on_commit = on_commit
        self._on_drop = on_drop
        self._queue: collections.deque[_Pending] = collections.deque()
        # (request, index) of queued droppable events, oldest first.
        self._drop_order: collections.deque[tuple[_Pending, int]] = collections.deque()
        self._num_pending = 0
        self._has_work = asyncio.Event()
        self._batch_full = asyncio.Event()
        self._room = asyncio.Condition()
        self._closing = False
        self._task: asyncio.Task | None = None
        self.num_dropped = 0
        self.num_flushes = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="event-writer")

    async def close(self) -> None:
        """Stop taking appends, flush what is queued, then stop."""
        self._closing = True
        self._has_work.set()
        self._batch_full.set()
        if self._task is not None:
            await self._task
        async with self._room:
            self._room.notify_all()

    @property
    def num_pending(self) -> int:
        return self._num_pending

    @property
    def max_pending(self) -> int:
        return self._max_pending

    async def append(self, tenant_id: str, session_id: str, events: list[NewEvent], *,
                     no_drop: bool = False, fencing_token: int = 0) -> list[int]:
        """Seqs of ``events`` in order once committed; 0 for a dropped token delta.

        ``no_drop``: the caller numbered these events itself and live readers
        already saw them, so a drop would make the stored log differ; such a
        request waits for room like a critical event. ``fencing_token`` goes
        to the flush with the request, which checks it in the transaction
        and fails this request alone when it is stale.
        """
        if self._closing:
            raise Unavailable("store is shutting down", reason="STORE_CLOSING")
        droppable = [not no_drop and e.type in self._droppable_types for e in events]
        pending = _Pending(tenant_id, session_id, list(events), droppable,
                           asyncio.get_running_loop().create_future(), dropped=[False] * len(events),
                           fencing_token=fencing_token)
        await self._make_room(pending)
        if pending.num_live == 0:
            return [0] * len(events)
        self._queue.append(pending)
        self._num_pending += pending.num_live
        self._drop_order.extend((pending, i) for i, d in enumerate(droppable) if d and not pending.dropped[i])
        self._has_work.set()
        if self._num_pending >= self._max_batch:
            self._batch_full.set()
        return await pending.future

    async def _make_room(self, pending: _Pending) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._block_timeout_s
        async with self._room:
            while True:
                need = self._num_pending + len(pending.events) - self._max_pending
                if need <= 0:
                    return
                queued_droppable = sum(1 for p, i in self._drop_order if not p.taken and not p.dropped[i])
                own_droppable = sum(pending.droppable)
                if need <= queued_droppable + own_droppable:
                    need = self._drop_queued(need)
                    self._drop_own(pending, need)
                    return
                remaining = deadline - loop.time()
                if remaining <= 0 or self._closing:
                    raise ResourceExhausted(
                        "event queue full: critical events are never dropped, retry later",
                        reason="EVENT_QUEUE_FULL", retry_after_ms=max(1, int(self._delay_s * 1000) * 4))
                try:
                    await asyncio.wait_for(self._room.wait(), remaining)
                except TimeoutError:
                    continue

    def _drop_queued(self, need: int) -> int:
        num = 0
        while need > 0 and self._drop_order:
            request, index = self._drop_order.popleft()
            if request.taken or request.dropped[index]:
                continue
            request.dropped[index] = True
            self._num_pending -= 1
            need -= 1
            num += 1
        self._count_drops(num)
        return need

    def _drop_own(self, pending: _Pending, need: int) -> None:
        num = 0
        for i, droppable in enumerate(pending.droppable):
            if need <= 0:
                break
            if droppable:
                pending.dropped[i] = True
                need -= 1
                num += 1
        self._count_drops(num)

    def _count_drops(self, num: int) -> None:
        if num:
            self.num_dropped += num
            if self._on_drop is not None:
                self._on_drop(num)

    async def _run(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._has_work.clear()
                await self._has_work.wait()
                continue
            if self._delay_s > 0 and self._num_pending < self._max_batch and not self._closing:
                try:
                    await asyncio.wait_for(self._batch_full.wait(), self._delay_s)
                except TimeoutError:
                    pass
            batch = self._take_batch()
            if self._num_pending < self._max_batch and not self._closing:
                self._batch_full.clear()
            await self._write(batch)

    def _take_batch(self) -> list[_Pending]:
        batch: list[_Pending] = []
        num = 0
        # Whole requests only, so a request's events commit together.
        while self._queue and (not batch or num + self._queue[0].num_live <= self._max_batch):
            request = self._queue.popleft()
            request.taken = True
            num += request.num_live
            batch.append(request)
        self._num_pending -= num
        return batch

    async def _write(self, batch: list[_Pending]) -> None:
        async with self._room:
            self._room.notify_all()
        appends = [EventAppend(p.tenant_id, p.session_id,
                               [e for e, d in zip(p.events, p.dropped, strict=True) if not d], p.fencing_token)
                   for p in batch]
        try:
            results = await self._flush(appends)
        except Exception as exc:
            log.warning("event flush failed", exc_info=exc)
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        self.num_flushes += 1
        committed: dict[tuple[str, str], int] = {}
        for p, result in zip(batch, results, strict=True):
            if p.future.done():
                continue
            if isinstance(result, BaseException):
                p.future.set_exception(result)
                continue
            seqs = iter(result)
            p.future.set_result([0 if d else next(seqs) for d in p.dropped])
            key = (p.tenant_id, p.session_id)
            if result:
                committed[key] = max(committed.get(key, 0), max(result))
        if self._on_commit is not None and committed:
            self._on_commit([(t, s, seq) for (t, s), seq in committed.items()])
