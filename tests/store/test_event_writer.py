"""EventWriter: batching, acknowledgement after commit, and the overflow policy."""
from __future__ import annotations

import asyncio

import pytest

from services.common.errors import NotFound, ResourceExhausted
from services.store.core.event_writer import EventWriter
from services.store.core.models import EventAppend, NewEvent
from tests.support.waiting import wait_until


class FakeLog:
    """Assigns seqs like the database would; can be paused to build back-pressure."""

    def __init__(self) -> None:
        self.last_seq: dict[str, int] = {}
        self.batches: list[list[EventAppend]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.num_started = 0  # flushes begun, counting one held at the gate

    async def flush(self, appends: list[EventAppend]):
        self.num_started += 1
        await self.gate.wait()
        self.batches.append(appends)
        out = []
        for a in appends:
            if a.session_id == "missing":
                out.append(NotFound("no session"))
                continue
            start = self.last_seq.get(a.session_id, 0)
            out.append(list(range(start + 1, start + 1 + len(a.events))))
            self.last_seq[a.session_id] = start + len(a.events)
        return out


def ev(kind: str, n: int = 1) -> list[NewEvent]:
    return [NewEvent(kind, b"x", "", 1) for _ in range(n)]


async def started(log: FakeLog, **kw) -> EventWriter:
    writer = EventWriter(log.flush, **kw)
    writer.start()
    return writer


async def test_concurrent_appends_share_transactions() -> None:
    log = FakeLog()
    writer = await started(log, max_batch_events=64, max_batch_delay_ms=20)
    results = await asyncio.gather(*[writer.append("t", "s", ev("token")) for _ in range(32)])
    await writer.close()
    assert sorted(r[0] for r in results) == list(range(1, 33))
    assert len(log.batches) < 4  # 32 requests, a handful of commits


async def test_unbatched_writer_commits_each_request() -> None:
    log = FakeLog()
    writer = await started(log, max_batch_events=1, max_batch_delay_ms=0, max_pending_events=100)
    await asyncio.gather(*[writer.append("t", "s", ev("final")) for _ in range(5)])
    await writer.close()
    assert len(log.batches) == 5


async def test_one_bad_append_does_not_fail_its_batch() -> None:
    log = FakeLog()
    writer = await started(log, max_batch_delay_ms=20)
    ok, bad = await asyncio.gather(writer.append("t", "s", ev("final")), writer.append("t", "missing", ev("final")),
                                   return_exceptions=True)
    await writer.close()
    assert ok == [1] and isinstance(bad, NotFound)


async def test_overflow_drops_oldest_token_deltas_first_and_counts_them() -> None:
    log = FakeLog()
    log.gate.clear()  # the database is stuck: nothing commits
    drops: list[int] = []
    writer = await started(log, max_batch_events=2, max_batch_delay_ms=0, max_pending_events=4,
                           on_drop=drops.append)
    first = asyncio.create_task(writer.append("t", "s", ev("token", 2)))
    assert await wait_until(lambda: log.num_started == 1)  # taken by the stuck flush
    old_tokens = asyncio.create_task(writer.append("t", "s", ev("token", 3)))
    assert await wait_until(lambda: writer.num_pending == 3)
    critical = asyncio.create_task(writer.append("t", "s", ev("final", 2)))
    assert await wait_until(lambda: writer.num_pending == 4)  # 3 + 2, less the delta that gave way
    assert writer.num_dropped == 1 and sum(drops) == 1
    log.gate.set()
    assert await first == [1, 2]
    assert await old_tokens == [0, 3, 4]  # the oldest queued delta gave way
    assert await critical == [5, 6]
    await writer.close()


async def test_full_queue_drops_a_plain_requests_deltas_but_never_a_no_drop_ones() -> None:
    log = FakeLog()
    log.gate.clear()  # the database is stuck: nothing commits
    writer = await started(log, max_batch_events=2, max_batch_delay_ms=0, max_pending_events=3,
                           block_timeout_ms=2_000)
    stuck = asyncio.create_task(writer.append("t", "a", ev("token", 2)))
    assert await wait_until(lambda: log.num_started == 1)  # taken by the stuck flush
    numbered = asyncio.create_task(writer.append("t", "b", ev("token", 3), no_drop=True))
    assert await wait_until(lambda: writer.num_pending == 3)  # fills the queue
    # The plain request's deltas gave way at once; the no_drop one's queued deltas stayed. Nothing
    # commits while the flush is stuck, so a request that did not drop its own would never return here.
    plain = await asyncio.wait_for(writer.append("t", "c", ev("token", 2)), 10)
    assert plain == [0, 0] and writer.num_dropped == 2
    blocked = asyncio.create_task(writer.append("t", "b", ev("token", 2), no_drop=True))
    await asyncio.sleep(0)  # one loop turn, no clock: the append runs until it has to wait
    # It waits for room like a critical event instead of dropping, and is not queued past the limit.
    assert not blocked.done() and writer.num_pending == 3
    log.gate.set()
    assert await stuck == [1, 2]
    assert await numbered == [1, 2, 3] and await blocked == [4, 5]
    assert writer.num_dropped == 2
    stored_b = [len(a.events) for batch in log.batches for a in batch if a.session_id == "b"]
    assert sum(stored_b) == 5
    await writer.close()


async def test_critical_events_block_then_fail_without_being_dropped() -> None:
    log = FakeLog()
    log.gate.clear()
    writer = await started(log, max_batch_events=2, max_batch_delay_ms=0, max_pending_events=2,
                           block_timeout_ms=50)
    stuck = asyncio.create_task(writer.append("t", "s", ev("final", 2)))
    assert await wait_until(lambda: log.num_started == 1)  # taken by the stuck flush
    queued = asyncio.create_task(writer.append("t", "s", ev("tool_result", 2)))
    assert await wait_until(lambda: writer.num_pending == 2)  # the queue is full
    with pytest.raises(ResourceExhausted):  # after block_timeout_ms: the timer is what is tested
        await writer.append("t", "s", ev("approval"))
    assert writer.num_dropped == 0
    log.gate.set()
    assert await stuck == [1, 2] and await queued == [3, 4]
    await writer.close()


async def test_blocked_critical_append_proceeds_when_room_frees() -> None:
    log = FakeLog()
    log.gate.clear()
    writer = await started(log, max_batch_events=2, max_batch_delay_ms=0, max_pending_events=2,
                           block_timeout_ms=2_000)
    stuck = asyncio.create_task(writer.append("t", "s", ev("final", 2)))
    assert await wait_until(lambda: log.num_started == 1)  # taken by the stuck flush
    queued = asyncio.create_task(writer.append("t", "s", ev("final", 2)))
    assert await wait_until(lambda: writer.num_pending == 2)  # the queue is full
    waiting = asyncio.create_task(writer.append("t", "s", ev("compaction")))
    await asyncio.sleep(0)  # one loop turn, no clock: the append runs until it has to wait
    assert not waiting.done() and writer.num_pending == 2
    log.gate.set()
    assert await waiting == [5] and await stuck == [1, 2] and await queued == [3, 4]
    await writer.close()


async def test_close_flushes_everything_queued() -> None:
    log = FakeLog()
    writer = await started(log, max_batch_events=1000, max_batch_delay_ms=10_000)
    pending = [asyncio.create_task(writer.append("t", "s", ev("final"))) for _ in range(3)]
    assert await wait_until(lambda: writer.num_pending == 3)  # all queued, none flushed yet
    await writer.close()
    assert sorted(r[0] for r in await asyncio.gather(*pending)) == [1, 2, 3]
