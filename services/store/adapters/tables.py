"""SQLAlchemy 2.0 typed models. Times are epoch milliseconds (portable, comparable).

Kept in step with migrations/versions by tests/store/test_migrations.py.
"""
from __future__ import annotations

from sqlalchemy import BigInteger, Index, Integer, LargeBinary, SmallInteger, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

ID = String(128)


class Base(DeclarativeBase):
    pass


class SessionRow(Base):
    __tablename__ = "store_sessions"
    tenant_id: Mapped[str] = mapped_column(ID, primary_key=True)
    session_id: Mapped[str] = mapped_column(ID, primary_key=True)
    title: Mapped[str] = mapped_column(Text, default="")
    metadata_json: Mapped[str] = mapped_column(Text, default="")
    # NULL when created without a request id (NULLs never collide in UNIQUE).
    create_request_id: Mapped[str | None] = mapped_column(ID, nullable=True)
    # Counters that hand out gapless positions/seqs under the row lock.
    last_message_position: Mapped[int] = mapped_column(BigInteger, default=0)
    last_event_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    create_ms: Mapped[int] = mapped_column(BigInteger)
    update_ms: Mapped[int] = mapped_column(BigInteger)
    __table_args__ = (
        UniqueConstraint("tenant_id", "create_request_id", name="uq_store_sessions_request"),
        Index("ix_store_sessions_listing", "tenant_id", "create_ms", "session_id"),
    )


class MessageRow(Base):
    __tablename__ = "store_messages"
    tenant_id: Mapped[str] = mapped_column(ID, primary_key=True)
    session_id: Mapped[str] = mapped_column(ID, primary_key=True)
    position: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    request_id: Mapped[str | None] = mapped_column(ID, nullable=True)
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text)
    metadata_json: Mapped[str] = mapped_column(Text, default="")
    num_tokens: Mapped[int] = mapped_column(Integer, default=0)
    create_ms: Mapped[int] = mapped_column(BigInteger)
    __table_args__ = (Index("ix_store_messages_request", "tenant_id", "session_id", "request_id"),)


class _EventColumns:
    tenant_id: Mapped[str] = mapped_column(ID, primary_key=True)
    session_id: Mapped[str] = mapped_column(ID, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    type: Mapped[str] = mapped_column(String(64))
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    idempotency_key: Mapped[str | None] = mapped_column(String(256), nullable=True)
    schema_version: Mapped[int] = mapped_column(Integer, default=0)
    create_ms: Mapped[int] = mapped_column(BigInteger)


class EventRow(_EventColumns, Base):
    __tablename__ = "store_events"
    __table_args__ = (
        UniqueConstraint("tenant_id", "session_id", "idempotency_key", name="uq_store_events_key"),
        Index("ix_store_events_age", "create_ms"),
    )


class ArchivedEventRow(_EventColumns, Base):
    """Events moved out of the hot table by retention; still readable by replay."""

    __tablename__ = "store_events_archive"


class TaskRow(Base):
    __tablename__ = "store_tasks"
    task_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ID)
    queue: Mapped[str] = mapped_column(ID)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    payload_json: Mapped[str] = mapped_column(Text, default="")
    state: Mapped[int] = mapped_column(SmallInteger)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    worker_id: Mapped[str] = mapped_column(ID, default="")
    lease_token: Mapped[str] = mapped_column(String(64), default="")
    # Request id of the claim that leased it, so a retried claim returns the same tasks.
    claim_id: Mapped[str | None] = mapped_column(ID, nullable=True)
    lease_expire_ms: Mapped[int] = mapped_column(BigInteger, default=0)
    run_after_ms: Mapped[int] = mapped_column(BigInteger)
    result_json: Mapped[str] = mapped_column(Text, default="")
    last_error: Mapped[str] = mapped_column(Text, default="")
    idempotency_key: Mapped[str | None] = mapped_column(ID, nullable=True)
    create_ms: Mapped[int] = mapped_column(BigInteger)
    update_ms: Mapped[int] = mapped_column(BigInteger)
    __table_args__ = (
        UniqueConstraint("tenant_id", "queue", "idempotency_key", name="uq_store_tasks_key"),
        Index("ix_store_tasks_ready", "queue", "state", "priority", "run_after_ms"),
        Index("ix_store_tasks_leases", "state", "lease_expire_ms"),
        Index("ix_store_tasks_claim", "claim_id"),
    )


class SessionLockRow(Base):
    __tablename__ = "store_session_locks"
    tenant_id: Mapped[str] = mapped_column(ID, primary_key=True)
    session_id: Mapped[str] = mapped_column(ID, primary_key=True)
    # Empty when free; the row stays so the fencing token keeps growing.
    owner_id: Mapped[str] = mapped_column(ID, default="")
    lease_expire_ms: Mapped[int] = mapped_column(BigInteger, default=0)
    fencing_token: Mapped[int] = mapped_column(BigInteger, default=0)


