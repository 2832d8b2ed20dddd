"""The drop-in Messages API: judges each create against the window, forwards the rest verbatim."""

from __future__ import annotations

import hmac
import json
import re
import time

from flask import Blueprint, Response, g, request

from . import logs, store
from .addresses import WINDOWED_CHANNELS, InvalidAddress, channel_of, normalise
from .db import utcnow
from .errors import MESSAGES, twilio_error
from .policy import OUTSIDE_WINDOW, Action, Decision, content_type_of, decide
from .runtime import runtime
from .upstream import UpstreamError
from .windows import CLOSED, window_state

bp = Blueprint("gateway", __name__, url_prefix="/2010-04-01")

_ACCOUNT_IN_PATH = re.compile(r"^/2010-04-01/Accounts/([^/]+?)(?:\.json)?(?:/|$)")
# Caller headers worth keeping upstream; hop-by-hop and proxy headers are not.
_FORWARDED_HEADERS = ("Authorization", "Content-Type", "Accept", "Accept-Charset", "User-Agent", "X-Twilio-Client",
                      "I-Twilio-Idempotency-Token")
_RELAYED_HEADERS = ("Content-Type", "Twilio-Request-Id", "Twilio-Request-Duration", "Twilio-Concurrent-Requests")


@bp.before_request
def authenticate():
    rt = runtime()
    auth = request.authorization
    if auth is None or auth.type != "basic" or not credentials_match(auth.username, auth.password):
        logs.event("auth_failed", redact=True, level=30, path=request.path, request_id=g.request_id)
        return twilio_error(20003, 401)
    match = _ACCOUNT_IN_PATH.match(request.path)
    if match and not hmac.compare_digest(match.group(1).encode(), rt.settings.account_sid.encode()):
        return twilio_error(20404, 404, path=request.path)
    return None


def credentials_match(username: str | None, password: str | None) -> bool:
    settings = runtime().settings
    # Both comparisons always run, in constant time, so timing reveals neither part.
    user_ok = hmac.compare_digest((username or "").encode(), settings.account_sid.encode())
    password_ok = hmac.compare_digest((password or "").encode(), settings.auth_token.encode())
    return user_ok & password_ok


@bp.post("/Accounts/<account_sid>/Messages.json")
def create_message(account_sid: str):
    rt, started = runtime(), time.perf_counter()
    raw_body = request.get_data(cache=True)  # kept so the forward is byte-for-byte what was sent
    form = request.form
    to_raw = form.get("To", "").strip()
    from_raw = form.get("From", "").strip()
    service_sid = form.get("MessagingServiceSid", "").strip() or None
    media_urls = [u for u in form.getlist("MediaUrl") if u.strip()]
    content_sid = form.get("ContentSid", "").strip() or None
    if not to_raw:
        return twilio_error(21604, 400)
    if not from_raw and not service_sid:
        return twilio_error(21603, 400)
    if not (form.get("Body") or media_urls or content_sid):
        return twilio_error(21602, 400)

    channel = channel_of(to_raw)
    sender = user = None
    state = CLOSED
    content_type = content_type_of(form.get("Body"), media_urls, content_sid)
    if channel in WINDOWED_CHANNELS:
        try:
            user = normalise(to_raw)
        except InvalidAddress:
            return twilio_error(21211, 400, to=to_raw)
        if from_raw:
            try:
                sender = normalise(from_raw)
            except InvalidAddress:
                return twilio_error(21212, 400, from_=from_raw)
            if channel_of(sender) != channel:
                return twilio_error(21910, 400)
        else:
            sender = service_sid
        with rt.engine.connect() as conn:
            found = store.load_window(conn, sender, user)
        if found:
            state = window_state(*found, now=utcnow(), safety_margin_seconds=rt.settings.window_safety_margin_seconds)
    decision = decide(channel, content_type, state)

    attempt = dict(
        request_id=g.request_id,
        account_sid=account_sid,
        sender=sender or from_raw or service_sid,
        user=user or to_raw,
        channel=channel,
        content_type=content_type or ("content" if content_sid else None),
        decision=decision.action.value,
        reason=decision.reason,
        error_code=decision.code,
        params=json.dumps(list(form.items(multi=True))),
    )
    if decision.action is Action.BLOCKED:
        response = twilio_error(decision.code, 400, blocked_message(decision, state))
        outcome, upstream_status, message_sid = "blocked", None, None
    else:
        response, outcome, upstream_status, message_sid = _forward(raw_body)
    _finish(attempt, decision, state, response, outcome, upstream_status, message_sid, started)
    return response


