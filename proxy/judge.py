"""Judge a Messages create form: validate it like Twilio, look up the window and the content, decide."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from flask import g, has_request_context
from werkzeug.datastructures import MultiDict

from . import logs, store
from .addresses import (SERVICE_SID, WINDOWED_CHANNELS, InvalidAddress, as_sent, canonical, channel_of, is_bsuid,
                        is_shortened_bsuid, normalise, plain_channel)
from .content import CONTENT_SID, ContentNotFound, ContentUnavailable
from .cooperative import gevent_timeout
from .db import utcnow
from .errors import ApiError
from .policy import Action, Decision, Send, content_type_of, decide, reroute
from .policy_file import Fallback
from .rules import OUTSIDE_WINDOW
from .runtime import Runtime
from .windows import CLOSED, WindowState, window_state


@dataclass(frozen=True)
class Judgement:
    decision: Decision
    send: Send
    window: WindowState
    channel: str | None
    sender: str | None
    user: str | None
    content_sid: str | None
    judged_at: datetime
    fallback: Fallback | None = None
    profile_name: str | None = None
    # Whose window was read: `sender`'s, or for a Messaging Service the number it sends to this user from.
    window_sender: str | None = None


# Fields Twilio reads one value of. Two values could be judged by one and sent by another,
# so a request that repeats one is refused rather than guessed at.
SINGLE_VALUED = ("To", "From", "MessagingServiceSid", "Body", "ContentSid", "ContentVariables", "SendAt",
                 "ScheduleType", "StatusCallback")
MAX_MEDIA = 10
# A window read slower than this means the database is stalled: the send is refused rather than forwarded
# late (the pool's checkout waits no longer either: proxy/db.py).
SLOW_DATABASE_SECONDS = 10
MAX_BODY = 1600


def refuse_repeated(form: MultiDict) -> None:
    """A field Twilio reads one value of, given twice, could be judged by one value and sent by the other."""
    for name in SINGLE_VALUED:
        if len(form.getlist(name)) > 1:
            hint = (" (twilio-python sends a dict's keys this way: content_variables=json.dumps({...}))"
                    if name == "ContentVariables" else "")
            raise ApiError(400, 400, f"Parameter '{name}' was given more than once; the proxy does not guess "
                                     f"which value Twilio would use{hint}.")


def validate(form: MultiDict) -> None:
    """The synchronous checks Twilio itself makes, answered with Twilio's codes."""
    refuse_repeated(form)
    media_urls = [u for u in form.getlist("MediaUrl") if u.strip()]
    if len(media_urls) > MAX_MEDIA:
        raise ApiError(21623, 400, f"Number of media files exceeds allowed limit: a message can carry at most "
                                   f"{MAX_MEDIA} MediaUrl values, got {len(media_urls)}.")
    if len(form.get("Body") or "") > MAX_BODY:
        raise ApiError(21658, 400)
    if not form.get("To", "").strip():
        raise ApiError(21604, 400)
    if not form.get("From", "").strip() and not form.get("MessagingServiceSid", "").strip():
        raise ApiError(21603, 400)
    content_sid = form.get("ContentSid", "").strip()
    if not (form.get("Body") or media_urls or content_sid):
        raise ApiError(21619, 400)
    if content_sid and not CONTENT_SID.match(content_sid):
        raise ApiError(21655, 400)
    variables = form.get("ContentVariables")
    if variables is not None and variables.strip():
        if not content_sid:
            raise ApiError(21654, 400)
        try:
            parsed = json.loads(variables)
        except (ValueError, RecursionError):
            parsed = None
        # Strings only: Twilio answers a number or a boolean with 21656 too (segmentio/action-destinations#3794,
        # tested against production, stringifies them for that reason).
        if not isinstance(parsed, dict) or not all(isinstance(v, str) for v in parsed.values()):
            raise ApiError(21656, 400, "The ContentVariables Parameter is invalid: it must be a JSON object of strings "
                                       "(with twilio-python: content_variables=json.dumps({...})).")
        if any(v == "" for v in parsed.values()):
            raise ApiError(21656, 400, "The ContentVariables Parameter is invalid: Twilio refuses empty values.")


