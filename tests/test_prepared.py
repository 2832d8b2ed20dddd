"""proxy.prepared on the database under test: what it stores and reads is what SQLAlchemy's own
execution stores and reads, and a database error surfaces as SQLAlchemy's exception, never with values."""

from datetime import datetime, timezone

import pytest
from sqlalchemy import bindparam, select, text
from sqlalchemy.exc import DataError, IntegrityError, OperationalError

from proxy.db import messages
from proxy.prepared import Prepared

COLUMNS = ("sid", "direction", "sender", "user", "status", "status_rank", "num_media", "created_at", "updated_at")
SECRET = "whatsapp:+16505550199"


def row(sid, at, **extra):
    return {"sid": sid, "direction": "inbound", "sender": "whatsapp:+14155550100", "user": SECRET,
            "status": "received", "status_rank": 3, "num_media": None, "created_at": at, "updated_at": at} | extra


def insert(engine):
    return Prepared(messages.insert(), engine.dialect, COLUMNS)


def read_back(engine):
    return Prepared(select(messages.c.sid, messages.c.created_at, messages.c.num_media)
                    .where(messages.c.sid == bindparam("sid")), engine.dialect)


@pytest.mark.parametrize("at", [datetime(2026, 11, 26, 12, 0, tzinfo=timezone.utc),  # no microseconds
                                datetime(2026, 11, 26, 12, 0, 1, 250, tzinfo=timezone.utc)])
def test_values_round_trip_as_sqlalchemy_stores_them(db_engine, at):
    with db_engine.begin() as conn:
        insert(db_engine).rows(conn, row("SM1", at))
        conn.execute(messages.insert(), row("SM2", at, num_media=2))
    with db_engine.connect() as conn:
        # Written by Prepared, read by SQLAlchemy; written by SQLAlchemy, read by Prepared.
        assert conn.execute(select(messages.c.created_at).where(messages.c.sid == "SM1")).scalar_one() == at
        assert read_back(db_engine).first(conn, {"sid": "SM2"}) == ("SM2", at, 2)
        assert read_back(db_engine).first(conn, {"sid": "SM1"}) == ("SM1", at, None)
        assert read_back(db_engine).first(conn, {"sid": "nothing"}) is None
        # Equal strings on SQLite: a range comparison in SQL sees one format.
        stored = conn.execute(text("SELECT created_at FROM messages ORDER BY sid")).scalars().all()
        assert stored[0] == stored[1]


def test_a_refused_row_is_sqlalchemys_integrity_error_without_the_values(db_engine):
    at = datetime(2026, 11, 26, 12, 0, tzinfo=timezone.utc)
    with db_engine.begin() as conn:
        insert(db_engine).rows(conn, row("SM1", at))
    with pytest.raises(IntegrityError) as caught, db_engine.begin() as conn:
        insert(db_engine).rows(conn, row("SM1", at))  # the same primary key
    assert SECRET not in str(caught.value)
    with db_engine.connect() as conn:  # the failed transaction left nothing half-done
        assert conn.execute(select(messages.c.sid)).scalars().all() == ["SM1"]


def test_a_value_too_long_for_postgresql_is_a_data_error(db_engine):
    if db_engine.dialect.name != "postgresql":
        pytest.skip("SQLite does not enforce VARCHAR lengths")
    at = datetime(2026, 11, 26, 12, 0, tzinfo=timezone.utc)
    with pytest.raises(DataError) as caught, db_engine.begin() as conn:
        insert(db_engine).rows(conn, row("SM1", at, user=SECRET + "9" * 200))
    assert SECRET not in str(caught.value)


def test_a_connection_the_server_dropped_is_invalidated_and_replaced(db_engine):
    if db_engine.dialect.name != "postgresql":
        pytest.skip("a SQLite connection cannot be dropped by a server")
    probe = Prepared(select(messages.c.sid).where(messages.c.sid == bindparam("sid")), db_engine.dialect)
    with db_engine.connect() as conn:
        backend = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        with db_engine.connect() as other:
            other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": backend})
        with pytest.raises(OperationalError) as caught:
            probe.rows(conn, {"sid": "SM1"})
        assert caught.value.connection_invalidated
        assert conn.invalidated
    with db_engine.connect() as conn:  # the pool hands out a live connection again
        assert probe.rows(conn, {"sid": "SM1"}) == []
