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


def test_a_value_no_type_can_convert_is_sqlalchemys_statement_error(db_engine):
    from sqlalchemy.exc import StatementError

    naive = datetime(2026, 11, 26, 12, 0)  # UTCDateTime refuses naive datetimes
    with pytest.raises(StatementError) as caught, db_engine.begin() as conn:
        insert(db_engine).rows(conn, row("SM1", naive))
    assert SECRET not in str(caught.value)


def test_anonymous_parameters_get_their_types_conversion(db_engine):
    from sqlalchemy import literal

    from proxy.db import UTCDateTime

    at = datetime(2026, 11, 26, 12, 0, 0, 5, tzinfo=timezone.utc)
    with db_engine.begin() as conn:
        insert(db_engine).rows(conn, row("SM1", at))
    probe = Prepared(select(messages.c.sid).where(messages.c.created_at == literal(at, UTCDateTime())),
                     db_engine.dialect)
    with db_engine.connect() as conn:
        assert probe.rows(conn, {}) == [("SM1",)]


def test_a_server_restart_invalidates_every_pooled_connection_not_just_the_one_that_saw_it(db_engine):
    if db_engine.dialect.name != "postgresql":
        pytest.skip("a SQLite connection cannot be dropped by a server")
    probe = Prepared(select(messages.c.sid).where(messages.c.sid == bindparam("sid")), db_engine.dialect)
    first, second, other = db_engine.connect(), db_engine.connect(), db_engine.connect()
    pids = [c.execute(text("SELECT pg_backend_pid()")).scalar_one() for c in (first, second)]
    first.close()
    second.close()  # both back in the pool, as after a burst of requests
    for pid in pids:  # a third connection plays the restart
        other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    other.invalidate()  # and stays out of the pool: only the two stale ones are left there
    other.close()
    with db_engine.connect() as conn, pytest.raises(OperationalError):
        probe.rows(conn, {"sid": "SM1"})
    with db_engine.connect() as conn:  # the other stale connection is not handed out again
        assert probe.rows(conn, {"sid": "SM1"}) == []
