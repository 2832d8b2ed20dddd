"""Twilio webhooks: signed inbound messages open windows; status callbacks record delivery states."""

from __future__ import annotations

import html
import json
import logging
import re
import time
from datetime import datetime, timedelta
from urllib.parse import quote

from flask import Blueprint, Response, g, request
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from werkzeug.datastructures import MultiDict
from twilio.twiml.messaging_response import MessagingResponse

from . import holds, late_failures, logs, outbox, signatures, store
from .forwarding import TWILIO_HEADERS, WEBHOOK_QUERY, too_large
from .addresses import SERVICE_SID, InvalidAddress, as_sent, is_bsuid, is_windowed, normalise
from .db import storable, unavailable_reason, utcnow, writing
from .errors import twilio_error
from .forms import Fields, body_of, form_of
from .metrics import WEBHOOKS
from .runtime import runtime
from .settings import LEASE_MARGIN_SECONDS

bp = Blueprint("webhooks", __name__, url_prefix="/twilio")

EMPTY_TWIML = str(MessagingResponse())
TWILIO_WEBHOOK_TIMEOUT_SECONDS = 15  # Twilio gives up on a webhook's answer after this
# A waiting webhook's own attempt must end this much before Twilio's limit: the time the request spent
# before its handler (the network, gunicorn's queue) is not on its clock.
WEBHOOK_DEADLINE_MARGIN_SECONDS = 1
# The least of Twilio's 15 s worth an inline attempt; with less left, the webhook is left to the worker.
MIN_INLINE_SECONDS = 1.0
INLINE_POLL_SECONDS = 0.05  # how often a webhook looks whether the one before it was delivered
# How much of an inline attempt's lease, taken when its webhook was stored, may be gone when the attempt starts
# before it is renewed (a write transaction): normally milliseconds, the rest of the webhook's batch.
LEASE_SLACK_SECONDS = 1.0
# Whole values only (fullmatch: `$` would also accept a trailing newline). A message sid is exactly what
# Twilio issues (SM, or MM for media; its OpenAPI pattern): the signature covers the fields' names and
# values with no separators, so a looser pattern let a replay fold the next field into the sid
# (`SM…MessageTypetext`) and pass under the captured signature as a new message.
_SID = re.compile(r"(?:SM|MM)[0-9a-fA-F]{32}")
_SID_COPIES = ("MessageSid", "SmsSid", "SmsMessageSid")
_BAD_SID = "missing, not a message sid, or not the same as SmsSid/SmsMessageSid"


@bp.before_request
def require_twilio_signature():
    rt = runtime()
    g.params = webhook_params()
    if g.params is None:
        return twilio_error(400, 400, "Webhook body must be a form or a JSON object.")
    url = signed_url()
    reason = signatures.problem(request, g.params, url, rt.settings, rt.validator, rt.previous_validator)
    if reason is None:
        return None
    if rt.settings.allow_unsigned_webhooks:
        logs.event("webhook_unsigned_accepted", redact=True, level=30, path=request.path, reason=reason,
                   request_id=g.request_id)
        return None
    WEBHOOKS.labels("unknown", "signature_rejected").inc()
    # Who called, and the URL the signature was computed over: a PUBLIC_BASE_URL that is not the URL Twilio
    # requests (scheme, host, case behind a TLS terminator) shows here, not only as invalid_signature.
    logs.event("webhook_rejected", redact=rt.settings.log_redact_numbers, level=30, path=request.path,
               reason=reason, remote_addr=request.remote_addr, signed_url=logs.masked_url(url),
               request_id=g.request_id)
    return twilio_error(20403, 403, f"Forbidden: X-Twilio-Signature check failed ({reason}).")


