"""Hot-path statements: built and compiled once by SQLAlchemy, run on the connection's DBAPI cursor.

Measured here (bench/README.md): SQLAlchemy's `Connection.execute` of an already-cached statement
costs 65–125 µs of CPU (execution context, parameter and result objects), while SQLite answers a
window lookup in ~7 µs. The statements on every request's path (window lookup, inbound upsert,
status upsert, a forwarded webhook's outbox item) skip that layer: SQLAlchemy still writes the SQL for the dialect, supplies the type
conversions (`bind_processor` / `result_processor`, so values are stored exactly as its own
execution stores them), owns the pool and the transaction, and handles every error — a failure
goes through the same handler `Connection.execute` uses (SQLAlchemy's exception classes, parameters
hidden, a dropped connection invalidated together with the pool's other connections); only the
per-call machinery is left out.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Callable, Sequence

from sqlalchemy import Connection
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.sql import ClauseElement

# A statement's builder is given the dialect's module (for its insert(), with on_conflict_do_*), and the
# columns an INSERT is given, as Connection.execute would compile it for them (None: all its bindparams).
Builder = tuple[Callable[[ModuleType], ClauseElement], Sequence[str] | None]


class Prepared:
    """One statement for one dialect: `rows(conn, params)` → list of tuples, types converted."""

    def __init__(self, statement: ClauseElement, dialect: Dialect, column_keys: Sequence[str] | None = None):
        # column_keys: the columns an INSERT is given, as Connection.execute would compile it for them.
        compiled = statement.compile(dialect=dialect, column_keys=list(column_keys) if column_keys else None)
        self.sql = compiled.string
        self._compiled = compiled
        self._positions = tuple(compiled.positiontup) if compiled.positional else None
        # By the name each parameter has in the SQL (construct_params' keys), anonymous ones included.
        self._bind_conversions = [
            (name, convert) for bind, name in compiled.bind_names.items()
            if (convert := bind.type.dialect_impl(dialect).bind_processor(dialect)) is not None
        ]
        columns = getattr(statement, "exported_columns", ())
        self._result_conversions: list[Callable[[Any], Any] | None] = [
            column.type.dialect_impl(dialect).result_processor(dialect, None) for column in columns
        ]
        self._converts_results = any(self._result_conversions)

    def rows(self, conn: Connection, params: dict[str, Any]) -> list[tuple]:
        """Execute with `params` (bind name → value) on `conn`'s current transaction; all result rows."""
        cursor = None
        try:
            values = self._compiled.construct_params(params)  # adds the statement's own literal values
            for name, convert in self._bind_conversions:
                values[name] = convert(values[name])
            args = tuple(values[name] for name in self._positions) if self._positions is not None else values
            cursor = conn.connection.dbapi_connection.cursor()
            cursor.execute(self.sql, args)
            found = cursor.fetchall() if cursor.description is not None else []
            cursor.close()
        except BaseException as exc:  # noqa: BLE001 — as Connection.execute: exit exceptions invalidate too
            # SQLAlchemy's own handler (what Connection.execute calls): wraps the error (StatementError
            # for a value no processor could convert), hides the parameters (none are passed), closes
            # the cursor, and invalidates a dropped connection together with the pool's others.
            conn._handle_dbapi_exception(exc, self.sql, None, cursor, None)
        if not self._converts_results:
            return [tuple(row) for row in found]
        conversions = self._result_conversions
        return [tuple(convert(value) if convert else value for convert, value in zip(conversions, row))
                for row in found]

    def first(self, conn: Connection, params: dict[str, Any]) -> tuple | None:
        found = self.rows(conn, params)
        return found[0] if found else None


class Statements:
    """A module's named hot-path statements, each built and compiled on first use for each dialect."""

    def __init__(self, builders: dict[str, Builder]):
        self._builders = builders
        self._prepared: dict[tuple, Prepared] = {}

    def __call__(self, conn: Connection, name: str) -> Prepared:
        dialect = conn.dialect
        # What the compiled SQL depends on: the dialect and driver, its parameter style, the server version.
        key = (dialect.name, dialect.driver, dialect.paramstyle, dialect.server_version_info, name)
        prepared = self._prepared.get(key)
        if prepared is None:
            build, column_keys = self._builders[name]
            statement = build(postgresql if dialect.name == "postgresql" else sqlite)
            prepared = self._prepared[key] = Prepared(statement, dialect, column_keys)
        return prepared
