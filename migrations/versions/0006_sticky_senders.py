"""the number each Messaging Service sends to each user from (Twilio's Sticky Sender)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28

A new table only: no lock on any table the instances of the release before this one use.
"""
import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sticky_senders",
        sa.Column("service_sid", sa.String(64), nullable=False),
        sa.Column("user", sa.String(128), nullable=False),
        sa.Column("sender", sa.String(128), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("service_sid", "user", name="pk_sticky_senders"),
    )
    op.create_index("ix_sticky_senders_updated_at", "sticky_senders", ["updated_at"])


def downgrade() -> None:
    op.drop_table("sticky_senders")