def blocked_message(decision: Decision, state) -> str:
    base = MESSAGES[OUTSIDE_WINDOW]
    if decision.reason == "no_window":
        return f"{base} (proxy: this user has not messaged this sender, so no customer-service window is open.)"
    expired = state.expires_at.isoformat().replace("+00:00", "Z")
    return f"{base} (proxy: the customer-service window closed at {expired}.)"


@bp.route("/<path:rest>", methods=["GET", "POST", "DELETE", "PUT", "PATCH"])
def passthrough(rest: str):
    """Every other 2010-04-01 call goes to Twilio unchanged, so the whole client keeps working."""
    rt, started = runtime(), time.perf_counter()
    response, outcome, upstream_status, _ = _forward(request.get_data())
    response.headers["X-Proxy-Decision"] = Action.PASSTHROUGH.value
    logs.event("api_passthrough", redact=True, method=request.method, path=request.path, outcome=outcome,
               upstream_status=upstream_status, duration_ms=_ms(started), request_id=g.request_id)
    return response


def _forward(body: bytes) -> tuple[Response, str, int | None, str | None]:
    rt = runtime()
    headers = {name: request.headers[name] for name in _FORWARDED_HEADERS if name in request.headers}
    try:
        upstream = rt.upstream.request(
            request.method,
            request.path,
            query=request.query_string.decode("latin-1"),
            data=body or None,
            headers=headers,
        )
    except UpstreamError as exc:
        status = 504 if exc.kind == "timeout" else 502
        text = (f"Twilio did not answer within {rt.settings.twilio_timeout_seconds:g}s; the message may or may not "
                "have been accepted (check the Messages list before retrying)." if exc.kind == "timeout"
                else f"Twilio's API could not be reached ({exc.detail}); nothing was sent.")
        return twilio_error(status, status, text), f"upstream_{exc.kind}", None, None
    response = Response(upstream.text, status=upstream.status_code)
    for name in _RELAYED_HEADERS:
        if name in upstream.headers:
            response.headers[name] = upstream.headers[name]
    sid = None
    if 200 <= upstream.status_code < 300:
        try:
            sid = json.loads(upstream.text).get("sid")
        except (ValueError, AttributeError):
            sid = None
    outcome = "sent" if 200 <= upstream.status_code < 300 else "upstream_error"
    return response, outcome, upstream.status_code, sid


def _finish(attempt, decision, state, response, outcome, upstream_status, message_sid, started) -> None:
    rt = runtime()
    response.headers["X-Proxy-Decision"] = decision.action.value
    duration = _ms(started)
    stored = True
    try:
        with rt.engine.begin() as conn:
            store.record_attempt(
                conn, **attempt, created_at=utcnow(), outcome=outcome, upstream_status=upstream_status,
                message_sid=message_sid, duration_ms=int(duration),
            )
    except Exception:  # noqa: BLE001 — the send already happened; the caller must still get Twilio's answer
        stored = False
        logs.log.exception("attempt_not_stored", extra={"request_id": g.request_id, "message_sid": message_sid})
    logs.event(
        "send",
        redact=rt.settings.log_redact_numbers,
        decision=decision.action.value,
        reason=decision.reason,
        code=decision.code,
        channel=attempt["channel"],
        content_type=attempt["content_type"],
        sender=attempt["sender"],
        user=attempt["user"],
        message_sid=message_sid,
        outcome=outcome,
        upstream_status=upstream_status,
        window_expires_at=state.expires_at.isoformat() if state.expires_at else None,
        seconds_left=state.seconds_left,
        attempt_stored=stored,
        duration_ms=duration,
        request_id=g.request_id,
    )


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)
