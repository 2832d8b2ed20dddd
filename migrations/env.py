"""Alembic environment: the URL comes from the caller's config or DATABASE_URL."""

import os

from alembic import context
from sqlalchemy import text
from proxy.db import make_engine, metadata, write_lock
from proxy.settings import normalise_database_url

# Two `db upgrade`s at once on PostgreSQL (two release phases, or one beside a one-off run) take turns:
# each reads the revision only once it holds this lock, so the second finds the first's work done.
MIGRATION_LOCK_ID = 0x7761_7072_6F78  # "waprox": any constant the application itself never takes

config = context.config
url = config.get_main_option("sqlalchemy.url") or normalise_database_url(os.environ.get("DATABASE_URL", ""))


def run_migrations_offline() -> None:
    context.configure(url=url, target_metadata=metadata, literal_binds=True, render_as_batch=url.startswith("sqlite"))
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(url, pool_size=1)
    with write_lock(engine), engine.connect() as connection:  # web workers wait their turn, not SQLite's
        context.configure(connection=connection, target_metadata=metadata,
                          render_as_batch=connection.dialect.name == "sqlite")
        with context.begin_transaction():
            if connection.dialect.name == "postgresql":  # held to the transaction's end, released by it
                connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": MIGRATION_LOCK_ID})
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
