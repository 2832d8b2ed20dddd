"""proxy/holds.py: what a release sends; a message is taken for sending once; on PostgreSQL, a hold and an inbound message of one pair committing at the same time.

Under READ COMMITTED each transaction could miss the other's uncommitted row: the hold sees no new
message, the message sees no hold, and the held message waits in an open window. SQLite's writers
take turns (proxy/db.py `writing`), so there the two cannot overlap; tests/http/test_forwarding.py
covers the interleaving through HTTP on both databases.
"""

import threading
import time
from datetime import datetime, timezone

import pytest
from sqlalchemy import select, text

from proxy import holds, store
from proxy.db import outbox, utcnow
from tests.conftest import ACCOUNT_SID, BUSINESS, USER


@pytest.fixture
def pg(db_engine):
    if db_engine.dialect.name != "postgresql":
        pytest.skip("SQLite writers take turns on the proxy's write lock: a hold and an inbound never overlap")
    return db_engine


def record_inbound(conn, now, sid="SM" + "5" * 32):
    return store.record_inbound(conn, sid=sid, sender=BUSINESS, user=USER, messaging_service_sid=None,
                                profile_name="Ada", num_media=0, received_at=now, window_seconds=86400)


def hold(conn, now):
    return holds.hold(conn, sender=BUSINESS, user=USER, account_sid=ACCOUNT_SID, params=[["Body", "x"]],
                      request_id="r", now=now, ttl_seconds=3600, judged_inbound_at=None)


def in_thread(work):
    """Run `work` in its own transaction on another thread; its result lands in the returned list."""
    result = []
    thread = threading.Thread(target=lambda: result.append(work()))
    thread.start()
    return thread, result


def wait_until_blocked_or_done(engine, thread):
    """Until `thread` waits for the pair's advisory lock (or, without the lock, simply finished)."""
    deadline = time.monotonic() + 30  # a guard against a hang, not a timing assertion
    with engine.connect() as conn:
        while thread.is_alive() and time.monotonic() < deadline:
            if conn.execute(text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")).scalar():
                return
            time.sleep(0.01)


def releases(engine):
    with engine.connect() as conn:
        return conn.execute(select(outbox.c.kind, outbox.c.target)).all()


def test_a_hold_committed_while_an_inbound_transaction_is_open_is_released_by_it(pg):
    now = utcnow()
    with pg.connect() as holder:
        tx = holder.begin()
        held_id, queued = hold(holder, now)
        assert not queued  # no message yet

        def inbound():
            with pg.begin() as conn:
                assert record_inbound(conn, now)
                return holds.release_if_held(conn, BUSINESS, USER, now)

        thread, result = in_thread(inbound)
        wait_until_blocked_or_done(pg, thread)
        tx.commit()
    thread.join()
    assert result == [True]
    assert releases(pg) == [("release", f"{BUSINESS}\n{USER}")]


def test_an_inbound_committed_while_a_hold_transaction_is_open_is_seen_by_the_hold(pg):
    now = utcnow()
    with pg.connect() as receiver:
        tx = receiver.begin()
        assert record_inbound(receiver, now)
        assert holds.release_if_held(receiver, BUSINESS, USER, now) is False  # nothing held yet

        def hold_it():
            with pg.begin() as conn:
                return hold(conn, now)

        thread, result = in_thread(hold_it)
        wait_until_blocked_or_done(pg, thread)
        tx.commit()
    thread.join()
    [(_, queued)] = result
    assert queued is True
    assert releases(pg) == [("release", f"{BUSINESS}\n{USER}")]


def test_a_held_message_is_taken_for_sending_once(db_engine):
    """Moved to `sending` before it is sent: a second release (another worker, a replay) finds it taken."""
    now = utcnow()
    with db_engine.begin() as conn:
        held_id, _ = hold(conn, now)
    with db_engine.begin() as conn:
        assert holds.take(conn, held_id, utcnow()) is True
    with db_engine.begin() as conn:
        assert holds.take(conn, held_id, utcnow()) is False
        holds.mark(conn, held_id, holds.RELEASED, utcnow(), message_sid="SM" + "6" * 32)
        assert holds.take(conn, held_id, utcnow()) is False
        assert holds.held_for(conn, BUSINESS, USER, utcnow()) == []


def test_two_workers_sweeping_at_once_queue_one_release(pg):
    """HOLD_ON_REROUTE turned off: each worker's sweep looks for pairs to release before it takes the pair's
    turn; the second, waiting for the first's commit, must then see its release and queue none."""
    now = utcnow()
    with pg.begin() as conn:
        hold(conn, now)
    with pg.begin() as conn:
        record_inbound(conn, utcnow())
    with pg.connect() as first:
        transaction = first.begin()
        assert holds.release_where_written(first, utcnow(), 0) == [(BUSINESS, USER)]

        def other_worker():
            with pg.begin() as conn:
                return holds.release_where_written(conn, utcnow(), 0)

        thread, result = in_thread(other_worker)
        wait_until_blocked_or_done(pg, thread)
        transaction.commit()
    thread.join()
    assert result == [[]]
    assert [kind for kind, _ in releases(pg)] == ["release"]


NOW = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)
SERVICE = ("MessagingServiceSid", "MG" + "1" * 32)
SCHEDULED = [("To", "whatsapp:+14155550111"), SERVICE, ("Body", "x"), ("SendAt", "{}"), ("ScheduleType", "fixed")]


@pytest.mark.parametrize("send_at, kept", [
    ("2026-11-27T11:00:00Z", False),           # gone by
    ("2026-11-27T12:04:59+00:00", False),      # under Twilio's 5 minutes ahead: it would refuse it (35115)
    ("2026-11-27T12:05:30Z", False),           # just over, but not once the send has reached Twilio
    ("2026-11-27T12:06:00Z", True),            # far enough ahead: stays scheduled
    ("2026-11-29T12:00:00Z", True),
    ("2026-11-27T12:01:00", False),            # no offset: UTC, as the judge reads it
    ("not a time", True),                      # refused at the gateway, never held: left as it is
])
def test_a_release_sends_now_what_can_no_longer_be_scheduled(send_at, kept):
    params = [(k, send_at if k == "SendAt" else v) for k, v in SCHEDULED]
    released = holds.as_released(params, NOW)
    assert released == (params if kept else [("To", "whatsapp:+14155550111"), SERVICE, ("Body", "x")])
    assert holds.as_released([("To", "x"), ("Body", "y")], NOW) == [("To", "x"), ("Body", "y")]
    # Without a Messaging Service Twilio schedules nothing: what it gets is what the caller sent.
    unscheduled = [(k, v) for k, v in params if k != "MessagingServiceSid"]
    assert holds.as_released(unscheduled, NOW) == unscheduled
    # Nor without ScheduleType=fixed.
    unscheduled = [(k, v) for k, v in params if k != "ScheduleType"]
    assert holds.as_released(unscheduled, NOW) == unscheduled