class _AuditColumns:
    tenant_id: Mapped[str] = mapped_column(ID, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    prev_hash: Mapped[str] = mapped_column(String(256))
    entry_hash: Mapped[str] = mapped_column(String(256))
    payload_json: Mapped[str] = mapped_column(Text)
    create_ms: Mapped[int] = mapped_column(BigInteger)


class AuditRow(_AuditColumns, Base):
    __tablename__ = "store_audit"
    __table_args__ = (Index("ix_store_audit_age", "create_ms"),)


class ArchivedAuditRow(_AuditColumns, Base):
    __tablename__ = "store_audit_archive"


class AuditHeadRow(Base):
    """Each tenant's chain head, moved in the same transaction as the append.

    Kept apart from the entries so that deleting the chain's tail (and its
    archive) shows: the head still names the seq and hash that were lost.
    """
    __tablename__ = "store_audit_heads"
    tenant_id: Mapped[str] = mapped_column(ID, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    entry_hash: Mapped[str] = mapped_column(String(256))


class CounterRow(Base):
    """Store-wide counters (approval change_seq, control seq).

    Taken with a row lock inside the writing transaction, so numbers are
    handed out in commit order and a watcher reading "after N" never skips a
    row committed late.
    """
    __tablename__ = "store_counters"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, default=0)


class ApprovalRow(Base):
    __tablename__ = "store_approvals"
    tenant_id: Mapped[str] = mapped_column(ID, primary_key=True)
    approval_id: Mapped[str] = mapped_column(ID, primary_key=True)
    session_id: Mapped[str] = mapped_column(ID)
    subject_key: Mapped[str] = mapped_column(Text)
    # sha256 of subject_key (hex): subject keys can be long JSON.
    subject_hash: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(32))
    approver: Mapped[str] = mapped_column(String(256), default="")
    create_ms: Mapped[int] = mapped_column(BigInteger)
    expire_ms: Mapped[int] = mapped_column(BigInteger)
    decided_request_id: Mapped[str] = mapped_column(ID, default="")
    audit_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    change_seq: Mapped[int] = mapped_column(BigInteger)
    __table_args__ = (
        Index("ix_store_approvals_subject", "tenant_id", "session_id", "subject_hash", "state"),
        Index("ix_store_approvals_change", "change_seq"),
        Index("ix_store_approvals_age", "create_ms"),
    )


class SessionControlRow(Base):
    __tablename__ = "store_session_controls"
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    tenant_id: Mapped[str] = mapped_column(ID)
    session_id: Mapped[str] = mapped_column(ID)
    kind: Mapped[str] = mapped_column(String(32))
    run_id: Mapped[str] = mapped_column(ID, default="")
    payload_json: Mapped[str] = mapped_column(Text)
    # Per tenant; NULL when the poster gave none (NULLs never collide).
    request_id: Mapped[str | None] = mapped_column(ID, nullable=True)
    create_ms: Mapped[int] = mapped_column(BigInteger)
    __table_args__ = (
        UniqueConstraint("tenant_id", "request_id", name="uq_store_session_controls_request"),
        Index("ix_store_session_controls_session", "tenant_id", "session_id", "seq"),
        Index("ix_store_session_controls_age", "create_ms"),
    )


class WebhookRow(Base):
    __tablename__ = "store_webhooks"
    tenant_id: Mapped[str] = mapped_column(ID, primary_key=True)
    webhook_id: Mapped[str] = mapped_column(ID, primary_key=True)
    url: Mapped[str] = mapped_column(Text)
    # Space-separated event types ("run.final task.dead").
    event_types: Mapped[str] = mapped_column(Text)
    secret: Mapped[str] = mapped_column(String(256))
    max_attempts: Mapped[int] = mapped_column(Integer)
    create_ms: Mapped[int] = mapped_column(BigInteger)


# An autoincrementing BIGINT on PostgreSQL; SQLite autoincrements only an INTEGER primary key (64-bit anyway).
_SEQ = BigInteger().with_variant(Integer(), "sqlite")


class DeliveryRow(Base):
    """The outbox: one row per event and webhook, written in the event's own transaction."""
    __tablename__ = "store_deliveries"
    seq: Mapped[int] = mapped_column(_SEQ, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(String(64))
    tenant_id: Mapped[str] = mapped_column(ID)
    webhook_id: Mapped[str] = mapped_column(ID)
    url: Mapped[str] = mapped_column(Text)
    destination: Mapped[str] = mapped_column(String(512))
    session_id: Mapped[str] = mapped_column(ID)
    event_type: Mapped[str] = mapped_column(String(32))
    body: Mapped[bytes] = mapped_column(LargeBinary)
    state: Mapped[int] = mapped_column(SmallInteger)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    next_attempt_ms: Mapped[int] = mapped_column(BigInteger)
    claim_token: Mapped[str] = mapped_column(String(64), default="")
    claim_expire_ms: Mapped[int] = mapped_column(BigInteger, default=0)
    worker_id: Mapped[str] = mapped_column(ID, default="")
    last_error: Mapped[str] = mapped_column(Text, default="")
    last_status: Mapped[int] = mapped_column(Integer, default=0)
    create_ms: Mapped[int] = mapped_column(BigInteger)
    delivered_ms: Mapped[int] = mapped_column(BigInteger, default=0)
    __table_args__ = (
        UniqueConstraint("delivery_id", name="uq_store_deliveries_id"),
        Index("ix_store_deliveries_due", "state", "next_attempt_ms"),
        Index("ix_store_deliveries_order", "webhook_id", "session_id", "seq"),
        Index("ix_store_deliveries_tenant", "tenant_id", "state", "seq"),
    )
