"""EventHub: per-session live broadcast, batched store writes, gapless replay.

The replica running a session's turn holds the session's store lock, so it is
the only writer of the session's events. The lock grant says which seq the
session's next event gets, so the run's first event is numbered here and
written with the first batch (a store that does not say gets the first event
appended at once, its reply giving the seq). Every later event gets the
following seq here, goes to live subscribers at once and reaches the store in
batches. Each stored event carries the idempotency key ``<run_id>:<seq>``, so
a retried batch never duplicates.

A run may hold its terminal event's store write behind other work
(`hold_terminal`): the run's messages are written in the background, and a
stored final event promises they are stored too.

Every store write carries the run's lock fencing token (`LockLease`). A
refused write means another replica holds the session now: the stream is
fenced, so it writes and publishes nothing more, and followers that were
shown events the store never got are told so (ABORTED, reason
RUN_OWNERSHIP_LOST, naming the last stored seq) instead of silently
continuing with the new owner's events under the same seqs.

`follow()` gives a client every event after its cursor exactly once: with a
run live on this replica it subscribes first, then reads the store, then the
run's in-memory buffer, then live events, skipping seqs already given; with
none it follows the store's watch (runs on other replicas).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field

from services.common.errors import Aborted, Unavailable
from services.orchestrator.core.events import AgentEvent
from services.orchestrator.core.lock_lease import LeaseFenced, LockLease, write_fenced
from services.orchestrator.core.ports import StorePort
from services.orchestrator.core.retry import RetryPolicy, with_retries

log = logging.getLogger("llmesh.orchestrator.events")

_RUN_ENDED = None
# Store writes of events are retried longer than other calls: a lost batch is a gap.
DEFAULT_RETRY = RetryPolicy(max_attempts=6)
# A store watch that stayed up this long before it broke starts the count of failures in a row over.
WATCH_STABLE_S = 5.0


@contextlib.asynccontextmanager
async def _closing(events: AsyncIterator[AgentEvent]) -> AsyncGenerator[None, None]:
    """Close an event source when the follower stops, whether or not it ran dry."""
    try:
        yield
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()


@dataclass
class RunStream:
    """The live part of one run's events on this replica."""

    tenant_id: str
    session_id: str
    run_id: str
    first_seq: int
    next_seq: int
    buffer: list[AgentEvent] = field(default_factory=list)
    subscribers: set[asyncio.Queue] = field(default_factory=set)
    pending: list[AgentEvent] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    flusher: asyncio.Task | None = None
    closing: bool = False
    num_flushes: int = 0
    # Awaited before the batch holding the terminal event is written.
    before_terminal: asyncio.Future | None = None
    # The session's previous run on this replica, still writing its tail: this
    # run's events reach the store only after it, and followers read its buffer.
    predecessor: RunStream | None = None
    # The run's hold on the session lock; its fencing token goes with every write.
    lease: LockLease | None = None
    # Last seq the store has (or had before this run) of this session, as far as this stream knows.
    stored_seq: int = 0

    @property
    def num_predecessors(self) -> int:
        num, stream = 0, self.predecessor
        while stream is not None:
            num, stream = num + 1, stream.predecessor
        return num

    def unstored_earlier(self) -> list[AgentEvent]:
        """Events of the runs before this one whose tails may not be stored yet, in order."""
        chain, stream = [], self.predecessor
        while stream is not None:
            chain.append(stream)
            stream = stream.predecessor
        return [event for earlier in reversed(chain) for event in earlier.buffer]

    @property
    def last_seq(self) -> int:
        return self.next_seq - 1

    @property
    def fenced(self) -> bool:
        """The store refused a write of this lock: another replica owns the session, nothing more goes out."""
        return self.lease is not None and self.lease.fenced

    def known_stored_seq(self) -> int:
        """The last seq known stored: this run's writes, else the earlier runs' it follows."""
        earlier = self.predecessor.known_stored_seq() if self.predecessor is not None else 0
        return max(self.stored_seq, earlier)


class RunOwnershipLost(Aborted):
    """This replica lost the session's run to another; events after `last_stored_seq` were never stored."""

    default_reason = "RUN_OWNERSHIP_LOST"

    def __init__(self, session_id: str, last_stored_seq: int) -> None:
        super().__init__(f"session {session_id!r}: the replica running this turn lost the session to another; "
                         f"events after seq {last_stored_seq} were not stored, Resume after it",
                         metadata={"last_stored_seq": str(last_stored_seq)})
        self.last_stored_seq = last_stored_seq


