"""outbox and held-message ids never given twice on SQLite (AUTOINCREMENT)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26

An outbox item's id is the X-Proxy-Outbox-Id apps de-duplicate forwards on, and a hold's is the
X-Proxy-Held-Id callers were shown. Without AUTOINCREMENT SQLite hands out the largest rowid + 1, so
after `purge` deleted the newest rows the next items took their ids again: a new webhook looked like
a copy of an old one. PostgreSQL's sequences never give an id twice: nothing to do there.

send_attempts and windows keep plain rowids: their ids are never shown (a windows id only inside the
page token of one listing), and a reused one is still above every row left, so their order holds.
"""
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

TABLES = ("outbox", "held_messages")


def upgrade() -> None:
    if op.get_context().dialect.name != "sqlite":
        return
    for table in TABLES:
        # SQLite has no ALTER for it: the table is made anew and its rows copied with their ids, indexes
        # and all. Copying an id into an AUTOINCREMENT table raises its sqlite_sequence entry to it, so the
        # next id is above every id still in the table. Ids above those, freed by a purge before this
        # upgrade, left no trace in the database and can still be given once more (an operator who knows
        # the highest id the app saw can raise the table's `seq` in sqlite_sequence to it).
        # The new table is created before the copy's transaction begins (Python's sqlite3 opens one only at
        # the first INSERT): an upgrade killed during the copy keeps the old table whole, and leaves this.
        op.execute(f"DROP TABLE IF EXISTS _alembic_tmp_{table}")
        with op.batch_alter_table(table, recreate="always", table_kwargs={"sqlite_autoincrement": True}):
            pass


def downgrade() -> None:
    if op.get_context().dialect.name != "sqlite":
        return
    for table in TABLES:
        # Reflection does not see AUTOINCREMENT, so the rebuilt table has a plain rowid again; AUTOINCREMENT
        # declares its primary key inline, unnamed: named again as 0003 made it.
        with op.batch_alter_table(table, recreate="always") as batch:
            batch.create_primary_key(f"pk_{table}", ["id"])
