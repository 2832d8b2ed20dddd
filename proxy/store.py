"""SQL at the edge: record inbound messages and statuses, upsert windows, read windows, store attempts."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import NamedTuple

from sqlalchemy import Connection, bindparam, case, exists, func, literal_column, select, true, union_all
from sqlalchemy.dialects import postgresql, sqlite

from .db import held_messages, late_failures, messages, outbox, send_attempts, sticky_senders, windows
from .prepared import Statements

# Status callbacks can arrive out of order; a status only replaces one of lower rank,
# so a late "sent" never overwrites "delivered", and nothing overwrites a failure.
STATUS_RANK = {
    "accepted": 0,
    "scheduled": 0,
    "queued": 1,
    "sending": 2,
    "sent": 3,
    "receiving": 3,
    "received": 3,
    "partially_delivered": 4,
    "delivered": 4,
    "undelivered": 6,
    "failed": 6,
    "canceled": 6,
    "read": 5,
}


# Sends the proxy let through, by their send_attempts decision: the gateway's, then the worker's own creates.
SENT = ("allowed", "rerouted", "released", "fallback")


def _insert(conn: Connection, table):
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    return dialect.insert(table)


def record_inbound(
    conn: Connection,
    *,
    sid: str,
    sender: str,
    user: str,
    messaging_service_sid: str | None,
    profile_name: str | None,
    num_media: int | None,
    received_at: datetime,
    window_seconds: int,
) -> datetime | None:
    """Store an inbound message and open/extend its windows; the pair's new expiry, or None
    when the sid was already seen.

    A webhook Twilio retries carries the same MessageSid: it must change nothing.
    """
    expires_at = received_at + timedelta(seconds=window_seconds)
    if conn.dialect.name == "postgresql":
        # One statement, one round trip: the insert and the upserts it feeds (none for a known sid).
        rows = _statement(conn, "inbound_upsert").rows(conn, {
            "sid": sid, "sender": sender, "service_sid": messaging_service_sid, "user": user,
            "num_media": num_media, "received_at": received_at, "expires_at": expires_at,
            "profile_name": profile_name})
        return next((row_expires_at for row_sender, row_expires_at in rows if row_sender == sender), None)
    inserted = _statement(conn, "message_insert").first(
        conn,
        {
            "sid": sid,
            "direction": "inbound",
            "sender": sender,
            "user": user,
            "messaging_service_sid": messaging_service_sid,
            "status": "received",
            "status_rank": STATUS_RANK["received"],
            "num_media": num_media,
            "created_at": received_at,
            "updated_at": received_at,
        },
    )
    if inserted is None:
        return None
    if messaging_service_sid:
        _extend_window(conn, messaging_service_sid, user, expires_at, received_at, sid, profile_name)
    return _extend_window(conn, sender, user, expires_at, received_at, sid, profile_name)


def _extend_window(conn, sender, user, expires_at, received_at, sid, profile_name) -> datetime:
    # One atomic upsert: concurrent webhooks for one pair leave one row holding the
    # latest expiry, whatever order they commit in.
    (expiry,) = _statement(conn, "window_upsert").first(
        conn,
        {"sender": sender, "user": user, "expires_at": expires_at, "last_inbound_at": received_at,
         "last_inbound_sid": sid, "profile_name": profile_name, "updated_at": received_at},
    )
    return expiry


# The statements on every request's path are built and compiled once per dialect and run on the
# DBAPI cursor (proxy/prepared.py): building an upsert with case() expressions and its cache key,
# then SQLAlchemy's per-call execution, cost more CPU than the database's own work.
def _build_message_insert(dialect):
    return dialect.insert(messages).on_conflict_do_nothing(index_elements=["sid"]).returning(messages.c.sid)


def _build_window_upsert(dialect):
    return _on_conflict_keep_latest(dialect.insert(windows)).returning(windows.c.expires_at)


def _on_conflict_keep_latest(stmt):
    new = stmt.excluded
    newer = windows.c.last_inbound_at < new.last_inbound_at
    return stmt.on_conflict_do_update(
        index_elements=["sender", "user"],
        set_={
            "expires_at": case((windows.c.expires_at < new.expires_at, new.expires_at), else_=windows.c.expires_at),
            "last_inbound_at": case((newer, new.last_inbound_at), else_=windows.c.last_inbound_at),
            "last_inbound_sid": case((newer, new.last_inbound_sid), else_=windows.c.last_inbound_sid),
            "profile_name": case(
                (newer, func.coalesce(new.profile_name, windows.c.profile_name)), else_=windows.c.profile_name
            ),
            "updated_at": new.updated_at,
        },
    )


def _build_inbound_upsert(dialect):
    """PostgreSQL: WITH inserted AS (INSERT the message … ON CONFLICT DO NOTHING RETURNING sid)
    INSERT the pair's window (and the Messaging Service's) SELECTed from it … ON CONFLICT DO UPDATE:
    a known sid inserts nothing, so it upserts nothing; the same rules as the two statements."""
    at = bindparam("received_at", type_=messages.c.created_at.type)
    inserted = (
        dialect.insert(messages)
        .values(sid=bindparam("sid"), direction="inbound", sender=bindparam("sender"), user=bindparam("user"),
                messaging_service_sid=bindparam("service_sid"), status="received",
                status_rank=STATUS_RANK["received"], num_media=bindparam("num_media"), created_at=at, updated_at=at)
        .on_conflict_do_nothing(index_elements=["sid"])
        .returning(messages.c.sid)
        .cte("inserted")
    )
    # The Messaging Service row first, as the two statements did: one lock order for old and new workers.
    keys = union_all(select(bindparam("service_sid", type_=windows.c.sender.type).label("key")),
                     select(bindparam("sender", type_=windows.c.sender.type).label("key"))).subquery("keys")
    rows = (
        select(keys.c.key, bindparam("user", type_=windows.c.user.type),
               bindparam("expires_at", type_=windows.c.expires_at.type), at, inserted.c.sid,
               bindparam("profile_name", type_=windows.c.profile_name.type), at)
        .select_from(inserted.join(keys, true()))
        .where(keys.c.key.is_not(None))
    )
    stmt = dialect.insert(windows).from_select(
        ["sender", "user", "expires_at", "last_inbound_at", "last_inbound_sid", "profile_name", "updated_at"], rows)
    return _on_conflict_keep_latest(stmt).returning(windows.c.sender, windows.c.expires_at).add_cte(inserted)


def _build_status_upsert(dialect):
    return _status_on_conflict(dialect.insert(messages))


def _status_on_conflict(stmt):
    new = stmt.excluded
    return stmt.on_conflict_do_update(
        index_elements=["sid"],
        set_={
            "status": new.status,
            "status_rank": new.status_rank,
            "error_code": func.coalesce(new.error_code, messages.c.error_code),
            "updated_at": new.updated_at,
        },
        where=messages.c.status_rank < new.status_rank,
    ).returning(messages.c.sid)


_STATUS_COLUMNS = ("sid", "direction", "sender", "user", "status", "status_rank", "error_code", "created_at",
                   "updated_at")


def _build_status_and_sticky(dialect):
    """PostgreSQL: WITH upserted AS (the status upsert) SELECT whether it wrote, and the sticky candidate (LEFT JOINed,
    so one row always): a status callback's round trip stays one."""
    upsert = _status_on_conflict(dialect.insert(messages).values(
        {name: bindparam(name, type_=messages.c[name].type) for name in _STATUS_COLUMNS})).cte("upserted")
    candidate = _build_sticky_candidate(dialect).subquery("candidate")
    one = select(literal_column("1").label("one")).subquery("one")
    return (select(select(func.count()).select_from(upsert).scalar_subquery().label("changed"),
                   candidate.c.sender, candidate.c.user, candidate.c.created_at)
            .select_from(one.outerjoin(candidate, true())))


