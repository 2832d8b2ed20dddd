"""store.record_inbound on the database under test: two statements on SQLite, one (a CTE) on PostgreSQL,
one set of rules — a known sid changes nothing, a late older message never shortens or rewinds a window."""

from datetime import datetime, timedelta, timezone

from sqlalchemy import select

from proxy import store
from proxy.db import messages, windows

BUSINESS, USER, SERVICE = "whatsapp:+14155550100", "whatsapp:+16505550123", "MG" + "c" * 32
DAY = 86_400
T0 = datetime(2026, 11, 26, 12, 0, tzinfo=timezone.utc)


def record(engine, sid, at, *, service=None, profile="Ada"):
    with engine.begin() as conn:
        return store.record_inbound(conn, sid=sid, sender=BUSINESS, user=USER, messaging_service_sid=service,
                                    profile_name=profile, num_media=1, received_at=at, window_seconds=DAY)


def window_rows(engine):
    with engine.connect() as conn:
        rows = conn.execute(select(windows).order_by(windows.c.sender)).mappings().all()
    return {r["sender"]: (r["expires_at"], r["last_inbound_at"], r["last_inbound_sid"], r["profile_name"])
            for r in rows}


def test_a_new_message_is_stored_and_opens_the_window(db_engine):
    assert record(db_engine, "SM" + "1" * 32, T0) == T0 + timedelta(seconds=DAY)
    assert window_rows(db_engine) == {BUSINESS: (T0 + timedelta(seconds=DAY), T0, "SM" + "1" * 32, "Ada")}
    with db_engine.connect() as conn:
        row = conn.execute(select(messages)).mappings().one()
    assert (row["sid"], row["direction"], row["sender"], row["user"], row["status"], row["num_media"],
            row["created_at"]) == ("SM" + "1" * 32, "inbound", BUSINESS, USER, "received", 1, T0)


def test_a_known_sid_changes_nothing(db_engine):
    record(db_engine, "SM" + "1" * 32, T0)
    before = window_rows(db_engine)
    assert record(db_engine, "SM" + "1" * 32, T0 + timedelta(hours=5), profile="Changed") is None
    assert window_rows(db_engine) == before


def test_a_newer_message_extends_and_keeps_the_profile_when_it_has_none(db_engine):
    record(db_engine, "SM" + "1" * 32, T0)
    later = T0 + timedelta(hours=3)
    assert record(db_engine, "SM" + "2" * 32, later, profile=None) == later + timedelta(seconds=DAY)
    assert window_rows(db_engine) == {BUSINESS: (later + timedelta(seconds=DAY), later, "SM" + "2" * 32, "Ada")}


def test_an_older_message_arriving_late_never_shortens_or_rewinds(db_engine):
    later = T0 + timedelta(hours=3)
    record(db_engine, "SM" + "2" * 32, later, profile="Newer")
    assert record(db_engine, "SM" + "1" * 32, T0, profile="Older") == later + timedelta(seconds=DAY)
    assert window_rows(db_engine) == {BUSINESS: (later + timedelta(seconds=DAY), later, "SM" + "2" * 32, "Newer")}


def test_a_messaging_service_message_opens_both_rows_and_answers_the_numbers(db_engine):
    record(db_engine, "SM" + "0" * 32, T0 - timedelta(hours=30))  # an expired row for the number
    assert record(db_engine, "SM" + "1" * 32, T0, service=SERVICE) == T0 + timedelta(seconds=DAY)
    expected = (T0 + timedelta(seconds=DAY), T0, "SM" + "1" * 32, "Ada")
    assert window_rows(db_engine) == {BUSINESS: expected, SERVICE: expected}
