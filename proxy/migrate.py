"""Alembic migrations, the only way the schema is made: upgrade, and the revision the code expects."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
UPGRADE_COMMAND = "flask --app proxy db upgrade"
# PostgreSQL's undefined_table and undefined_column; SQLite says it in words.
_UNDEFINED_SQLSTATES = ("42P01", "42703")
_UNDEFINED_SQLITE = ("no such table", "no such column", "has no column named")
# The start-up check gives up on a database host that does not answer after this long: a gunicorn
# worker still booting at its --timeout is killed and started again, and would never serve.
START_CHECK_CONNECT_TIMEOUT_SECONDS = 5


def alembic_config(database_url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return cfg


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def current_revision(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def known_revision(revision: str) -> bool:
    """Whether this code's migrations contain `revision` (a newer release's database is ahead of it)."""
    try:
        return ScriptDirectory.from_config(alembic_config("sqlite://")).get_revision(revision) is not None
    except CommandError:
        return False


def schema_missing(exc: BaseException) -> bool:
    """The database lacks a table or column the code uses: its migrations were not applied.

    Cheap to tell from the driver's error, and worth telling apart: it is no outage, and no retry fixes it."""
    orig = getattr(exc, "orig", None)
    if getattr(orig, "sqlstate", None) in _UNDEFINED_SQLSTATES:
        return True
    return isinstance(orig, sqlite3.Error) and any(words in str(orig) for words in _UNDEFINED_SQLITE)


def schema_hint(exc: BaseException) -> str:
    """What an operator reads for a `schema_missing` error: the driver's first line and the command."""
    first = str(getattr(exc, "orig", exc)).strip().splitlines()[:1]
    return f"the database lacks a table or column this code uses ({''.join(first)}): run `{UPGRADE_COMMAND}`"


def revision_at_start(engine: Engine) -> str | None:
    """The database's revision, in one query (None when it has no migrations at all).

    Raises SQLAlchemyError when the database does not answer."""
    own = engine.dialect.name == "postgresql"  # a connection of its own, with a connect timeout
    if own:
        engine = create_engine(engine.url, poolclass=NullPool,
                               connect_args={"connect_timeout": START_CHECK_CONNECT_TIMEOUT_SECONDS})
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    except SQLAlchemyError as exc:
        if schema_missing(exc):
            return None
        raise
    finally:
        if own:
            engine.dispose()


class HeadCheck:
    """Whether the database's migrations have reached this code's head (or gone past it, a newer release's).

    Asked again at most every RECHECK_SECONDS while they have not — once they have, never again: they only
    move forward while this code runs. A database that does not answer is not judged here: its error is
    the caller's, so a request meets the outage once (a silent host costs one connect timeout, not two).
    """

    RECHECK_SECONDS = 5.0

    def __init__(self, engine: Engine, head: str, at_start: str | None | bool):
        """`at_start`: the revision found at start-up, or False when the database did not answer then."""
        self._engine, self._head = engine, head
        self._reached = at_start is not False and self._at_or_past_head(at_start)
        self._asked = time.monotonic() if at_start is not False else float("-inf")

    def reached(self) -> bool:
        if self._reached:
            return True
        now = time.monotonic()
        if now - self._asked < self.RECHECK_SECONDS:
            return False
        self._asked = now
        try:
            with self._engine.connect() as conn:
                current = current_revision(conn)
        except SQLAlchemyError:
            self._asked = float("-inf")  # down, not behind: asked again by the next request
            raise
        self._reached = self._at_or_past_head(current)
        return self._reached

    def _at_or_past_head(self, revision: str | None) -> bool:
        return revision == self._head or (revision is not None and not known_revision(revision))