def _build_load_window(_dialect):
    return select(windows.c.expires_at, windows.c.last_inbound_at, windows.c.profile_name).where(
        windows.c.sender == bindparam("sender"), windows.c.user == bindparam("user"))


def _build_load_sticky(_dialect):
    return select(sticky_senders.c.sender).where(sticky_senders.c.service_sid == bindparam("service_sid"),
                                                 sticky_senders.c.user == bindparam("user"))


# A number callbacks keep naming is written again once a day at most: purge ages what was learnt by when a
# callback last named it, and a write per callback (several per message) would cost every status callback.
STICKY_REFRESH = timedelta(days=1)


def _build_sticky_candidate(_dialect):
    """The service, user and send time of the message sid, if it was a WhatsApp service send the proxy let through
    and the number is not known for that pair already (named within STICKY_REFRESH). A read: no row lock."""
    known = exists().where(sticky_senders.c.service_sid == send_attempts.c.sender,
                           sticky_senders.c.user == send_attempts.c.user,
                           sticky_senders.c.sender == bindparam("number", type_=sticky_senders.c.sender.type),
                           sticky_senders.c.updated_at > bindparam("fresh_after", type_=sticky_senders.c.updated_at.type))
    # No ORDER BY: every attempt of one sid is the same send's, and `ORDER BY id DESC LIMIT 1` lets PostgreSQL
    # walk the primary key backwards past every other attempt when the sid has none that matches.
    return (select(send_attempts.c.sender, send_attempts.c.user, send_attempts.c.created_at)
            .where(send_attempts.c.message_sid == bindparam("sid"), send_attempts.c.sender.startswith("MG"),
                   send_attempts.c.user.is_not(None), send_attempts.c.channel == "whatsapp",
                   # Spelt out: an expanding IN list has no SQL until executed, and this is compiled once.
                   send_attempts.c.decision.in_([literal_column(f"'{decision}'") for decision in SENT]), ~known)
            .limit(1))


