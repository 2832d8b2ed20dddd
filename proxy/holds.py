"""Hold rerouted sends until the user writes again; release them in order, each judged again."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

from sqlalchemy import Connection, and_, exists, func, literal, or_, select, text, update
from werkzeug.datastructures import MultiDict

from . import outbox, store
from .db import held_messages, outbox as outbox_rows, send_attempts, windows
from .errors import ApiError
from .judge import schedulable, send_time
from .policy import SCHEDULING

HELD, SENDING, RELEASED, EXPIRED, FAILED, UNCERTAIN = "held", "sending", "released", "expired", "failed", "uncertain"
CANCELED = "canceled"  # withdrawn by the app or an operator before its release (Twilio's word for a scheduled one's)
STATUSES = (HELD, SENDING, RELEASED, EXPIRED, FAILED, UNCERTAIN, CANCELED)
# What purge may delete (proxy/store.py spells them out: it cannot import this module). `sending` is live: a
# hold being sent right now. `uncertain` (Twilio may have taken it) waits for an operator, as the outbox's does.
FINISHED = (RELEASED, EXPIRED, FAILED, CANCELED)


# Twilio schedules a message 5 minutes to 35 days ahead, and refuses any other SendAt with 35115; a minute more,
# for the judge, the Content API, the network and the clocks between this check and Twilio's.
SCHEDULE_MIN_LEAD = timedelta(minutes=6)


def as_released(params: list[tuple[str, str]], now: datetime) -> list[tuple[str, str]]:
    """A held send's fields as its release sends them: one scheduled for a time gone by, or too near for Twilio to
    schedule it, is sent now, as it would have gone had the window been open (released with its SendAt, Twilio
    refused it with 35115, and the message was lost). One still far enough ahead (SCHEDULE_MIN_LEAD) stays scheduled."""
    if not any(name == "SendAt" and value.strip() for name, value in params) or not schedulable(MultiDict(params)):
        return params  # nothing scheduled; a SendAt Twilio will not schedule is Twilio's to refuse or drop
    try:
        at = send_time(MultiDict(params), now)  # read as the judge reads it: no offset is UTC, a past time is now
    except ApiError:  # refused at the gateway before it could be held: kept as it is
        return params
    if at - now >= SCHEDULE_MIN_LEAD:
        return params
    return [(name, value) for name, value in params if name not in SCHEDULING]


def hold(conn: Connection, *, sender: str, user: str, account_sid: str, params: list, request_id: str,
         now: datetime, ttl_seconds: int, judged_inbound_at: datetime | None,
         window_sender: str | None = None) -> tuple[int, bool]:
    """Keep a rerouted send; its id, and whether its release was queued at once.

    `judged_inbound_at` is the last inbound message of the window the judge read (`window_sender`'s: for a
    Messaging Service, the number it sends to this user from), as it saw it. The hold is stored
    only after Twilio answered the fallback, so the user may have written in between: that webhook
    found nothing held and queued no release, and would leave this one waiting for the next message.
    """
    lock_pair(conn, sender, user)
    held_id = conn.execute(
        held_messages.insert()
        .values(sender=sender, user=user, account_sid=account_sid, params=json.dumps(params), status=HELD,
                request_id=request_id, created_at=now, expires_at=now + timedelta(seconds=ttl_seconds))
        .returning(held_messages.c.id)
    ).scalar_one()
    window = store.load_window(conn, window_sender or sender, user)
    wrote_since = window is not None and window.last_inbound_at != judged_inbound_at
    if wrote_since:
        queue_release(conn, sender, user, now)  # judged again when released, like any release
    return held_id, wrote_since


def release_if_held(conn: Connection, sender: str, user: str, now: datetime) -> bool:
    """An inbound message opened the pair's window: queue the release of its held messages, if any."""
    lock_pair(conn, sender, user)
    if not any_held(conn, sender, user, now):
        return False
    queue_release(conn, sender, user, now)
    return True


def release_where_written(conn: Connection, now: datetime, margin_seconds: int) -> list[tuple[str, str]]:
    """Queue the release of each pair whose user wrote after its messages were held, when no webhook did:
    HOLD_ON_REROUTE was turned off with messages still held (webhooks then queue no release). The pairs.

    The worker's sweep, run only while the setting is off, so an inbound webhook's write stays one statement.
    Only windows the judge still counts open (`margin_seconds`, WINDOW_SAFETY_MARGIN_SECONDS, before they
    close): in the margin a release would find its messages still held, and the next sweep queue another.
    """
    # One release per message of the user, as the webhook path queues: a release that left its messages held
    # (a SendAt past the window's end, a paused template) is not queued again until the user writes again.
    release_since = exists().where(
        outbox_rows.c.ordering_key == literal("release:") + held_messages.c.sender + literal("|")
        + held_messages.c.user,
        or_(outbox_rows.c.status == outbox.PENDING, outbox_rows.c.created_at >= windows.c.last_inbound_at))
    pairs = conn.execute(
        select(held_messages.c.sender, held_messages.c.user).distinct()
        .join(windows, and_(windows.c.sender == held_messages.c.sender, windows.c.user == held_messages.c.user))
        .where(held_messages.c.status == HELD, held_messages.c.expires_at > now,
               windows.c.expires_at > now + timedelta(seconds=margin_seconds),
               windows.c.last_inbound_at > held_messages.c.created_at, ~release_since)
    ).all()
    queued = []
    for sender, user in pairs:
        lock_pair(conn, sender, user)
        # Under the pair's turn, again: another worker's sweep may have queued it since the query above.
        if not outbox.has_pending(conn, release_key(sender, user)) and release_if_held(conn, sender, user, now):
            queued.append((sender, user))
    return queued


