"""Webhooks: subscriptions and the outbox of their deliveries.

Revision ID: 0003
Revises: 0002
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

ID = sa.String(128)


def upgrade() -> None:
    op.create_table(
        "store_webhooks",
        sa.Column("tenant_id", ID, primary_key=True),
        sa.Column("webhook_id", ID, primary_key=True),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("event_types", sa.Text(), nullable=False),
        sa.Column("secret", sa.String(256), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("create_ms", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "store_deliveries",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("delivery_id", sa.String(64), nullable=False),
        sa.Column("tenant_id", ID, nullable=False),
        sa.Column("webhook_id", ID, nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("destination", sa.String(512), nullable=False),
        sa.Column("session_id", ID, nullable=False),
        sa.Column("event_type", sa.String(32), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("state", sa.SmallInteger(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_ms", sa.BigInteger(), nullable=False),
        sa.Column("claim_token", sa.String(64), nullable=False),
        sa.Column("claim_expire_ms", sa.BigInteger(), nullable=False),
        sa.Column("worker_id", ID, nullable=False),
        sa.Column("last_error", sa.Text(), nullable=False),
        sa.Column("last_status", sa.Integer(), nullable=False),
        sa.Column("create_ms", sa.BigInteger(), nullable=False),
        sa.Column("delivered_ms", sa.BigInteger(), nullable=False),
        sa.UniqueConstraint("delivery_id", name="uq_store_deliveries_id"),
    )
    op.create_index("ix_store_deliveries_due", "store_deliveries", ["state", "next_attempt_ms"])
    op.create_index("ix_store_deliveries_order", "store_deliveries", ["webhook_id", "session_id", "seq"])
    op.create_index("ix_store_deliveries_tenant", "store_deliveries", ["tenant_id", "state", "seq"])


def downgrade() -> None:
    op.drop_table("store_deliveries")
    op.drop_table("store_webhooks")
