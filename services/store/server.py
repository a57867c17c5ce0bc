"""Wiring of the store: database, migrations, event writer, sweepers, servicer."""
from __future__ import annotations

import logging

import grpc
from llmesh.store.v1 import store_pb2_grpc

from services.store.adapters.database import Database, DatabaseOptions
from services.store.config import Settings
from services.store.core.event_writer import EventWriter
from services.store.core.maintenance import Maintenance, MaintenanceOptions
from services.store.core.store import CoreOptions, StoreCore, wall_clock_ms
from services.store.core.task_policy import RetryPolicy
from services.store.core.watch_hub import ReplicaCommitPoller, WatchHub
from services.store.metrics import EVENTS_DROPPED, MeteredRepository, watch_feeds, watch_writer
from services.store.servicer import StoreServicer

SERVICE_NAME = "llmesh.store.v1.StoreService"
log = logging.getLogger("llmesh.store")



class App:
    service_names = (SERVICE_NAME,)

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.database: Database | None = None
        self.core: StoreCore | None = None
        self.maintenance: Maintenance | None = None
        self.poller: ReplicaCommitPoller | None = None
        self.feed_poller: ReplicaCommitPoller | None = None
        self._servicer = _LateServicer(self)

    def register(self, server: grpc.aio.Server) -> None:
        store_pb2_grpc.add_StoreServiceServicer_to_server(self._servicer, server)

    async def start(self) -> None:
        s = self.settings
        self.database = Database(s.resolved_database_url(), DatabaseOptions(
            pool_size=s.pool_size, pool_max_overflow=s.pool_max_overflow, sqlite_readers=s.sqlite_readers,
            sqlite_synchronous=s.sqlite_synchronous))
        await self.database.migrate()
        repo = MeteredRepository(self.database)
        hub = WatchHub()
        feed_hub = WatchHub()  # approvals and session controls

        def publish_commits(done: list[tuple[str, str, int]]) -> None:
            for tenant_id, session_id, seq in done:
                hub.publish(tenant_id, session_id, seq)

        writer = EventWriter(
            lambda appends: repo.append_events(appends, wall_clock_ms()),
            max_batch_events=s.event_batch_max, max_batch_delay_ms=s.event_batch_ms,
            max_pending_events=max(s.event_queue_max, s.event_batch_max, 1_000),
            block_timeout_ms=s.event_block_timeout_ms, droppable_types=s.droppable_event_types,
            on_commit=publish_commits,
            on_drop=EVENTS_DROPPED.inc)
        watch_writer(writer, hub)
        watch_feeds(feed_hub)
        writer.start()
        self.core = StoreCore(repo, writer, hub, CoreOptions(
            default_max_attempts=s.task_max_attempts, webhook_max_attempts=s.webhook_max_attempts,
            retry=RetryPolicy(s.task_backoff_base_ms, s.task_backoff_max_ms)), feed_hub=feed_hub)
        self.maintenance = Maintenance(repo, MaintenanceOptions(
            lease_sweep_interval_s=s.lease_sweep_interval_ms / 1000, event_retention_days=s.event_retention_days,
            audit_retention_days=s.audit_retention_days, retention_interval_s=s.retention_interval_s,
            retention_batch_rows=s.retention_batch_rows, approval_retention_days=s.approval_retention_days,
            session_control_retention_s=s.session_control_retention_s,
            delivery_retention_days=s.delivery_retention_days), wall_clock_ms)
        self.maintenance.start()
        self.poller = ReplicaCommitPoller(hub, repo.last_event_seqs, s.watch_recheck_ms / 1000)
        self.poller.start()
        self.feed_poller = ReplicaCommitPoller(feed_hub, repo.feed_heads, s.feed_recheck_ms / 1000,
                                               name="feed-replica-poller")
        self.feed_poller.start()
        log.info("store ready", extra={"event": "store_ready", "dialect": self.database.dialect})

    async def close(self) -> None:
        for poller in (self.poller, self.feed_poller):
            if poller is not None:
                await poller.close()
        if self.core is not None:
            self.core.hub.close()
            self.core.feed_hub.close()
            await self.core.writer.close()
        if self.maintenance is not None:
            await self.maintenance.close()
        if self.database is not None:
            await self.database.close()


class _LateServicer(StoreServicer):
    """Registered before start(); the core exists once the database is open."""

    def __init__(self, app: App) -> None:
        self._app = app

    @property
    def core(self) -> StoreCore:
        if self._app.core is None:
            from services.common.errors import Unavailable

            raise Unavailable("store is starting", reason="STORE_STARTING")
        return self._app.core


def build_app(settings: Settings) -> App:
    return App(settings)