def webhook_params() -> MultiDict | None:
    """The webhook's fields: the form, or the top-level fields of a JSON object body."""
    if request.mimetype != "application/json":
        return form_of(request)
    try:
        data = json.loads(body_of(request).decode("utf-8", "replace") or "{}")
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    try:
        # JSON's \u escapes can spell a lone surrogate, which no UTF-8 body (so no Twilio webhook) holds;
        # the database driver and the forward's signature would fail on it later, as if the database were down.
        json.dumps(data, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return None
    return Fields([(str(k), v if isinstance(v, str) else json.dumps(v)) for k, v in data.items()])


# The URL as received, by the environ values it is built from: Twilio calls a handful of URLs, and
# building one (host checks, quoting) was ~4% of a webhook's CPU under load. Bounded: arbitrary Host
# headers cannot grow it.
_URL_KEYS = ("wsgi.url_scheme", "HTTP_HOST", "SERVER_NAME", "SERVER_PORT", "RAW_URI", "REQUEST_URI",
             "SCRIPT_NAME", "PATH_INFO", "QUERY_STRING")
_RECEIVED_URLS: dict[tuple, str] = {}
_MAX_RECEIVED_URLS = 256
_PATH_SAFE = "!$&'()*+,/:;=@%"  # what werkzeug leaves unquoted in a path


def signed_url() -> str:
    """The URL Twilio signed: PUBLIC_BASE_URL + path + query behind a load balancer, else as received."""
    base = runtime().settings.public_base_url
    if not base:
        environ = request.environ
        key = tuple(environ.get(name) for name in _URL_KEYS)
        url = _RECEIVED_URLS.get(key)
        if url is None:
            url = _url_as_requested(environ)
            if len(_RECEIVED_URLS) < _MAX_RECEIVED_URLS:
                _RECEIVED_URLS[key] = url
        return url
    wsgi = request.environ
    target = _raw_target(wsgi)
    if target is not None and not wsgi.get("SCRIPT_NAME"):
        # The path as sent, escapes kept. (Under a SCRIPT_NAME the base names the prefix itself.)
        return base + target
    query = request.query_string.decode("latin-1")
    return base + request.path + (f"?{query}" if query else "")


def _raw_target(wsgi: dict) -> str | None:
    """The request target exactly as the client sent it (path and query), when the server passes it on."""
    target = wsgi.get("RAW_URI") or wsgi.get("REQUEST_URI")  # gunicorn; uWSGI, mod_wsgi, werkzeug
    if not target or not target.startswith("/"):  # neither, or an absolute-form target
        return None
    return _as_sent(target)


def _as_sent(target: str) -> str:
    try:  # WSGI hands the request's bytes over as latin-1 text; what Twilio sent is UTF-8
        return target.encode("latin-1").decode("utf-8", "replace")
    except UnicodeEncodeError:
        return target


def _url_as_requested(wsgi: dict) -> str:
    """Scheme and host as werkzeug reads them, then the request target exactly as the client sent it.

    Not request.url: werkzeug decodes its %-escapes (%7E, %2F, %C3%A9...), and Twilio signed the URL
    it requested, escapes and all.
    """
    target = _raw_target(wsgi)
    if target is None:
        path = (wsgi.get("SCRIPT_NAME", "") + wsgi.get("PATH_INFO", "")).encode("latin-1", "replace")
        query = wsgi.get("QUERY_STRING", "")
        target = _as_sent(quote(path, safe=_PATH_SAFE) + (f"?{query}" if query else ""))
    return request.host_url[:-1] + target


@bp.post("/inbound")
@bp.post("/status")
def webhook():
    # What a webhook is depends on its fields, not on the URL it was sent to: a status
    # callback pointed at /inbound must never open a window. Twilio's SmsStatus is `received` only
    # on an inbound message, so a callback without its MessageStatus is still a callback; and `received` is
    # only a message's that Twilio received, never a send's: an inbound message that carries
    # MessageStatus=received too (captured so) was taken for a callback, its window never opened, the app never
    # given it.
    form = g.params
    message_status = form.get("MessageStatus")
    kind = "status" if (message_status and message_status != "received") or \
        form.get("SmsStatus", "received") != "received" else "inbound"
    g.webhook_kind = kind  # for the count of a 503 (proxy.count_refusal)
    # A JSON webhook's signature covers its whole body (bodySHA256): nothing glued, nothing to split again.
    resplit = None if request.mimetype == "application/json" else split_again(form)
    if resplit is not None:
        return _malformed(kind, *resplit)
    return _status_callback() if kind == "status" else _inbound_message()


# A message sid glued after the name of a field that holds one, as the signed string spells each such field.
_SID_FIELD_AND_SID = re.compile(r"(?:SmsMessageSid|MessageSid|SmsSid)(?:SM|MM)[0-9a-fA-F]{32}")
_SID_RUN_LENGTH = len("SmsSid") + 34  # the shortest run: most values are shorter, and need no search
_FIELD_NAME = re.compile(r"[A-Z][A-Za-z0-9]*")  # every field Twilio names: AccountSid, MediaUrl0, WaId
_A_MESSAGE_SID = re.compile(r"(?:SM|MM)[0-9a-fA-F]{32}")
_SID_NAME_INSIDE = re.compile(r"(?:MessageSid|SmsSid)(?!\Z)")  # a sid field's name, then more of the name
# The fields whose `<name><message sid>` run is their own: a sid run counts as in a field only in one of these.
_MESSAGE_SID_FIELDS = frozenset({"MessageSid", "SmsSid", "SmsMessageSid", "OriginalRepliedMessageSid"})


def split_again(form) -> tuple[str, str] | None:
    """(field, problem) when a webhook's fields could be a signed webhook split into other fields; else None.

    Twilio signs the URL and each field's name and value, sorted and glued with no separator, and twilio-python
    reads a field's repeated values as one set. A user who writes `xFrom<victim>MessageSid<new sid>…` into their
    Body and replays the captured request split at other places gets a message that never was, from a user who
    never wrote, under a valid signature: the real fields that follow (`From<address>MessageSid<sid>…`) are
    swallowed by other fields. Refused, so that they cannot be: a field name that is not one Twilio could send
    (the address's `:` and `+` cannot be in one, nor a message sid, nor `MessageSid` or `SmsSid` but at its end,
    nor one ending so and holding a message sid but Twilio's four sid fields), a field given twice with different
    values, a value holding a `MessageSid<sid>` run, and such a run across two fields — in every webhook Twilio
    sends, each sits in one field, its name then its value. Nothing about WaId's format: with WhatsApp's usernames
    it may become a business-scoped id, and a refused webhook is a lost message."""
    in_fields, fields = 0, []
    for name, values in form.lists():
        # Never the name itself in the answer or the log: it may hold the body.
        if not _could_be_twilios(name):
            return "field name", "not one Twilio sends"
        if len(values) > 1 and len(set(values)) > 1:
            return name, "given more than once with different values"
        value = values[0]
        if len(value) >= _SID_RUN_LENGTH and _SID_FIELD_AND_SID.search(value):
            return name, "holds another field's name and a message sid"
        if name.endswith("Sid"):
            runs = len(_SID_FIELD_AND_SID.findall(name + value))
            if runs and name not in _MESSAGE_SID_FIELDS:
                # `ME<media sid>MessageSid`, a name built from the end of MediaUrl0: it covered the real sid's run.
                return "field name", "not one Twilio sends"
            in_fields += runs
        fields.append((name, value))
    # What the signature covers after the URL, as twilio-python builds it (names sorted; one value each, now).
    fields.sort()
    if len(_SID_FIELD_AND_SID.findall("".join(name + value for name, value in fields))) > in_fields:
        return "MessageSid", "a message sid runs across two fields"
    return None


# Names that passed _could_be_twilios' checks. Twilio sends the same few dozen names in every webhook, and the three
# searches over each were a third of split_again's CPU. Bounded: a webhook's names are the caller's to choose.
_NAMES_PASSED: set[str] = set()
_MAX_NAMES_PASSED = 512


def _could_be_twilios(name: str) -> bool:
    if name in _NAMES_PASSED:
        return True
    if not _FIELD_NAME.fullmatch(name) or _A_MESSAGE_SID.search(name) or _SID_NAME_INSIDE.search(name):
        return False
    if len(_NAMES_PASSED) < _MAX_NAMES_PASSED:
        _NAMES_PASSED.add(name)
    return True


def _malformed(kind: str, field: str, problem) -> Response:
    """Twilio-shaped 400 for a webhook that cannot be read. The log names the field and the kind of
    problem, never the value: InvalidAddress's text leaves the address out (proxy/addresses.py)."""
    logs.event(kind, redact=True, level=30, decision="rejected", reason="malformed_webhook", field=field,
               detail=str(problem), request_id=g.request_id)
    WEBHOOKS.labels(kind, "malformed").inc()
    what = "inbound webhook" if kind == "inbound" else "status callback"
    return twilio_error(21211, 400, f"Malformed {what}: {field}: {problem}")


def _message_sid(form) -> str | None:
    """The webhook's message sid, or None when it is missing, not a message sid, or its copies disagree."""
    sid = form.get("MessageSid") or form.get("SmsSid")
    if not sid or not _SID.fullmatch(sid):
        return None
    for name in _SID_COPIES:  # SmsSid and SmsMessageSid are the same sid under Twilio's older names
        copy = form.get(name)
        if copy is not None and copy != sid:
            return None
    return sid


def _inbound_message() -> Response:
    rt, started = runtime(), time.perf_counter()
    form = g.params
    sid = _message_sid(form)
    if sid is None:
        return _malformed("inbound", "MessageSid", _BAD_SID)
    # Windows are kept for WhatsApp and Messenger; an SMS to or from a short code (12345) is no E.164 number
    # but still a message for the app: refused, Twilio would not send it again, and the app would never see it.
    windowed = is_windowed(form.get("From", "")) or is_windowed(form.get("To", ""))
    try:
        user = _address(form.get("From", ""), windowed, "From")
    except InvalidAddress as exc:
        return _malformed("inbound", "From", exc)
    try:
        sender = _address(form.get("To", ""), windowed, "To")
    except InvalidAddress as exc:
        return _malformed("inbound", "To", exc)
    service_sid = form.get("MessagingServiceSid") or None
    if service_sid and not SERVICE_SID.fullmatch(service_sid):
        service_sid = None  # never key a window by something that cannot be a Messaging Service
    settings, now = rt.settings, utcnow()
    record = dict(sid=sid, sender=sender, user=user, messaging_service_sid=service_sid,
                  profile_name=storable(form.get("ProfileName"), 256), num_media=_int_or_none(form.get("NumMedia")),
                  received_at=now, window_seconds=settings.session_window_seconds)
    if not (settings.forward_inbound_url or settings.hold_on_reroute):
        # Nothing else is written with the message: one statement on PostgreSQL (store.record_inbound),
        # committed with other webhooks' (group_commit) in the order of the pair's rows.
        expires_at = _write_alone(rt, lambda conn: store.record_inbound(conn, **record),
                                  _pair_order(user, sender, 1, service_sid=service_sid))
        return _inbound_answer(rt, started, sender, user, service_sid, sid, expires_at)
    target, pairs = settings.forward_inbound_url, list(form.items(multi=True))
    kept = _kept_headers()
    key = f"inbound:{sender}|{user}"

    def store_and_enqueue(conn):
        # One transaction: the message, its window and its forward are stored together or not at all. It may
        # run in another request's thread (group_commit): `conn` and the values above only, never `request`.
        expires_at, forward = store.record_inbound(conn, **record), None
        if expires_at and target:
            # Leased for the inline attempt, counted from now (this may have waited for its turn to write); if
            # this process dies, the worker takes over once it runs out.
            leased_at = utcnow()
            lease = leased_at + timedelta(seconds=settings.forward_timeout_seconds + LEASE_MARGIN_SECONDS)
            kept["X-Proxy-Window-Expires-At"] = expires_at.isoformat().replace("+00:00", "Z")
            # Whose turn it is, in the same transaction: the window's row, upserted above, is locked until the
            # commit, so an earlier webhook of the pair has committed its item by now (or is in this batch).
            item_id, earlier = outbox.enqueue_in_turn(conn, kind="inbound", ordering_key=key, target=target,
                                                      headers=kept, body=pairs, now=now, lease_until=lease,
                                                      checked_at=leased_at)
            forward = item_id, lease, earlier
        if expires_at and settings.hold_on_reroute:
            for held_key in filter(None, (sender, service_sid)):
                holds.release_if_held(conn, held_key, user, now)
        return expires_at, forward

    # Committed with other webhooks' writes (group_commit), one transaction of its own when alone.
    expires_at, forward = _write_alone(rt, store_and_enqueue, _pair_order(user, sender, 1, service_sid=service_sid),
                                   several=True)
    response = _inbound_answer(rt, started, sender, user, service_sid, sid, expires_at)
    if forward is not None:
        item_id, lease, earlier = forward
        return _forward_inline(item_id, lease, earlier, started, sender, user, service_sid, pairs, kept)
    return response


def _write_alone(rt, work, order: tuple, *, several: bool = False, last: bool = False):
    """`work(conn)`: a request's write, when it needs nothing from the database before it.

    Committed in one transaction with the other requests' writes that queued while the previous one ran
    (proxy/group_commit.py; alone, a single statement on PostgreSQL in autocommit, `several` in its own
    transaction); `work` may run twice. `order`: the keys of the rows it writes (a batch runs sorted by them;
    stable, so arrival order within one); `last`: after every write that is not.
    """
    return rt.shared_writes.run(work, (1 if last else 0, *order), several=several)


def _remember(rt, learnt: store.StickySender) -> None:
    """Store a Messaging Service's number a status callback taught, as a batched write of its own, after every other
    row of its batch: in the status's write its row lock (out of the batch's order) made two PostgreSQL workers'
    batches wait on each other, a second each (bench/status.py: 1,108 → 406 callbacks/s); in a transaction of its
    own it cost a commit each. The status is stored already: a database error here is said, not answered 503
    ("nothing was recorded"); the send's next callback teaches the number again."""
    try:
        _write_alone(rt, lambda conn: store.remember_sticky_sender(conn, learnt), (learnt.service_sid, learnt.user),
                     last=True)
    except SQLAlchemyError as exc:
        logs.event("sticky_sender_not_stored", redact=rt.settings.log_redact_numbers, level=logging.WARNING,
                   error=type(exc).__name__, sender=learnt.sender, user=learnt.user, request_id=g.request_id)


def _pair_order(user: str, sender: str, *then, service_sid: str | None = None) -> tuple:
    """A batch's order for a write keyed by its conversation, the window rows' lock order: by user, then the
    writes that take a Messaging Service's row (an inbound message carrying one takes it before the sender's,
    store.record_inbound) before those that take the sender's alone, then by their first row and sender, then
    `then` — 0 for a forward's `delivered`, 1 for an inbound message, 2 for a forwarded status. Sorted by sender
    alone, a batch took (sender, user) and then (service, user), the other order to a lone inbound's: deadlocks."""
    return (user, 0, service_sid, sender, *then) if service_sid else (user, 1, sender, sender, *then)


def _inbound_answer(rt, started, sender, user, service_sid, sid, expires_at) -> Response:
    WEBHOOKS.labels("inbound", "window_opened" if expires_at else "duplicate").inc()
    logs.event(
        "inbound",
        redact=rt.settings.log_redact_numbers,
        decision="window_opened" if expires_at else "duplicate",
        sender=sender,
        user=user,
        messaging_service_sid=service_sid,
        message_sid=sid,
        window_expires_at=expires_at.isoformat() if expires_at else None,
        duration_ms=round((time.perf_counter() - started) * 1000, 2),
        request_id=g.request_id,
    )
    return _twiml()


def _forward_inline(item_id: int, lease: datetime, earlier: str | None, arrived: float, sender: str, user: str,
                    service_sid: str | None, pairs: list, kept: dict) -> Response:
    """Hand the webhook to the app now and relay its TwiML; if it cannot answer, the outbox retries."""
    rt = runtime()
    try:
        lease = _take_turn(rt, item_id, lease, earlier, arrived, f"inbound:{sender}|{user}")
    except SQLAlchemyError as exc:
        # Stored and queued already: a 503 saying "nothing was recorded" would be false, and the item's lease hands it
        # to the worker once it runs out. Twilio gets empty TwiML, as for any webhook left to the worker.
        _database_failed_after_storing(exc, item_id)
        return _twiml()
    if lease is None:
        return _twiml()
    started = time.perf_counter()
    # What is left of Twilio's 15 s after the write (a stalled database) and the turn: past it Twilio gives up on
    # the answer (11205) while the app's reply, counted delivered, would go nowhere. _take_turn left at least
    # MIN_INLINE_SECONDS; an app slower than that is cut off and the outbox delivers again.
    left = TWILIO_WEBHOOK_TIMEOUT_SECONDS - WEBHOOK_DEADLINE_MARGIN_SECONDS - (started - arrived)
    reply = rt.forwarder.post(rt.settings.forward_inbound_url, pairs, kept, timeout=left)
    recorded = True
    try:
        if reply.ok:
            at = utcnow()
            # One statement, committed with other webhooks' writes. Ahead of the pair's new webhooks in the batch
            # (their turn checks then see this one done), like them in the order of the pairs (user, then sender).
            recorded = _write_alone(rt, lambda conn: outbox.delivered(conn, item_id, at, lease),
                                    _pair_order(user, sender, 0, item_id, service_sid=service_sid))
        else:
            with writing(rt.engine) as conn:
                outbox.failed(conn, item_id, reply.error or "failed", utcnow(), rt.settings.retry_schedule, lease=lease,
                              retry=not reply.final)
    except SQLAlchemyError as exc:
        # The message is stored and the app has had its turn: a 503 now would throw the app's TwiML away. The
        # item stays under this attempt's lease, and the worker delivers it (again) after it: at-least-once.
        _database_failed_after_storing(exc, item_id)
    if reply.too_large:
        too_large(reply, redact=rt.settings.log_redact_numbers, kind="inbound", outbox_id=item_id, sender=sender,
                  user=user, request_id=g.request_id)
    logs.event("delivery", redact=rt.settings.log_redact_numbers, kind="inbound",
               level=logging.INFO if reply.ok and reply.status < 400 and recorded else logging.WARNING,
               decision="delivered" if reply.ok else "failed" if reply.final else "queued", outbox_id=item_id, attempt=1,
               app_status=reply.status, error=reply.error, sender=sender, user=user,
               # Overran its lease: the worker that claimed the item since records its outcome (and delivers it again).
               **({} if recorded else {"outcome": "lease_lost"}),
               duration_ms=round((time.perf_counter() - started) * 1000, 2), request_id=g.request_id)
    if not reply.ok or reply.too_large:
        return _twiml()  # Twilio sees success; the user sees nothing broken
    unjudged = _unjudged_twiml(reply.body, user, (sender, service_sid))
    if unjudged:
        logs.event("twiml_not_judged", redact=rt.settings.log_redact_numbers, level=logging.WARNING, reason=unjudged,
                   outbox_id=item_id, sender=sender, user=user, request_id=g.request_id)
    return Response(reply.body, status=reply.status, content_type=reply.content_type or "text/xml")


_MESSAGE_TAG = re.compile(rb"""<Message\b((?:[^>"']|"[^"]*"|'[^']*')*)>""")
_ATTRIBUTE = re.compile(rb"""([\w:.-]+)\s*=\s*(?:"([^"]*)"|'([^']*)')""")
_REDIRECT = re.compile(rb"<Redirect\b")


def _database_failed_after_storing(exc: SQLAlchemyError, item_id: int) -> None:
    logs.log.error("database_unavailable", extra={
        "error": type(exc).__name__, "path": request.path, "outbox_id": item_id, "request_id": g.request_id,
        "detail": unavailable_reason(exc) if isinstance(exc, OperationalError) else None})


def _unjudged_twiml(body: bytes, user: str, senders: tuple) -> str | None:
    """Why the app's TwiML holds a send the proxy did not judge, if it does (every reason, comma-separated): a
    <Message> to someone other than the user who wrote, or from another sender than one of `senders` (the business
    and service the message came to: only their windows it just opened), or a <Redirect> to TwiML the proxy never
    sees. Relayed all the same, as the app's answer; said at WARNING, so a send outside a window is not a surprise."""
    reasons = []
    for tag in _MESSAGE_TAG.finditer(body):
        # Attribute by attribute, each quoted value whole: a `>` in one (legal XML) no longer ends the tag early.
        for name, double, single in _ATTRIBUTE.findall(tag.group(1)):
            if name not in (b"to", b"from"):
                continue
            value = html.unescape((double or single).decode("utf-8", "replace")).strip()  # &#43; is a `+`
            if name == b"to" and _key(value) != user:
                reasons.append("message_to_another_user")
            if name == b"from" and value not in senders and _key(value) not in senders:
                reasons.append("message_from_another_sender")
    if _REDIRECT.search(body):
        reasons.append("redirect")
    return ",".join(dict.fromkeys(reasons)) or None


def _key(address: str) -> str | None:
    try:
        return normalise(address)
    except InvalidAddress:
        return as_sent(address)  # the user's own address, if a form kept as sent (_address)


def _take_turn(rt, item_id: int, lease: datetime, earlier: str | None, arrived: float, key: str) -> datetime | None:
    """The inline attempt's lease once this webhook's turn in its conversation has come; None when it is
    left to the worker (Twilio then gets empty TwiML, and the app's reply to that delivery goes nowhere).

    `earlier`: what outbox.earlier_pending found when the item was stored. An earlier webhook of the
    conversation being delivered inline now is waited for, so the app still sees them in order and this
    one's reply still reaches Twilio — as long as this one's own attempt can then finish inside Twilio's
    15 s. One waiting for a retry (the app was down) is not.
    """
    timeout = rt.settings.forward_timeout_seconds
    deadline = TWILIO_WEBHOOK_TIMEOUT_SECONDS - WEBHOOK_DEADLINE_MARGIN_SECONDS
    renewed = False
    while earlier is not None:
        elapsed = time.perf_counter() - arrived
        if earlier == "queued" or elapsed + INLINE_POLL_SECONDS + timeout >= deadline:
            with writing(rt.engine) as conn:
                outbox.release_lease(conn, item_id, lease)  # keep the order: the worker delivers it after
            return None
        time.sleep(INLINE_POLL_SECONDS)  # cooperative under gevent
        with writing(rt.engine) as conn:
            earlier = outbox.earlier_pending(conn, key, item_id, utcnow())
            if earlier is None:
                # The lease was counted from when the item was stored; the wait since must not let it run out
                # mid-delivery, where a worker would deliver a second copy alongside. None: one already has.
                lease, renewed = outbox.keep_lease(conn, item_id, lease, utcnow(), timeout + LEASE_MARGIN_SECONDS), True
                if lease is None:
                    return None
    if time.perf_counter() - arrived + MIN_INLINE_SECONDS >= deadline:
        # Its write or its turn took so long (a database stalled, a row held) that too little of Twilio's 15 s is
        # left for the app: the worker delivers it.
        with writing(rt.engine) as conn:
            outbox.release_lease(conn, item_id, lease)
        return None
    if not renewed and (lease - utcnow()).total_seconds() < timeout + LEASE_MARGIN_SECONDS - LEASE_SLACK_SECONDS:
        # The rest of its batch and the commit took long (a held row): renew it, or a worker could take the item
        # over during the attempt and deliver a second copy alongside. None: one already has.
        with writing(rt.engine) as conn:
            return outbox.keep_lease(conn, item_id, lease, utcnow(), timeout + LEASE_MARGIN_SECONDS)
    return lease


def _kept_headers() -> dict:
    """Twilio's request headers a forward carries on (forwarding.TWILIO_HEADERS), never the proxy's own; and the
    query of the URL Twilio posted to, which the forward URL gets too (forwarding.WEBHOOK_QUERY): an app that put
    `?order=44` in its StatusCallback lost it. Not `bodySHA256`: the hash of a JSON body the forward does not send."""
    kept = {name: request.headers[name] for name in TWILIO_HEADERS if name in request.headers}
    query = "&".join(item for item in request.query_string.decode("utf-8", "replace").split("&")
                     if item and item.partition("=")[0] != "bodySHA256")
    if query:
        kept[WEBHOOK_QUERY] = query
    return kept


def _status_callback() -> Response:
    rt, started = runtime(), time.perf_counter()
    form = g.params
    sid = _message_sid(form)
    if sid is None:
        return _malformed("status", "MessageSid", _BAD_SID)
    status = (storable(form.get("MessageStatus") or form.get("SmsStatus"), 32) or "").strip().lower() or "unknown"
    error_code = _int_or_none(form.get("ErrorCode"))
    settings, now = rt.settings, utcnow()
    sender, user = _normalised_or_raw(form.get("From")), _normalised_or_raw(form.get("To"))
    # The code names the cause, whichever final status carries it (Twilio reports 63016 on `failed` or
    # `undelivered`); another code on `undelivered` (30008, a handset off) says nothing about the window.
    late_window_failure = status in ("failed", "undelivered") and error_code == late_failures.LATE_WINDOW_FAILURE
    if late_window_failure:
        # Attempts are stored up to ~50 ms after the send (proxy/attempts.py): make sure this process's are in.
        # (Before the transaction: on SQLite the writer needs the write lock this one would hold.) Another
        # process's may still be on their way: then the worker checks again (late_failures.on_callback).
        rt.attempts.flush()
    status_row = dict(sid=sid, status=status, error_code=error_code, sender=sender, user=user, at=now)
    forward_status = settings.forward_status_url
    kept, pairs = (_kept_headers(), list(form.items(multi=True))) if forward_status else ({}, [])

    def record(conn):  # `conn` and the values above only: it may run in another request's thread (group_commit)
        # With the number a service send went from, which the service's next sends to this user go from too (their
        # window): read here, stored after the batch when new (daily at most).
        changed, learnt = store.record_callback(conn, **status_row)
        if forward_status:
            outbox.enqueue(conn, kind="status", ordering_key=f"status:{sender}|{user}", target=forward_status,
                           headers=kept, body=pairs, now=now)
        return changed, learnt

    if not late_window_failure:
        # Most callbacks (sent, delivered, read: several per message sent): committed with other webhooks' writes.
        # Forwarded: in the order of the conversation's rows, so its callbacks' outbox items keep their arrival
        # order within a batch (the worker delivers each conversation's in the order of their ids).
        order = _pair_order(user or "", sender or "", 2) if forward_status else (sid,)
        changed, learnt = _write_alone(rt, record, order, several=bool(forward_status))
        if learnt is not None:
            _remember(rt, learnt)
    else:
        with writing(rt.engine) as conn:
            changed, learnt = record(conn)
            # The number is stored last, after the windows and holds it is used for: the batches' order.
            late_failures.on_callback(rt, conn, sid=sid, callback_sender=sender, now=now, learnt=learnt)
    WEBHOOKS.labels("status", "recorded" if changed else "stale").inc()
    logs.event(
        "status",
        redact=rt.settings.log_redact_numbers,
        decision="recorded" if changed else "stale",
        # The field is free text (up to 32 characters): only a status Twilio defines is worth a log line.
        status=status if status in store.STATUS_RANK else "unknown",
        error_code=error_code,
        sender=sender,
        user=user,
        message_sid=sid,
        duration_ms=round((time.perf_counter() - started) * 1000, 2),
        request_id=g.request_id,
    )
    return _twiml()


def _twiml() -> Response:
    return Response(EMPTY_TWIML, status=200, mimetype="text/xml")


def _int_or_none(value: str | None) -> int | None:
    """A small non-negative integer field (NumMedia, ErrorCode), or None when it is anything else."""
    try:
        number = int(value) if value not in (None, "") else None
    except ValueError:
        return None
    return number if number is not None and 0 <= number < 2**31 else None


def _address(value: str, windowed: bool, field: str) -> str:
    """The address normalised; one that cannot be is kept as sent: on a channel without windows (SMS: a short
    code) as stored; on WhatsApp or Messenger a user's (`From`) as a window key (addresses.as_sent), said at
    WARNING. A business's WhatsApp sender (`To`) is a number Twilio registered: anything else is refused."""
    try:
        key = normalise(value)
    except InvalidAddress as exc:
        if not windowed:
            kept = storable(value.strip(), 128)
            if not kept:
                raise
            return kept
        kept = as_sent(value) if field == "From" else None
        if not kept:
            raise
        logs.event("address_not_recognised", redact=True, level=logging.WARNING, field=field, detail=str(exc),
                   user=kept, request_id=g.request_id)  # masked as any address is
        return kept
    if field == "To" and is_bsuid(key):
        raise InvalidAddress("a WhatsApp user's id, not a business sender")
    return key


def _normalised_or_raw(value: str | None) -> str | None:
    if not value:
        return None
    try:
        return normalise(value)
    except InvalidAddress:
        return as_sent(value) or storable(value, 128)