def _build_sticky_upsert(dialect):
    """The number for (service, user), unless the one known came from a later send (callbacks come late and out of
    order: a `read` of last week's send names the number Twilio used then)."""
    stmt = dialect.insert(sticky_senders)
    new = stmt.excluded
    same = sticky_senders.c.sender == new.sender
    return stmt.on_conflict_do_update(
        index_elements=["service_sid", "user"],
        set_={"sender": new.sender, "updated_at": new.updated_at,
              "sent_at": case((same & (sticky_senders.c.sent_at > new.sent_at), sticky_senders.c.sent_at),
                              else_=new.sent_at)},
        where=same | (sticky_senders.c.sent_at <= new.sent_at),
    ).returning(sticky_senders.c.sender)


_WINDOW_COLUMNS = ("sender", "user", "expires_at", "last_inbound_at", "last_inbound_sid", "profile_name", "updated_at")
# name → (builder, the columns an INSERT is given)
_BUILDERS = {
    "message_insert": (_build_message_insert, ("sid", "direction", "sender", "user", "messaging_service_sid",
                                               "status", "status_rank", "num_media", "created_at", "updated_at")),
    "window_upsert": (_build_window_upsert, _WINDOW_COLUMNS),
    "status_upsert": (_build_status_upsert, _STATUS_COLUMNS),
    "status_and_sticky": (_build_status_and_sticky, None),
    "inbound_upsert": (_build_inbound_upsert, None),
    "load_window": (_build_load_window, None),
    "load_sticky": (_build_load_sticky, None),
    "sticky_candidate": (_build_sticky_candidate, None),
    "sticky_upsert": (_build_sticky_upsert, ("service_sid", "user", "sender", "sent_at", "updated_at")),
}
_statement = Statements(_BUILDERS)


