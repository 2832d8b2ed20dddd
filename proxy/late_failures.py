"""React to Twilio's late 63016: the window was really closed, so close it and, if asked, send the fallback."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta

from sqlalchemy import Connection, and_, or_, select, update
from werkzeug.datastructures import MultiDict

from . import holds, logs, outbox, store
from .db import held_messages, late_failures, send_attempts, windows
from .errors import ApiError
from .judge import send_time
from .policy import rerouted_params
from .runtime import Runtime
from .store import _insert

LATE_WINDOW_FAILURE = 63016
SENT = store.SENT
# Those whose message was a fallback template: its failure must not send another (each has a new sid: a loop).
FALLBACKS = ("rerouted", "fallback")
# Seconds before each check of a callback whose send was not recorded yet (another process's attempt writer
# stores it ~50 ms after the send, later while the database is busy); after the last, it is not a proxy send.
RECHECK_SECONDS = (5, 30, 120)
KIND = "late_failure"


def on_callback(rt: Runtime, conn: Connection, *, sid: str, callback_sender: str | None, now: datetime,
                learnt: store.StickySender | None = None) -> str:
    """A `failed`/`undelivered` + 63016 callback: act on it now, or check again later if its send is not recorded yet.
    `learnt`: the Messaging Service's number the callback teaches (store.sticky_candidate), not stored yet."""
    action = handle(rt, conn, sid=sid, callback_sender=callback_sender, now=now, learnt=learnt)
    if action is not None:
        return action
    key = f"late:{sid}"
    if not outbox.has_pending(conn, key):  # Twilio repeating the callback: one check in line is enough
        outbox.enqueue(conn, kind=KIND, ordering_key=key, target=sid, headers={},
                       body=[["MessageSid", sid], ["From", callback_sender or ""]], now=now,
                       due=now + timedelta(seconds=RECHECK_SECONDS[0]))
    return "deferred"


def handle(rt: Runtime, conn: Connection, *, sid: str, callback_sender: str | None, now: datetime,
           learnt: store.StickySender | None = None) -> str | None:
    """Act once per message sid on a `failed`/`undelivered` + 63016 callback for a send the proxy let through; None when
    no such send is recorded (yet). A service send's number (Sticky Sender) is stored last, after every other row,
    as the status batches store it (proxy/webhooks.py): one lock order."""
    attempt = conn.execute(
        select(send_attempts.c.sender, send_attempts.c.user, send_attempts.c.account_sid, send_attempts.c.params,
               send_attempts.c.content_type, send_attempts.c.created_at, send_attempts.c.duration_ms,
               send_attempts.c.decision, send_attempts.c.request_id, send_attempts.c.channel)
        .where(send_attempts.c.message_sid == sid, send_attempts.c.decision.in_(SENT))
        .order_by(send_attempts.c.id.desc()).limit(1)
    ).first()
    if attempt is None:
        return None
    # A service send's number, as the status path learns it (on the worker's later check too): the hold below reads
    # the window its release will be judged by.
    learnt = learnt or store.sticky_candidate(conn, sid=sid, number=callback_sender, at=now)
    action = _act(rt, conn, attempt, sid, callback_sender, now, learnt.sender if learnt else None)
    if learnt is not None:
        store.remember_sticky_sender(conn, learnt)
    return action


