"""Prometheus metrics of the store: event writer fill, event reads, watchers, task flow."""
from __future__ import annotations

from prometheus_client import Counter, Gauge

from services.store.adapters.repository import SqlRepository
from services.store.core.event_writer import EventWriter
from services.store.core.models import TaskRecord
from services.store.core.watch_hub import WatchHub

EVENTS_DROPPED = Counter("llmesh_store_events_dropped_total",
                         "Token-delta events dropped by the overflow policy under back-pressure.")
EVENTS_PENDING = Gauge("llmesh_store_events_pending", "Events waiting for the batched writer.")
WRITER_FILL = Gauge("llmesh_store_event_writer_fill_ratio",
                    "Events waiting for the batched writer / its queue capacity (1 = appends block or drop).")
# Every database read of events: ReadEvents pages and WatchEvents catch-ups.
# With the watch hub this grows with commits, not with the number of watchers.
EVENT_READS = Counter("llmesh_store_event_reads_total", "Database reads of a session's events.")
WATCHERS = Gauge("llmesh_store_event_watchers", "Open WatchEvents streams.")
TASKS = Counter("llmesh_store_tasks_total", "Task transitions by operation.", ["op"])


def watch_writer(writer: EventWriter, hub: WatchHub) -> None:
    EVENTS_PENDING.set_function(lambda: writer.num_pending)
    WRITER_FILL.set_function(lambda: writer.num_pending / max(writer.max_pending, 1))
    WATCHERS.set_function(lambda: hub.num_watchers)


class MeteredRepository(SqlRepository):
    """The SQL repository, counting the operations the dashboards need."""

    async def read_events(self, *args, **kwargs):
        EVENT_READS.inc()
        return await super().read_events(*args, **kwargs)

    async def enqueue_task(self, *args, **kwargs) -> tuple[TaskRecord, bool]:
        record, created = await super().enqueue_task(*args, **kwargs)
        if created:
            TASKS.labels("enqueued").inc()
        return record, created

    async def claim_tasks(self, *args, **kwargs) -> list[TaskRecord]:
        claimed = await super().claim_tasks(*args, **kwargs)
        TASKS.labels("claimed").inc(len(claimed))
        return claimed

    async def ack_task(self, *args, **kwargs) -> TaskRecord:
        record = await super().ack_task(*args, **kwargs)
        TASKS.labels("acked").inc()
        return record

    async def fail_task(self, *args, **kwargs) -> TaskRecord:
        record = await super().fail_task(*args, **kwargs)
        TASKS.labels("failed").inc()
        return record

    async def release_expired_leases(self, *args, **kwargs) -> int:
        num = await super().release_expired_leases(*args, **kwargs)
        TASKS.labels("lease_expired").inc(num)
        return num
