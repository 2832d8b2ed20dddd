"""windows, messages and send attempts

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "windows",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("sender", sa.String(128), nullable=False),
        sa.Column("user", sa.String(128), nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        sa.Column("last_inbound_at", TS, nullable=False),
        sa.Column("last_inbound_sid", sa.String(64), nullable=True),
        sa.Column("profile_name", sa.String(256), nullable=True),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_windows"),
        sa.UniqueConstraint("sender", "user", name="uq_windows_sender_user"),
    )
    op.create_index("ix_windows_expires_at", "windows", ["expires_at"])

    op.create_table(
        "messages",
        sa.Column("sid", sa.String(64), nullable=False),
        sa.Column("direction", sa.String(16), nullable=False),
        sa.Column("sender", sa.String(128), nullable=True),
        sa.Column("user", sa.String(128), nullable=True),
        sa.Column("messaging_service_sid", sa.String(64), nullable=True),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("status_rank", sa.Integer(), nullable=False),
        sa.Column("error_code", sa.Integer(), nullable=True),
        sa.Column("num_media", sa.Integer(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("sid", name="pk_messages"),
    )
    op.create_index("ix_messages_created_at", "messages", ["created_at"])

    op.create_table(
        "send_attempts",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("account_sid", sa.String(64), nullable=False),
        sa.Column("sender", sa.String(128), nullable=True),
        sa.Column("user", sa.String(128), nullable=True),
        sa.Column("channel", sa.String(32), nullable=True),
        sa.Column("content_type", sa.String(64), nullable=True),
        sa.Column("decision", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(64), nullable=False),
        sa.Column("error_code", sa.Integer(), nullable=True),
        sa.Column("upstream_status", sa.Integer(), nullable=True),
        sa.Column("message_sid", sa.String(64), nullable=True),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("params", sa.Text(), nullable=False),
        sa.Column("duration_ms", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_send_attempts"),
    )
    op.create_index("ix_send_attempts_created_at", "send_attempts", ["created_at"])
    op.create_index("ix_send_attempts_message_sid", "send_attempts", ["message_sid"])


def downgrade() -> None:
    op.drop_table("send_attempts")
    op.drop_table("messages")
    op.drop_table("windows")
