"""the outbox's indexes in the order claims read them: due time then id, and conversation then status

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27

`claim` (and the oldest-due metric) now take pending items in due order, then id, which the new
(status, next_attempt_at, id) index gives them: they walk it and stop at their limit. Each candidate's
check that no earlier item of its conversation is pending is one range of (ordering_key, status, id).

Measured with 24,000 items waiting, as after an app outage (three per conversation; one claim of ten),
the claim before this release (a SELECT in id order, then an UPDATE per item) against this one (one
statement, in due order, over these indexes), one run each:
- PostgreSQL, the table never analysed (autovacuum had not got to it): 17-39 s per claim before (for
  every candidate it combined (ordering_key, id) with the status index, reading every pending item),
  60-100 ms now; analysed: 24 ms before, 4 ms now.
- SQLite: 47 ms per claim before (it read and sorted every pending item), 2-2.6 ms now.
"""
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def _lock_outbox() -> None:
    """PostgreSQL: the table's strongest lock first, taken once. A CREATE INDEX takes a SHARE lock and the DROP
    INDEX after it ACCESS EXCLUSIVE: an app's insert waiting between the two (it queues behind the SHARE lock,
    and the DROP behind it) was a deadlock, and the release phase failed under live traffic. Waiting for the
    lock up front, the migration runs once the transactions before it end, and the app's wait after it."""
    if op.get_context().dialect.name == "postgresql":
        op.execute("LOCK TABLE outbox IN ACCESS EXCLUSIVE MODE")


def upgrade() -> None:
    _lock_outbox()
    op.create_index("ix_outbox_status_next_attempt_at_id", "outbox", ["status", "next_attempt_at", "id"])
    op.drop_index("ix_outbox_status_next_attempt_at", table_name="outbox")
    op.create_index("ix_outbox_ordering_key_status_id", "outbox", ["ordering_key", "status", "id"])
    op.drop_index("ix_outbox_ordering_key_id", table_name="outbox")


def downgrade() -> None:
    _lock_outbox()
    op.create_index("ix_outbox_ordering_key_id", "outbox", ["ordering_key", "id"])
    op.drop_index("ix_outbox_ordering_key_status_id", table_name="outbox")
    op.create_index("ix_outbox_status_next_attempt_at", "outbox", ["status", "next_attempt_at"])
    op.drop_index("ix_outbox_status_next_attempt_at_id", table_name="outbox")
