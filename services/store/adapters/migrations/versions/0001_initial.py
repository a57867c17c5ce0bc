"""Initial store schema: sessions, messages, events, tasks, locks, audit (+ archives).

Revision ID: 0001
Revises:
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

ID = sa.String(128)


def _event_columns() -> list[sa.Column]:
    return [
        sa.Column("tenant_id", ID, primary_key=True),
        sa.Column("session_id", ID, primary_key=True),
        sa.Column("seq", sa.BigInteger(), primary_key=True),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("idempotency_key", sa.String(256), nullable=True),
        sa.Column("schema_version", sa.Integer(), nullable=False),
        sa.Column("create_ms", sa.BigInteger(), nullable=False),
    ]


def _audit_columns() -> list[sa.Column]:
    return [
        sa.Column("tenant_id", ID, primary_key=True),
        sa.Column("seq", sa.BigInteger(), primary_key=True),
        sa.Column("prev_hash", sa.String(256), nullable=False),
        sa.Column("entry_hash", sa.String(256), nullable=False),
        sa.Column("payload_json", sa.Text(), nullable=False),
        sa.Column("create_ms", sa.BigInteger(), nullable=False),
    ]


def upgrade() -> None:
    op.create_table(
        "store_sessions",
        sa.Column("tenant_id", ID, primary_key=True),
        sa.Column("session_id", ID, primary_key=True),
        sa.Column("title", sa.Text(), nullable=False),
        sa.Column("metadata_json", sa.Text(), nullable=False),
        sa.Column("create_request_id", ID, nullable=True),
        sa.Column("last_message_position", sa.BigInteger(), nullable=False),
        sa.Column("last_event_seq", sa.BigInteger(), nullable=False),
        sa.Column("create_ms", sa.BigInteger(), nullable=False),
        sa.Column("update_ms", sa.BigInteger(), nullable=False),
        sa.UniqueConstraint("tenant_id", "create_request_id", name="uq_store_sessions_request"),
    )
    op.create_index("ix_store_sessions_listing", "store_sessions", ["tenant_id", "create_ms", "session_id"])

    op.create_table(
        "store_messages",
        sa.Column("tenant_id", ID, primary_key=True),
        sa.Column("session_id", ID, primary_key=True),
        sa.Column("position", sa.BigInteger(), primary_key=True),
        sa.Column("request_id", ID, nullable=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("metadata_json", sa.Text(), nullable=False),
        sa.Column("num_tokens", sa.Integer(), nullable=False),
        sa.Column("create_ms", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_store_messages_request", "store_messages", ["tenant_id", "session_id", "request_id"])

    op.create_table(
        "store_events", *_event_columns(),
        sa.UniqueConstraint("tenant_id", "session_id", "idempotency_key", name="uq_store_events_key"),
    )
    op.create_index("ix_store_events_age", "store_events", ["create_ms"])
    op.create_table("store_events_archive", *_event_columns())

    op.create_table(
        "store_tasks",
        sa.Column("task_id", sa.String(64), primary_key=True),
        sa.Column("tenant_id", ID, nullable=False),
        sa.Column("queue", ID, nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("payload_json", sa.Text(), nullable=False),
        sa.Column("state", sa.SmallInteger(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("worker_id", ID, nullable=False),
        sa.Column("lease_token", sa.String(64), nullable=False),
        sa.Column("claim_id", ID, nullable=True),
        sa.Column("lease_expire_ms", sa.BigInteger(), nullable=False),
        sa.Column("run_after_ms", sa.BigInteger(), nullable=False),
        sa.Column("result_json", sa.Text(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=False),
        sa.Column("idempotency_key", ID, nullable=True),
        sa.Column("create_ms", sa.BigInteger(), nullable=False),
        sa.Column("update_ms", sa.BigInteger(), nullable=False),
        sa.UniqueConstraint("tenant_id", "queue", "idempotency_key", name="uq_store_tasks_key"),
    )
    op.create_index("ix_store_tasks_ready", "store_tasks", ["queue", "state", "priority", "run_after_ms"])
    op.create_index("ix_store_tasks_leases", "store_tasks", ["state", "lease_expire_ms"])
    op.create_index("ix_store_tasks_claim", "store_tasks", ["claim_id"])

    op.create_table(
        "store_session_locks",
        sa.Column("tenant_id", ID, primary_key=True),
        sa.Column("session_id", ID, primary_key=True),
        sa.Column("owner_id", ID, nullable=False),
        sa.Column("lease_expire_ms", sa.BigInteger(), nullable=False),
        sa.Column("fencing_token", sa.BigInteger(), nullable=False),
    )

    op.create_table("store_audit", *_audit_columns())
    op.create_index("ix_store_audit_age", "store_audit", ["create_ms"])
    op.create_table("store_audit_archive", *_audit_columns())


def downgrade() -> None:
    for table in ("store_audit_archive", "store_audit", "store_session_locks", "store_tasks",
                  "store_events_archive", "store_events", "store_messages", "store_sessions"):
        op.drop_table(table)