def send_time(form: MultiDict, now: datetime) -> datetime:
    """A scheduled send is judged against the window as it will be when Twilio sends it."""
    raw = form.get("SendAt", "").strip()
    if not raw:
        return now
    try:
        at = datetime.fromisoformat(raw.replace("Z", "+00:00"))
        if at.tzinfo is None:
            at = at.replace(tzinfo=timezone.utc)
        at = at.astimezone(timezone.utc)
    except (ValueError, OverflowError):  # OverflowError: year 1 or 9999 shifted out of range by its offset
        raise ApiError(35115, 400) from None
    # Twilio schedules only with ScheduleType=fixed through a Messaging Service: without one it refuses the create
    # (35118) or, its FAQ says, drops SendAt and sends at once. Judged at SendAt, a send the open window allows now
    # was refused with a 63016 Twilio would never give.
    return max(at, now) if schedulable(form) else now


def schedulable(form: MultiDict) -> bool:
    """Would Twilio schedule this create? Only as `ScheduleType=fixed` ("indicates to Twilio that the message should
    be sent at a fixed time in the future", its scheduling page) through a Messaging Service (in
    MessagingServiceSid, or From)."""
    return form.get("ScheduleType", "").strip() == "fixed" and (
        bool(form.get("MessagingServiceSid", "").strip()) or form.get("From", "").strip().startswith("MG"))


def fail_open(form: MultiDict) -> Judgement:
    """FAIL_OPEN=true and the database is down: let the send through unjudged (and say so loudly)."""
    to_raw = form.get("To", "").strip()
    sender = form.get("From", "").strip() or form.get("MessagingServiceSid", "").strip()
    return Judgement(Decision(Action.ALLOWED, "fail_open"), Send(channel_of(to_raw), None), CLOSED,
                     channel_of(to_raw), sender, to_raw, form.get("ContentSid") or None, utcnow())


def judge(rt: Runtime, form: MultiDict) -> Judgement:
    # Before anything reads a first value: `To=+1…&To=whatsapp:+1…` must not pass as SMS.
    refuse_repeated(form)
    # Fail closed on a channel prefix Twilio might read as WhatsApp: passed through, it would go unjudged.
    if not plain_channel(form.get("To", "")):
        raise ApiError(21211, 400, to=form.get("To"))
    if not plain_channel(form.get("From", "")):
        raise ApiError(21212, 400, from_=form.get("From"))
    to_raw, from_raw = form.get("To", "").strip(), form.get("From", "").strip()
    service_sid = form.get("MessagingServiceSid", "").strip() or None
    content_sid = form.get("ContentSid", "").strip() or None
    media_urls = [u for u in form.getlist("MediaUrl") if u.strip()]
    channel = channel_of(to_raw)
    now = utcnow()
    free_form_type = content_type_of(form.get("Body"), media_urls, content_sid)
    if channel not in WINDOWED_CHANNELS and channel_of(from_raw) not in WINDOWED_CHANNELS:
        # SMS, MMS and other channels pass through unchanged: Twilio validates them with its own codes.
        send = Send(channel, free_form_type, template=bool(content_sid))
        return Judgement(decide(send, CLOSED, rt.settings.policy), send, CLOSED, channel, from_raw or service_sid,
                         to_raw, content_sid, now)
    # What is judged must be what Twilio will read: refused here, with Twilio's codes, before any lookup.
    validate(form)

    try:
        user, recognised = normalise(to_raw), True
        if "~" in to_raw and is_shortened_bsuid(canonical(to_raw)):  # the key itself, not the long id it keys
            raise ApiError(21211, 400, f"The 'To' {to_raw} is the proxy's key for a WhatsApp user id longer than "
                                       "128 characters, not an address: send to the whatsapp: address the user "
                                       "wrote from.")
    except InvalidAddress:
        # An address of a form the proxy does not know may still be a user whose webhook opened a window under it
        # as sent (webhooks._address): judged by that window; with none, refused as before.
        user, recognised = as_sent(to_raw), False
        if user is None:
            raise ApiError(21211, 400, to=to_raw) from None
    sender = service_sid
    if SERVICE_SID.fullmatch(from_raw):
        # A Messaging Service SID in From sends through that service, as MessagingServiceSid does (Twilio's 21603:
        # "You can provide any of the above sender types in your From parameter"): judged by its window.
        sender = from_raw
    elif from_raw:
        try:
            sender = normalise(from_raw)
        except InvalidAddress:
            raise ApiError(21212, 400, from_=from_raw) from None
        if channel_of(sender) != channel:
            raise ApiError(21910, 400)
        if is_bsuid(sender):  # a user's id, never a business's WhatsApp sender
            raise ApiError(21212, 400, from_=from_raw)

    at = send_time(form, now)
    asked = time.monotonic()
    found = _window_in_time(rt, sender, user)
    waited = time.monotonic() - asked
    if found is _TOO_SLOW or waited > SLOW_DATABASE_SECONDS:
        # A database that stalls (a lock held, a host that stopped answering mid-query) answers late, and a
        # send forwarded after that may reach Twilio after its caller gave up and sent it again; the window
        # was judged at a time long gone too. Nothing goes out: the caller's retry is judged afresh.
        logs.log.error("database_slow", extra={"waited_seconds": round(waited, 1), "limit_seconds": SLOW_DATABASE_SECONDS,
                                               "request_id": g.get("request_id") if has_request_context() else None})
        late = f"did not answer within {SLOW_DATABASE_SECONDS} s" if found is _TOO_SLOW else f"took {waited:.0f} s to answer"
        raise ApiError(503, 503, f"The proxy's database {late}; nothing was sent. Retry.", refusal="database_slow")
    if not recognised and not found.known:
        raise ApiError(21211, 400, to=to_raw)
    row = found.row
    window = window_state(row.expires_at, row.last_inbound_at, now=at,
                          safety_margin_seconds=rt.settings.window_safety_margin_seconds) if row else CLOSED

    send = Send(channel, free_form_type)
    if content_sid and channel == "whatsapp":
        send = resolve(rt, content_sid, channel)
    elif content_sid:
        send = Send(channel, None, template=True)
    decision = decide(send, window, rt.settings.policy)

    # Only WhatsApp has templates to fall back to (policy.reroute): a blocked Messenger send is not worth a
    # Content API lookup, whose outage would turn its 63016 into a 503 about a template it never named.
    fallback = rt.settings.fallback_for(sender) if channel == "whatsapp" else None
    if decision.action is Action.BLOCKED and fallback and rt.settings.policy.action_for(send.content_type) == "reroute":
        try:
            fallback_send = resolve(rt, fallback.content_sid, channel)
        except ApiError as exc:
            if exc.code != 21655:
                raise
            fallback_send = None  # a deleted fallback template: block, and say so
        decision = reroute(decision, send, fallback_send, window, rt.settings.policy)
    return Judgement(decision, send, window, channel, sender, user, content_sid, now,
                     fallback if decision.action is Action.REROUTED else None, found.profile_name, found.sender)


