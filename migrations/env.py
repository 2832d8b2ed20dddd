"""Alembic environment: the URL comes from the caller's config or DATABASE_URL."""

import os

from alembic import context
from proxy.db import make_engine, metadata, write_lock
from proxy.settings import normalise_database_url

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
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
