"""Hot-path statements: built and compiled once by SQLAlchemy, run on the connection's DBAPI cursor.

Measured here (bench/README.md): SQLAlchemy's `Connection.execute` of an already-cached statement
costs 65–125 µs of CPU (execution context, parameter and result objects), while SQLite answers a
window lookup in ~7 µs. The statements on every request's path (window lookup, inbound upsert,
status upsert) skip that layer: SQLAlchemy still writes the SQL for the dialect, supplies the type
conversions (`bind_processor` / `result_processor`, so values are stored exactly as its own
execution stores them), owns the pool and the transaction; only the per-call machinery is left out.
Database errors are raised as SQLAlchemy's exception classes, and a connection the database
dropped is invalidated, as `Connection.execute` would do, so callers and error handlers see no
difference.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from sqlalchemy import Connection
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import ClauseElement


class Prepared:
    """One statement for one dialect: `rows(conn, params)` → list of tuples, types converted."""

    def __init__(self, statement: ClauseElement, dialect: Dialect, column_keys: Sequence[str] | None = None):
        # column_keys: the columns an INSERT is given, as Connection.execute would compile it for them.
        compiled = statement.compile(dialect=dialect, column_keys=list(column_keys) if column_keys else None)
        self.sql = compiled.string
        self._compiled = compiled
        self._positions = tuple(compiled.positiontup) if compiled.positional else None
        self._bind_conversions = [
            (name, convert) for name, bind in compiled.binds.items()
            if (convert := bind.type.dialect_impl(dialect).bind_processor(dialect)) is not None
        ]
        columns = getattr(statement, "exported_columns", ())
        self._result_conversions: list[Callable[[Any], Any] | None] = [
            column.type.dialect_impl(dialect).result_processor(dialect, None) for column in columns
        ]
        self._converts_results = any(self._result_conversions)

    def rows(self, conn: Connection, params: dict[str, Any]) -> list[tuple]:
        """Execute with `params` (bind name → value) on `conn`'s current transaction; all result rows."""
        values = self._compiled.construct_params(params)  # adds the statement's own literal values
        for name, convert in self._bind_conversions:
            values[name] = convert(values[name])
        args = tuple(values[name] for name in self._positions) if self._positions is not None else values
        dbapi_connection = conn.connection.dbapi_connection
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(self.sql, args)
            found = cursor.fetchall() if cursor.description is not None else []
        except conn.dialect.loaded_dbapi.Error as exc:
            raise self._translated(conn, dbapi_connection, cursor, exc) from exc
        finally:
            cursor.close()
        if not self._converts_results:
            return [tuple(row) for row in found]
        conversions = self._result_conversions
        return [tuple(convert(value) if convert else value for convert, value in zip(conversions, row))
                for row in found]

    def first(self, conn: Connection, params: dict[str, Any]) -> tuple | None:
        found = self.rows(conn, params)
        return found[0] if found else None

    def _translated(self, conn: Connection, dbapi_connection, cursor, exc: Exception) -> BaseException:
        dialect = conn.dialect
        invalidated = dialect.is_disconnect(exc, dbapi_connection, cursor)
        if invalidated:
            conn.invalidate(exc)  # as Connection.execute does: the pool replaces it
        # Never the parameters: a message body must not reach a log through an exception.
        return DBAPIError.instance(self.sql, None, exc, dialect.loaded_dbapi.Error, hide_parameters=True,
                                   connection_invalidated=invalidated, dialect=dialect)