def release_key(sender: str, user: str) -> str:
    """The outbox ordering key of a pair's releases (`release_where_written` builds the same in SQL)."""
    return f"release:{sender}|{user}"


def queue_release(conn: Connection, sender: str, user: str, now: datetime) -> int:
    return outbox.enqueue(conn, kind="release", ordering_key=release_key(sender, user), target=f"{sender}\n{user}",
                          headers={}, body=[], now=now)


def lock_pair(conn: Connection, sender: str, user: str) -> None:
    """Take the pair's hold/inbound turn until the transaction ends.

    Under PostgreSQL's READ COMMITTED a hold and an inbound message of one pair, committing at the same
    time, could each miss the other's uncommitted row (write skew): the hold sees no new message, the
    message sees no hold, and nothing releases it. Whichever takes the turn second sees what the first
    committed. SQLite's writers already take turns (db.writing).
    """
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:pair, 0))"),
                     {"pair": f"hold:{sender}\n{user}"})


def any_held(conn: Connection, sender: str, user: str, now: datetime) -> bool:
    return conn.execute(select(exists().where(
        held_messages.c.sender == sender, held_messages.c.user == user, held_messages.c.status == HELD,
        held_messages.c.expires_at > now))).scalar()


def held_for(conn: Connection, sender: str, user: str, now: datetime):
    """The pair's live held messages, oldest first."""
    return conn.execute(
        select(held_messages)
        .where(held_messages.c.sender == sender, held_messages.c.user == user, held_messages.c.status == HELD,
               held_messages.c.expires_at > now)
        .order_by(held_messages.c.id)
    ).mappings().all()


def take(conn: Connection, held_id: int, now: datetime) -> bool:
    """Move one held message to `sending` (its `released_at` then says since when, and names this take: `mark`'s
    `taken_at`); only one worker ever wins it, and it is never sent twice."""
    return conn.execute(update(held_messages).where(held_messages.c.id == held_id, held_messages.c.status == HELD)
                        .values(status=SENDING, released_at=now).returning(held_messages.c.id)).first() is not None


def abandoned(conn: Connection, now: datetime, lease_seconds: float) -> list[dict]:
    """Settle held messages still `sending` a whole lease after their send began: the worker stopped during the
    create, or could not record its outcome (the database went away just after Twilio answered). The attempt
    row the create left, if stored, says what came of it: `released` with its sid, or `failed` for a refusal;
    without one, `uncertain` (Twilio may have taken it). Returns the settled rows, for one log line each."""
    # Taken by a release of before this field was set (an upgrade under a running worker): its lease starts now.
    conn.execute(update(held_messages).where(held_messages.c.status == SENDING, held_messages.c.released_at.is_(None))
                 .values(released_at=now))
    stuck = conn.execute(
        select(held_messages.c.id, held_messages.c.sender, held_messages.c.user, held_messages.c.request_id,
               held_messages.c.released_at)
        .where(held_messages.c.status == SENDING, held_messages.c.released_at < now - timedelta(seconds=lease_seconds))
        .order_by(held_messages.c.id)
    ).mappings().all()
    settled = []
    for row in stuck:
        attempt = conn.execute(
            select(send_attempts.c.outcome, send_attempts.c.upstream_status, send_attempts.c.message_sid)
            .where(send_attempts.c.request_id == row["request_id"], send_attempts.c.decision == RELEASE_DECISION,
                   send_attempts.c.sender == row["sender"], send_attempts.c.user == row["user"],
                   send_attempts.c.created_at >= row["released_at"])
            .order_by(send_attempts.c.id.desc()).limit(1)
        ).first()
        if attempt is not None and attempt.outcome == "sent":
            status, sid, error = RELEASED, attempt.message_sid, None
        elif attempt is not None and (attempt.outcome == "upstream_unreachable" or attempt.upstream_status == 429):
            status, sid, error = HELD, None, "Twilio did not take it; held again"  # as the worker does (Retry)
        elif attempt is not None and attempt.upstream_status is not None and 400 <= attempt.upstream_status < 500:
            status, sid, error = FAILED, None, f"Twilio answered {attempt.upstream_status}"
        else:
            status, sid, error = UNCERTAIN, None, ABANDONED
        done = conn.execute(update(held_messages)
                            .where(held_messages.c.id == row["id"], held_messages.c.status == SENDING,
                                   held_messages.c.released_at == row["released_at"])  # still that take
                            .values(status=status, released_at=None if status == HELD else now, message_sid=sid,
                                    last_error=error))
        if done.rowcount:  # not settled meanwhile by its worker, late
            settled.append({**row, "status": status, "message_sid": sid, "error": error})
    # Held again, with no release on its way: the release that took it has gone on (or was claimed again and
    # finished) without it, and it waited for the user's next message in a window open now. Judged again there.
    for sender, user in dict.fromkeys((row["sender"], row["user"]) for row in settled if row["status"] == HELD):
        queue_release(conn, sender, user, now)
    return settled