def sticky_note(judgement: Judgement) -> str:
    """Why a service's window is another number's, where a closed window is the reason: said, or the caller sees a
    window it knows to be open refused."""
    if judgement.window_sender in (None, judgement.sender) or judgement.decision.code != OUTSIDE_WINDOW:
        return ""
    return (f" Twilio sends this Messaging Service's messages to {judgement.user} from {judgement.window_sender} "
            "(Sticky Sender, learnt from the status callbacks of its earlier sends), so that number's window is the "
            "one that counts; to reach the user at a number they wrote to, send with that number as From.")


_TOO_SLOW = object()


def _window_in_time(rt: Runtime, sender: str, user: str):
    """The window a send is judged by (store.window_for), or _TOO_SLOW. Under gevent the read is given up on at
    SLOW_DATABASE_SECONDS: one behind a lock (a migration's, a LOCK TABLE) waited out the whole lock, and the 503
    came after 30 s for a 30 s lock, past the caller's timeout. SQLAlchemy drops a connection interrupted so.
    In a thread (gthread) it is refused once it returns, as slow."""
    timeout = gevent_timeout()
    if timeout is None:
        with rt.reader.connect() as conn:
            return store.window_for(conn, sender, user)
    deadline = timeout(SLOW_DATABASE_SECONDS)
    try:
        with deadline, rt.reader.connect() as conn:
            return store.window_for(conn, sender, user)
    except timeout as fired:
        if fired is not deadline:
            raise
        return _TOO_SLOW


def resolve(rt: Runtime, content_sid: str, channel: str) -> Send:
    try:
        content = rt.content.get(content_sid)
    except ContentNotFound:
        raise ApiError(21655, 400) from None
    except ContentUnavailable as exc:
        # Fail closed: without the template's type and approval nothing can be judged. Said in a line, as a
        # database refusal is: the caller's 503 is all the decision there is, and no attempt row is written.
        logs.log.error("content_unavailable", extra={
            "content_sid": content_sid if CONTENT_SID.fullmatch(content_sid) else "not_a_content_sid",
            "detail": str(exc), "request_id": g.get("request_id") if has_request_context() else None})
        then = "The proxy's operator must fix them" if exc.lasting else "Retry later"
        raise ApiError(503, 503, f"The Content API could not be asked about {content_sid} ({exc}); "
                                 f"nothing was sent. {then}.", refusal="content_unavailable") from None
    return Send(channel, content.delivered_type, template=True, approval=content.approval, buttons=content.buttons)