def record_status(
    conn: Connection,
    *,
    sid: str,
    status: str,
    error_code: int | None,
    sender: str | None,
    user: str | None,
    at: datetime,
) -> bool:
    """Store the status of a message; False when a higher-ranked status was already known."""
    return _statement(conn, "status_upsert").first(conn, _status_params(sid, status, error_code, sender, user, at)) \
        is not None


def _status_params(sid, status, error_code, sender, user, at) -> dict:
    return {"sid": sid, "direction": "outbound", "sender": sender, "user": user, "status": status,
            "status_rank": STATUS_RANK.get(status, 0), "error_code": error_code, "created_at": at, "updated_at": at}


def record_callback(conn: Connection, *, sid: str, status: str, error_code: int | None, sender: str | None,
                    user: str | None, at: datetime) -> tuple[bool, "StickySender | None"]:
    """A status callback: record_status, and what its From teaches of a Messaging Service's number
    (sticky_candidate). On PostgreSQL one statement, so a callback still costs one round trip."""
    if conn.dialect.name != "postgresql" or not _names_a_number(sender):
        changed = record_status(conn, sid=sid, status=status, error_code=error_code, sender=sender, user=user, at=at)
        return changed, sticky_candidate(conn, sid=sid, number=sender, at=at)
    params = {**_status_params(sid, status, error_code, sender, user, at),
              "number": sender, "fresh_after": at - STICKY_REFRESH}
    changed, service_sid, service_user, sent_at = _statement(conn, "status_and_sticky").first(conn, params)
    learnt = StickySender(service_sid, service_user, sender, sent_at, at) if service_sid else None
    return bool(changed), learnt


class WindowRow(NamedTuple):
    expires_at: datetime
    last_inbound_at: datetime
    profile_name: str | None


def load_window(conn: Connection, sender: str, user: str) -> WindowRow | None:
    """The pair's window row, through the unique (sender, user) index; None when it has none."""
    row = _statement(conn, "load_window").first(conn, {"sender": sender, "user": user})
    return WindowRow(*row) if row else None


class JudgedWindow(NamedTuple):
    sender: str  # whose window: the sender's, or the number a Messaging Service sends to this user from
    row: WindowRow | None
    profile_name: str | None  # the user's: from that row, or from the service's own
    known: bool  # the user wrote to this sender, or (a service) to any of its numbers


def window_for(conn: Connection, sender: str, user: str, *, sticky: str | None = None) -> JudgedWindow:
    """The window a send from `sender` to `user` is judged by: a Messaging Service's is the window of the number the
    service sends to this user from (remember_sticky_sender, or `sticky`: learnt, not stored yet), when one is known;
    else the sender's own row."""
    if sender.startswith("MG"):
        found = (sticky,) if sticky else _statement(conn, "load_sticky").first(conn, {"service_sid": sender, "user": user})
        if found:
            row = load_window(conn, found[0], user)
            # The user may never have written to that number (the usual reason it is closed): their name, and
            # whether they wrote to the service at all, are in the service's own row.
            own = load_window(conn, sender, user) if row is None or row.profile_name is None else None
            return JudgedWindow(found[0], row, (row and row.profile_name) or (own and own.profile_name),
                                row is not None or own is not None)
    row = load_window(conn, sender, user)
    return JudgedWindow(sender, row, row.profile_name if row else None, row is not None)


class StickySender(NamedTuple):
    service_sid: str
    user: str
    sender: str
    sent_at: datetime
    updated_at: datetime


def sticky_candidate(conn: Connection, *, sid: str, number: str | None, at: datetime) -> StickySender | None:
    """A callback of message `sid` named the number it went from: if it was a WhatsApp send of the proxy's through a
    Messaging Service, that number is the one the service sends to this user from (Twilio's Sticky Sender). What
    to remember (remember_sticky_sender), or None: not such a send, or known already. A read only: status callbacks
    ask it inside their batched transaction, where a row lock taken out of the batch's order could deadlock."""
    if not _names_a_number(number):
        return None
    found = _statement(conn, "sticky_candidate").first(
        conn, {"sid": sid, "number": number, "fresh_after": at - STICKY_REFRESH})
    return StickySender(found[0], found[1], number, found[2], at) if found else None