class EventHub:
    def __init__(self, store: StorePort, *, batch_interval_s: float = 0.02, batch_max: int = 64,
                 retry: RetryPolicy = DEFAULT_RETRY) -> None:
        self._store = store
        self._batch_interval_s = batch_interval_s
        self._batch_max = batch_max
        self._retry = retry
        self._rng = random.Random()
        self._live: dict[str, RunStream] = {}
        # Called with every stamped event (metrics); must not block or raise.
        self._observers: list[Callable[[AgentEvent], None]] = []

    def add_observer(self, observer: Callable[[AgentEvent], None]) -> None:
        self._observers.append(observer)

    def _observe(self, event: AgentEvent) -> None:
        for observer in self._observers:
            observer(event)

    def live_run(self, session_id: str) -> RunStream | None:
        return self._live.get(session_id)

    async def open_run(self, first: AgentEvent, tenant_id: str, *, next_seq: int = 0,
                       after: RunStream | None = None,
                       lease: LockLease | None = None) -> tuple[RunStream, AgentEvent]:
        """Number the run's first event; its seq anchors the rest.

        `next_seq` is the session's next seq from the lock grant: the first
        event then goes to the store with the first batch. Without it (0) the
        first event is appended synchronously and the store's reply gives it.
        `after`: the session's previous run here, whose last event is out but
        whose store writes may not be; this run takes over from it.
        `lease`: the run's lock lease, whose fencing token every write carries.
        """
        if self._live.get(first.session_id) not in (None, after):
            raise RuntimeError(f"session {first.session_id} already has a live run here")
        if after is not None:
            next_seq = after.next_seq
        if next_seq > 0:
            seq, pending = next_seq, True
        else:
            (seq,) = await with_retries(lambda: write_fenced(lease, lambda token: self._store.append_events(
                request_id=f"{first.run_id}:open", tenant_id=tenant_id, session_id=first.session_id,
                events=[first], idempotency_keys=[f"{first.run_id}:first"], fencing_token=token)), self._retry)
            pending = False
        stamped = first.with_seq(seq)
        stream = RunStream(tenant_id=tenant_id, session_id=first.session_id, run_id=first.run_id,
                           first_seq=seq, next_seq=seq + 1, buffer=[stamped],
                           pending=[stamped] if pending else [], predecessor=after, lease=lease,
                           stored_seq=seq - 1 if pending else seq)
        if pending:
            stream.wake.set()
        stream.flusher = asyncio.create_task(self._flush_loop(stream), name=f"events-{first.run_id}")
        self._live[first.session_id] = stream
        self._observe(stamped)
        return stream, stamped

    def publish(self, stream: RunStream, event: AgentEvent) -> AgentEvent:
        """Stamp the next seq and broadcast; the store gets it with the next batch.

        A fenced stream publishes nothing: the event is returned unnumbered.
        """
        if stream.fenced:
            return event
        if stream.closing:
            raise RuntimeError("run stream is closed")
        stamped = event.with_seq(stream.next_seq)
        stream.next_seq += 1
        stream.buffer.append(stamped)
        stream.pending.append(stamped)
        for queue in stream.subscribers:
            queue.put_nowait(stamped)
        stream.wake.set()
        self._observe(stamped)
        return stamped

    @staticmethod
    def hold_terminal(stream: RunStream, work: asyncio.Future) -> None:
        """Write the run's terminal event only after `work` is done.

        Live subscribers still get the event at once; only its store write
        waits, so a stored terminal event means `work` (the run's message
        writes) is stored too. A failure of `work` is logged and the terminal
        event is still written, so the stored log stays what live clients saw.
        """
        stream.before_terminal = work

    async def close_run(self, stream: RunStream) -> None:
        """Flush everything, then hand followers over to the store."""
        stream.closing = True
        stream.wake.set()
        if stream.flusher is not None:
            try:
                await stream.flusher
            except Exception:
                pass
        if self._live.get(stream.session_id) is stream:
            del self._live[stream.session_id]
        for queue in stream.subscribers:
            queue.put_nowait(_RUN_ENDED)

    async def _flush_loop(self, stream: RunStream) -> None:
        try:
            await self._flush(stream)
        except LeaseFenced:
            self._fence(stream)

    def _fence(self, stream: RunStream) -> None:
        log.warning("run fenced: its unstored events are dropped", extra={
            "session_id": stream.session_id, "run_id": stream.run_id, "last_stored_seq": stream.known_stored_seq(),
            "num_dropped": len(stream.pending)})
        stream.pending.clear()

    async def _flush(self, stream: RunStream) -> None:
        predecessor = stream.predecessor
        if predecessor is not None and predecessor.flusher is not None:
            # Seqs continue the previous run's: its events go to the store first.
            with contextlib.suppress(Exception):
                await asyncio.shield(predecessor.flusher)
            if stream.fenced:
                raise LeaseFenced("the lock was taken over while the previous run wrote")
            stream.stored_seq = max(stream.stored_seq, predecessor.known_stored_seq())
        stream.predecessor = None  # stored now; followers read it from the store
        while True:
            await stream.wake.wait()
            stream.wake.clear()
            if not stream.closing and len(stream.pending) < self._batch_max:
                # Let a burst of tokens gather into one store write.
                try:
                    await asyncio.wait_for(self._closing_or_full(stream), self._batch_interval_s)
                except TimeoutError:
                    pass
            while stream.pending:
                batch = stream.pending[: self._batch_max]
                if stream.before_terminal is not None:
                    terminal = next((i for i, e in enumerate(batch) if e.is_terminal), None)
                    if terminal == 0:
                        await self._wait_before_terminal(stream)
                    elif terminal is not None:
                        batch = batch[:terminal]  # what precedes it need not wait
                try:
                    await self._write(stream, batch)
                except LeaseFenced:
                    raise
                except Exception:
                    log.exception("event batch lost", extra={"session_id": stream.session_id,
                                                             "first_seq": batch[0].seq})
                    raise
                del stream.pending[: len(batch)]
            if stream.closing:
                return

    @staticmethod
    async def _wait_before_terminal(stream: RunStream) -> None:
        work, stream.before_terminal = stream.before_terminal, None
        if work is None:
            return
        try:
            await work
        except Exception:
            log.error("work held before the terminal event failed", exc_info=True,
                      extra={"session_id": stream.session_id, "run_id": stream.run_id})

    async def _closing_or_full(self, stream: RunStream) -> None:
        while not stream.closing and len(stream.pending) < self._batch_max:
            await stream.wake.wait()
            stream.wake.clear()

    async def _write(self, stream: RunStream, batch: list[AgentEvent]) -> None:
        seqs = await with_retries(lambda: write_fenced(stream.lease, lambda token: self._store.append_events(
            request_id=f"{stream.run_id}:{batch[0].seq}", tenant_id=stream.tenant_id,
            session_id=stream.session_id, events=batch,
            idempotency_keys=[f"{stream.run_id}:{e.seq}" for e in batch], fencing_token=token)), self._retry)
        stream.num_flushes += 1
        stream.stored_seq = max(stream.stored_seq, batch[-1].seq)
        if list(seqs) != [e.seq for e in batch]:
            # Only possible if another writer ignored the session lock.
            log.error("store assigned other seqs", extra={"session_id": stream.session_id,
                                                          "expected": batch[0].seq, "got": list(seqs)[:1]})

    async def follow(self, tenant_id: str, session_id: str, after_seq: int, *,
                     until_run_ends: str = "") -> AsyncIterator[AgentEvent]:
        """Every event after `after_seq`, in order, once; then live ones.

        With `until_run_ends` set to a run id, stops after that run's final or
        error event; otherwise follows until the caller stops iterating.
        """
        cursor = after_seq
        while True:
            stream = self._live.get(session_id)
            if stream is None:
                source = self._watch_store(tenant_id, session_id, cursor)
            else:
                source = self._from_live_run(stream, tenant_id, cursor)
            async with _closing(source):
                async for event in source:
                    if event.seq <= cursor:
                        continue
                    cursor = event.seq
                    yield event
                    if until_run_ends and event.run_id == until_run_ends and event.is_terminal:
                        return
            if stream is None:
                return
            if stream.fenced and cursor > stream.known_stored_seq():
                # What this follower saw past the stored log will never be stored; the
                # new owner numbers its events from there, so going on would mislead.
                raise RunOwnershipLost(session_id, stream.known_stored_seq())
            # The run closed: its events are stored; follow whatever runs next.

    async def _watch_store(self, tenant_id: str, session_id: str, cursor: int) -> AsyncIterator[AgentEvent]:
        """The store's watch after `cursor`, reconnected from the last seq seen when it breaks.

        A quiet watch is cut now and then (a restarted store, a connection the
        server closes); only breaks in a row soon after connecting, past the
        retry policy's attempts, end the follower.
        """
        loop = asyncio.get_running_loop()
        num_failures = 0
        while True:
            connected_at = loop.time()
            watch = self._store.watch_events(tenant_id=tenant_id, session_id=session_id, after_seq=cursor)
            try:
                async with _closing(watch):
                    async for event in watch:
                        cursor = max(cursor, event.seq)
                        yield event
                return
            except Unavailable:
                if loop.time() - connected_at >= WATCH_STABLE_S:
                    num_failures = 0
                num_failures += 1
                if num_failures >= self._retry.max_attempts:
                    raise
                log.info("store watch broke; reconnecting", extra={"session_id": session_id, "after_seq": cursor})
                await asyncio.sleep(self._retry.delay_s(num_failures - 1, self._rng))

    async def _from_live_run(self, stream: RunStream, tenant_id: str, cursor: int) -> AsyncIterator[AgentEvent]:
        """The stored events after `cursor`, the unstored ones in memory, then live ones until the run closes.

        May repeat a seq (the caller skips those); never leaves one out: the
        subscription starts before anything is read.
        """
        queue: asyncio.Queue = asyncio.Queue()
        stream.subscribers.add(queue)
        # The previous runs' tails may not be stored yet, but their buffers hold them.
        earlier = stream.unstored_earlier()
        snapshot = list(stream.buffer)
        try:
            if cursor < stream.first_seq - 1:
                for event in await with_retries(lambda: self._store.read_events(
                        tenant_id=tenant_id, session_id=stream.session_id, after_seq=cursor), self._retry):
                    yield event
            for event in [*earlier, *snapshot]:
                if stream.fenced and event.seq > stream.known_stored_seq():
                    break
                yield event
            while (event := await queue.get()) is not _RUN_ENDED:
                yield event
        finally:
            stream.subscribers.discard(queue)
