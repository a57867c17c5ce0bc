"""Settings of the store (env ``LLMESH_STORE_<FIELD>``, CLI ``--field-name``)."""
from __future__ import annotations

from dataclasses import dataclass

from services.common.settings import ServerSettings

DEFAULT_PORT = 50055


@dataclass(frozen=True)
class Settings(ServerSettings):
    # gRPC port.
    port: int = DEFAULT_PORT
    # Empty means SQLite at <data_dir>/store.db. PostgreSQL:
    # postgresql+psycopg://user:pass@host:5432/db (plain postgresql:// works too).
    database_url: str = ""
    # PostgreSQL connection pool (SQLite uses one writer and a few readers).
    pool_size: int = 10
    pool_max_overflow: int = 10
    # SQLite reader connections (WAL lets them read while the writer writes).
    sqlite_readers: int = 4
    # FULL survives power loss; NORMAL survives a process crash only (WAL).
    sqlite_synchronous: str = "FULL"
    # Event writer: flush when this many events wait or the oldest waited this long.
    event_batch_max: int = 256
    event_batch_ms: float = 2.0
    # Events waiting for a flush before the overflow policy kicks in.
    event_queue_max: int = 20_000
    # How long an append of critical events waits for room before RESOURCE_EXHAUSTED.
    event_block_timeout_ms: int = 5_000
    # Event types that may be dropped (oldest first) under back-pressure.
    droppable_event_types: tuple[str, ...] = ("token",)
    # One query per this interval reads the last seq of every watched session, so
    # WatchEvents streams see appends made by other store replicas (0 turns it off).
    watch_recheck_ms: int = 1_000
    # One query per this interval reads the approval and session-control counters, so
    # WatchApprovals and WatchSessionControls streams see changes made by other store
    # replicas (0 turns it off; this replica's own changes wake them at once).
    feed_recheck_ms: int = 100
    # Tasks: default attempts, backoff of failed attempts, how often leases are swept.
    task_max_attempts: int = 5
    task_backoff_base_ms: int = 1_000
    task_backoff_max_ms: int = 300_000
    # Attempts of a webhook delivery before it becomes a dead letter.
    webhook_max_attempts: int = 8
    # How often expired task leases are swept back to the queue.
    lease_sweep_interval_ms: int = 500
    # Retention: rows older than this move to the *_archive tables; 0 keeps them.
    event_retention_days: float = 0.0
    # The same for audit entries (0 keeps them).
    audit_retention_days: float = 0.0
    # Approvals opened longer ago than this are deleted (a pending one only once expired); 0 keeps them.
    approval_retention_days: float = 7.0
    # Webhook deliveries delivered longer ago than this are deleted (pending and dead ones stay); 0 keeps them.
    delivery_retention_days: float = 7.0
    # Session controls (cancel requests, approval answers for a run) older than this are deleted; 0 keeps them.
    session_control_retention_s: float = 3_600.0
    # How often the archiver runs.
    retention_interval_s: float = 300.0
    # Rows moved per transaction, so writers never wait long behind the archiver.
    retention_batch_rows: int = 1_000

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{self.data_path.resolve() / 'store.db'}"
