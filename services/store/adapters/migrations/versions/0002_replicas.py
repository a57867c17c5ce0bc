"""Shared state for replicas: audit heads, approvals, session controls, counters.

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

ID = sa.String(128)


def upgrade() -> None:
    op.create_table(
        "store_audit_heads",
        sa.Column("tenant_id", ID, primary_key=True),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("entry_hash", sa.String(256), nullable=False),
    )
    # Chains written before this revision: their head is their last entry
    # (archived entries are older, so the live table holds each head).
    op.execute(
        "INSERT INTO store_audit_heads (tenant_id, seq, entry_hash) "
        "SELECT a.tenant_id, a.seq, a.entry_hash FROM store_audit a "
        "WHERE a.seq = (SELECT MAX(b.seq) FROM store_audit b WHERE b.tenant_id = a.tenant_id)"
    )

    op.create_table(
        "store_counters",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.BigInteger(), nullable=False),
    )

    op.create_table(
        "store_approvals",
        sa.Column("tenant_id", ID, primary_key=True),
        sa.Column("approval_id", ID, primary_key=True),
        sa.Column("session_id", ID, nullable=False),
        sa.Column("subject_key", sa.Text(), nullable=False),
        sa.Column("subject_hash", sa.String(64), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("approver", sa.String(256), nullable=False),
        sa.Column("create_ms", sa.BigInteger(), nullable=False),
        sa.Column("expire_ms", sa.BigInteger(), nullable=False),
        sa.Column("decided_request_id", ID, nullable=False),
        sa.Column("audit_seq", sa.BigInteger(), nullable=False),
        sa.Column("change_seq", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_store_approvals_subject", "store_approvals",
                    ["tenant_id", "session_id", "subject_hash", "state"])
    op.create_index("ix_store_approvals_change", "store_approvals", ["change_seq"])
    op.create_index("ix_store_approvals_age", "store_approvals", ["create_ms"])

    op.create_table(
        "store_session_controls",
        sa.Column("seq", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("tenant_id", ID, nullable=False),
        sa.Column("session_id", ID, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("run_id", ID, nullable=False),
        sa.Column("payload_json", sa.Text(), nullable=False),
        sa.Column("request_id", ID, nullable=True),
        sa.Column("create_ms", sa.BigInteger(), nullable=False),
        sa.UniqueConstraint("tenant_id", "request_id", name="uq_store_session_controls_request"),
    )
    op.create_index("ix_store_session_controls_session", "store_session_controls",
                    ["tenant_id", "session_id", "seq"])
    op.create_index("ix_store_session_controls_age", "store_session_controls", ["create_ms"])


def downgrade() -> None:
    for table in ("store_session_controls", "store_approvals", "store_counters", "store_audit_heads"):
        op.drop_table(table)