def _act(rt: Runtime, conn: Connection, attempt, sid: str, callback_sender: str | None, now: datetime,
         sticky: str | None) -> str:
    """handle's work once the send is known: close the windows, send the fallback, hold the message again.
    `sticky`: the number a service sends to this user from, when this callback taught it."""
    # Only WhatsApp has templates to fall back to: a Messenger send's 63016 (its own 24 hours) closes its window only.
    fallback = rt.settings.fallback_for(attempt.sender) if attempt.channel == "whatsapp" else None
    reroute = (bool(fallback) and attempt.decision not in FALLBACKS
               and rt.settings.policy.action_for(attempt.content_type) == "reroute")
    action = "closed_and_rerouted" if reroute else "closed"
    first = conn.execute(
        _insert(conn, late_failures)
        .values(message_sid=sid, sender=attempt.sender, user=attempt.user, action=action, created_at=now)
        .on_conflict_do_nothing(index_elements=["message_sid"])
        .returning(late_failures.c.message_sid)
    ).first()
    if first is None:
        return "duplicate"
    senders = {s for s in (attempt.sender, callback_sender) if s}
    # The same inbound message may also have opened the pair's Messaging Service row: close it too. Never the
    # other way: a service send Twilio made from another of its numbers says nothing of the window the user
    # opened at the first, which WhatsApp still has open.
    numbers = {s for s in senders if not s.startswith("MG")}
    opened_by = select(windows.c.last_inbound_sid).where(windows.c.user == attempt.user,
                                                         windows.c.sender.in_(numbers))
    # 63016 says the window WhatsApp knew when it tried to deliver was closed: the one the proxy had when
    # the send came in, or at its SendAt. A message the user sent after that opened a new window (callbacks
    # come late and out of order), which must stay open.
    tried_at = _tried_at(attempt.params, attempt.created_at - timedelta(milliseconds=attempt.duration_ms or 0))
    open_now = (windows.c.user == attempt.user, windows.c.expires_at > now,
                windows.c.sender.in_(senders) | (windows.c.last_inbound_sid.in_(opened_by)
                                                 & windows.c.sender.startswith("MG")))
    closed = conn.execute(update(windows).where(*open_now, windows.c.last_inbound_at <= tried_at)
                          .values(expires_at=now, updated_at=now))
    if not closed.rowcount and conn.execute(select(windows.c.sender).where(*open_now).limit(1)).first():
        # Nothing closed, and a window is open: the user wrote after WhatsApp's try. Said as it is; the message
        # still failed, so the fallback (if configured) still goes, as README.md promises.
        action = "kept_open_and_rerouted" if reroute else "kept_open"
        conn.execute(update(late_failures).where(late_failures.c.message_sid == sid).values(action=action))
    if reroute:
        profile = conn.execute(select(windows.c.profile_name)
                               .where(windows.c.sender == attempt.sender, windows.c.user == attempt.user)).scalar()
        # Delivered as the gateway's reroute would be (ContentRetention, ValidityPeriod, ...), but now: the
        # original's SendAt, if it had one, is what failed.
        pairs = rerouted_params(json.loads(attempt.params), fallback.content_sid, fallback.render(profile), now=True)
        outbox.enqueue(conn, kind="send", ordering_key=f"send:{sid}", target=attempt.account_sid, headers={},
                       body=pairs, now=now)
    held_id = _hold_again(rt, conn, attempt, sid, now, sticky) if reroute and rt.settings.hold_on_reroute else None
    logs.event("late_window_failure", redact=rt.settings.log_redact_numbers, level=logging.WARNING,
               decision=action, message_sid=sid, sender=attempt.sender, user=attempt.user, code=LATE_WINDOW_FAILURE,
               sent_as=attempt.decision, fallback_content_sid=fallback.content_sid if reroute else None,
               held_id=held_id)
    return action


def _hold_again(rt: Runtime, conn: Connection, attempt, sid: str, now: datetime, sticky: str | None) -> int:
    """HOLD_ON_REROUTE: the message that failed is kept for the user's next message, as a rerouted send is at the
    gateway. A released hold goes back to `held` under its own id (the one its caller was given); an allowed send
    becomes a new hold. Released at once when the user has written since WhatsApp's try (the window kept open)."""
    # The pair's turn first (PostgreSQL), then its window: an inbound message committed in between found nothing
    # held, and queued no release.
    holds.lock_pair(conn, attempt.sender, attempt.user)
    # A service's: the window of the number it sends to this user from, which its release is judged by.
    found = store.window_for(conn, attempt.sender, attempt.user, sticky=sticky)
    window = found.row
    open_now = window is not None and window.expires_at > now
    held_id = None
    if attempt.decision == holds.RELEASE_DECISION:
        ours = (held_messages.c.sender == attempt.sender, held_messages.c.user == attempt.user)
        held_id = conn.execute(
            update(held_messages)
            .where(*ours, or_(
                and_(held_messages.c.message_sid == sid, held_messages.c.status == holds.RELEASED),
                # Its release stored the attempt, not yet its own outcome (worker.Worker._mark): the same hold.
                and_(held_messages.c.status == holds.SENDING, held_messages.c.request_id == attempt.request_id,
                     held_messages.c.released_at <= attempt.created_at)))
            .values(status=holds.HELD, message_sid=None, released_at=None, expires_at=now + timedelta(
                seconds=rt.settings.hold_ttl_seconds), last_error=f"{LATE_WINDOW_FAILURE} after its release: held again")
            .returning(held_messages.c.id)
        ).scalars().first()
        if held_id is not None and open_now:
            # Even with a release pending: one already running has read its list (a release sends only what it
            # wins from `held`, so one more is harmless).
            holds.queue_release(conn, attempt.sender, attempt.user, now)
    if held_id is None:
        held_id, _ = holds.hold(conn, sender=attempt.sender, user=attempt.user, account_sid=attempt.account_sid,
                                params=json.loads(attempt.params), request_id=attempt.request_id, now=now,
                                ttl_seconds=rt.settings.hold_ttl_seconds, window_sender=found.sender,
                                # The window as it is now: a release is queued only if it is open.
                                judged_inbound_at=None if open_now else window.last_inbound_at if window else None)
    return held_id


def _tried_at(params: str, arrived: datetime) -> datetime:
    """When WhatsApp tried to deliver the send: when it came in, or its SendAt if scheduled, the time the judge
    judged it at (judge.send_time)."""
    try:
        return send_time(MultiDict(json.loads(params)), arrived)
    except (ApiError, ValueError, TypeError):  # not a recorded form: the time it came in
        return arrived


def not_a_proxy_send(rt: Runtime, *, sid: str, callback_sender: str | None, checks: int) -> None:
    """The last check found no send of the proxy's with this sid (one sent straight to Twilio): nothing to do."""
    logs.event("late_window_failure", redact=rt.settings.log_redact_numbers, level=logging.INFO,
               decision="not_a_proxy_send", message_sid=sid, sender=callback_sender, code=LATE_WINDOW_FAILURE,
               checks=checks)