# The send_attempts decision of a release's create (worker.RELEASED, which imports this module).
RELEASE_DECISION = "released"
ABANDONED = "its send began and no outcome was recorded: Twilio may have taken it; not sent again"


def mark(conn: Connection, held_id: int, status: str, now: datetime, *, message_sid: str | None = None,
         error: str | None = None, expected: str | None = None, taken_at: datetime | None = None) -> bool:
    """Set a held message's status; only if it is still `expected` (when given), and still the take made at
    `taken_at` (when given). Whether it was set: a release's outcome must not overwrite what a late 63016 did
    meanwhile (held again: late_failures), nor a later take of the same message by another release."""
    statement = update(held_messages).where(held_messages.c.id == held_id)
    if expected is not None:
        statement = statement.where(held_messages.c.status == expected)
    if taken_at is not None:
        statement = statement.where(held_messages.c.released_at == taken_at)
    return conn.execute(statement.values(status=status, released_at=None if status == HELD else now,
                                         message_sid=message_sid, last_error=error[:500] if error else None)
                        ).rowcount > 0


def expire(conn: Connection, now: datetime) -> list:
    """Drop holds past their TTL; returns the dropped rows for logging."""
    rows = conn.execute(
        update(held_messages).where(held_messages.c.status == HELD, held_messages.c.expires_at <= now)
        .values(status=EXPIRED, released_at=now)
        .returning(held_messages.c.id, held_messages.c.sender, held_messages.c.user, held_messages.c.request_id)
    ).all()
    return rows


def counts(conn: Connection) -> dict[str, int]:
    """Held messages by status (the metrics' gauge)."""
    return dict(conn.execute(select(held_messages.c.status, func.count()).group_by(held_messages.c.status)).all())


_LISTED = (held_messages.c.id, held_messages.c.sender, held_messages.c.user, held_messages.c.status,
           held_messages.c.created_at, held_messages.c.expires_at, held_messages.c.released_at,
           held_messages.c.message_sid, held_messages.c.last_error, held_messages.c.request_id)


def one(conn: Connection, held_id: int):
    """A held message as `listing` shows it; None if there is none by this id (or it was purged)."""
    return conn.execute(select(*_LISTED).where(held_messages.c.id == held_id)).mappings().first()


def cancel(conn: Connection, held_id: int, now: datetime) -> tuple[dict, bool]:
    """Withdraw a message still `held`, so no release sends it (DELETE /v1/held/{id}, `held cancel`): the row as it
    is afterwards, and whether this call canceled it (a repeated cancel finds it canceled). ApiError 404 for no
    such id, 409 for one no longer held.

    Conditional, like `take`: a release that took it first has it (`sending`), and the cancel finds it so."""
    done = conn.execute(update(held_messages).where(held_messages.c.id == held_id, held_messages.c.status == HELD)
                        .values(status=CANCELED, released_at=now, last_error=None))
    row = one(conn, held_id)
    if row is None:
        raise ApiError(20404, 404, f"No held message {held_id}.")
    if row["status"] == SENDING:
        # Its release has it now: sent, or put back to `held` if Twilio never received it (then cancelable again).
        raise ApiError(409, 409, f"Held message {held_id} is being sent: if Twilio does not take it, it is held "
                                 f"again and can be canceled then (GET /v1/held/{held_id} says which).")
    if row["status"] != CANCELED:  # sent, expired, failed: nothing left to withdraw; said, not pretended
        raise ApiError(409, 409, f"Held message {held_id} is {row['status']}: only a message still held can be "
                                 "canceled.")
    return row, bool(done.rowcount)


def listing(conn: Connection, *, sender: str | None = None, user: str | None = None, status: str | None = HELD,
            limit: int = 100, after_id: int = 0):
    """Held messages by id (oldest first), those after `after_id`: a page of `limit`."""
    query = select(*_LISTED)
    if sender:
        query = query.where(held_messages.c.sender == sender)
    if user:
        query = query.where(held_messages.c.user == user)
    if status:
        query = query.where(held_messages.c.status == status)
    if after_id:
        query = query.where(held_messages.c.id > after_id)
    return conn.execute(query.order_by(held_messages.c.id).limit(limit)).mappings().all()
