"""Prometheus metrics of the store: event writer fill, event reads, watchers, task flow,
approval changes and session controls."""
from __future__ import annotations

from collections.abc import Callable

from prometheus_client import Counter, Gauge

from services.common.errors import FailedPrecondition
from services.store.adapters.repository import SqlRepository
from services.store.core.event_writer import EventWriter
from services.store.core.feeds import APPROVALS_FEED, CONTROLS_FEED, FEED_CHANNEL
from services.store.core.models import ApprovalRecord, SessionControlRecord, TaskRecord
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
APPROVALS = Counter("llmesh_store_approvals_total",
                    "Approval changes by operation (opened, decided, replayed, refused, audit_noted).", ["op"])
CONTROLS = Counter("llmesh_store_session_controls_total", "Session controls stored, by kind.", ["kind"])
FEED_WATCHERS = Gauge("llmesh_store_feed_watchers", "Open WatchApprovals / WatchSessionControls streams.", ["feed"])
RETAINED = Counter("llmesh_store_retention_rows_total", "Rows archived or deleted by retention, by table.",
                   ["table"])


def watch_feeds(hub: WatchHub) -> None:
    def watchers_of(feed: str) -> Callable[[], float]:
        return lambda: hub.watchers_of(FEED_CHANNEL, feed)

    for feed in (APPROVALS_FEED, CONTROLS_FEED):
        FEED_WATCHERS.labels(feed).set_function(watchers_of(feed))


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

    async def open_approval(self, *args, **kwargs) -> tuple[ApprovalRecord, bool]:
        record, created = await super().open_approval(*args, **kwargs)
        if created:
            APPROVALS.labels("opened").inc()
        return record, created

    async def decide_approval(self, *args, **kwargs) -> tuple[ApprovalRecord | None, bool]:
        try:
            record, replayed = await super().decide_approval(*args, **kwargs)
        except FailedPrecondition:
            APPROVALS.labels("refused").inc()
            raise
        if record is not None:
            APPROVALS.labels("replayed" if replayed else "decided").inc()
        return record, replayed

    async def note_approval_audit(self, *args, **kwargs) -> tuple[ApprovalRecord | None, bool]:
        record, changed = await super().note_approval_audit(*args, **kwargs)
        if changed:
            APPROVALS.labels("audit_noted").inc()
        return record, changed

    async def post_session_control(self, *args, **kwargs) -> tuple[SessionControlRecord, bool]:
        record, created = await super().post_session_control(*args, **kwargs)
        if created:
            CONTROLS.labels(record.kind).inc()
        return record, created

    async def delete_old_approvals(self, *args, **kwargs) -> int:
        num = await super().delete_old_approvals(*args, **kwargs)
        RETAINED.labels("store_approvals").inc(num)
        return num

    async def delete_old_session_controls(self, *args, **kwargs) -> int:
        num = await super().delete_old_session_controls(*args, **kwargs)
        RETAINED.labels("store_session_controls").inc(num)
        return num