def _names_a_number(sender: str | None) -> bool:
    return bool(sender) and sender.startswith("whatsapp:+")  # not none, a service's SID, a user id


def remember_sticky_sender(conn: Connection, learnt: StickySender) -> bool:
    """Store what sticky_candidate found; False when a later send's number is known already."""
    return _statement(conn, "sticky_upsert").first(conn, learnt._asdict()) is not None


def record_attempt(conn: Connection, **fields) -> None:
    conn.execute(_INSERT_ATTEMPT, fields)


_INSERT_ATTEMPT = send_attempts.insert()


def expiring_windows(conn: Connection, *, usable_after: datetime, usable_before: datetime, margin_seconds: int,
                     limit: int, after: tuple[datetime, int] | None = None):
    """Open windows whose usable end (expiry minus margin) falls in the range, soonest first.

    Keyset pagination on (expires_at, id) rides the expires_at index; Messaging Service rows
    are left out, they duplicate the (business number, user) row of the same inbound message.
    """
    margin = timedelta(seconds=margin_seconds)
    query = (
        select(windows.c.id, windows.c.sender, windows.c.user, windows.c.expires_at, windows.c.last_inbound_at,
               windows.c.profile_name)
        .where(windows.c.expires_at > usable_after + margin, windows.c.expires_at <= usable_before + margin,
               ~windows.c.sender.startswith("MG"))
        .order_by(windows.c.expires_at, windows.c.id)
        .limit(limit)
    )
    if after is not None:
        at, row_id = after
        query = query.where((windows.c.expires_at > at) | ((windows.c.expires_at == at) & (windows.c.id > row_id)))
    return conn.execute(query).all()


_FINISHED_HOLDS = ("released", "expired", "failed", "canceled")  # holds.FINISHED; holds imports this module


def purge(conn: Connection, cutoff: datetime) -> dict[str, int]:
    """Delete message and attempt records (and the late failures acted on) older than `cutoff`, and windows
    that closed before it.

    Open windows are never touched: their expiry is in the future, so never before a past cutoff.
    Pending outbox items and live holds are never touched either: only finished holds go (holds.FINISHED),
    never `held`, `sending` (being sent now) nor `uncertain` (Twilio may have taken it: for the operator to check).
    """
    return {
        "outbox": conn.execute(outbox.delete().where(outbox.c.status == "delivered",
                                                     outbox.c.updated_at < cutoff)).rowcount,
        # By when they finished (released_at, set for each finished status), not when they were held: one held
        # for a week and released a minute ago is still what a late 63016 on its release is matched to.
        "held_messages": conn.execute(held_messages.delete().where(
            held_messages.c.status.in_(_FINISHED_HOLDS),
            func.coalesce(held_messages.c.released_at, held_messages.c.created_at) < cutoff)).rowcount,
        "messages": conn.execute(messages.delete().where(messages.c.updated_at < cutoff)).rowcount,
        "send_attempts": conn.execute(send_attempts.delete().where(send_attempts.c.created_at < cutoff)).rowcount,
        "windows": conn.execute(windows.delete().where(windows.c.expires_at < cutoff)).rowcount,
        # Named by no callback for that long (one in use is confirmed daily): a service's next callback teaches it.
        "sticky_senders": conn.execute(sticky_senders.delete().where(sticky_senders.c.updated_at < cutoff)).rowcount,
        # Which late 63016s were acted on: the sends they were about go at the same age.
        "late_failures": conn.execute(late_failures.delete().where(late_failures.c.created_at < cutoff)).rowcount,
    }
