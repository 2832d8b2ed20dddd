"""content cache; content sid and approval on send attempts

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "content_cache",
        sa.Column("sid", sa.String(34), nullable=False),
        sa.Column("types", sa.Text(), nullable=False),
        sa.Column("approval_status", sa.String(32), nullable=False),
        sa.Column("friendly_name", sa.String(256), nullable=True),
        sa.Column("fetched_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sid", name="pk_content_cache"),
    )
    with op.batch_alter_table("send_attempts") as batch:
        batch.add_column(sa.Column("content_sid", sa.String(34), nullable=True))
        batch.add_column(sa.Column("approval_status", sa.String(32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("send_attempts") as batch:
        batch.drop_column("approval_status")
        batch.drop_column("content_sid")
    op.drop_table("content_cache")
