"""The drop-in Messages API: judges each create, then forwards, blocks or reroutes it."""

from __future__ import annotations

import functools
import hmac
import json
import logging
import re
import time
from urllib.parse import quote

from flask import Blueprint, Response, g, request
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.datastructures import MultiDict

from . import attempts, holds, logs
from .metrics import DECISIONS, SEND_OVERHEAD_SECONDS, UPSTREAM_SECONDS
from .auth import require_basic_auth
from .content import CONTENT_SID
from .db import utcnow, writing
from .errors import ApiError, twilio_error
from .forms import URLENCODED, body_of, strict_form
from .headers import sendable
from .judge import Judgement, fail_open, judge, sticky_note
from .migrate import UPGRADE_COMMAND, schema_missing
from .policy import Action, explain, rerouted_params
from .runtime import runtime
from .upstream import UpstreamError

bp = Blueprint("gateway", __name__, url_prefix="/2010-04-01")

# The account a 2010-04-01 path names (the sandbox simulator checks it against its credentials too, as Twilio does).
ACCOUNT_IN_PATH = re.compile(r"^/2010-04-01/Accounts/([^/]+?)(?:\.json)?(?:/|\Z)")
# Caller headers worth keeping upstream; hop-by-hop and proxy headers are not.
_FORWARDED_HEADERS = ("Authorization", "Content-Type", "Accept", "Accept-Charset", "User-Agent", "X-Twilio-Client",
                      "I-Twilio-Idempotency-Token")
# Twilio's response headers are relayed (twilio-python's *_with_http_info methods show them all), but
# not those of the hop to Twilio: connection management and framing (the body is relayed decoded, its
# length set anew), and what the proxy's own server sets (Date, Server).
_NOT_RELAYED = frozenset(("connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                          "transfer-encoding", "upgrade", "content-length", "content-encoding", "date", "server",
                          # Twilio's for its own host; on the proxy's host a cookie and an HSTS pin would be the proxy's.
                          "set-cookie", "strict-transport-security"))
# Nor what no server can send on (proxy/headers.py), nor the proxy's own headers (X-Proxy-*, X-Request-Id).


def _relayed(headers) -> list[tuple[str, str]]:
    kept, content_type = [], False
    # Headers the hop names in its Connection header are that hop's too (RFC 9110 7.6.1).
    hop = {token.strip().lower() for value in headers.getlist("Connection") for token in value.split(",")}
    for name, value in headers.iteritems():
        lower = name.lower()
        if lower in _NOT_RELAYED or lower in hop or lower.startswith("x-proxy-") or lower == "x-request-id" \
                or not sendable(name, value):
            continue
        if lower == "content-type":
            if content_type:
                continue  # one body, one Content-Type: the first
            content_type = True
        kept.append((name, value))
    return kept


@bp.before_request
def authenticate():
    denied = require_basic_auth()
    if denied is not None:
        return denied
    match = ACCOUNT_IN_PATH.match(request.path)
    if match and not hmac.compare_digest(match.group(1).encode(), runtime().settings.account_sid.encode()):
        return twilio_error(20404, 404, path=request.path)
    return None


@bp.after_request
def say_when_nothing_was_judged(response: Response) -> Response:
    # Refused before any decision (credentials, validation, size, the database or the Content API
    # unavailable): the proxy answered itself and sent nothing.
    if "X-Proxy-Decision" not in response.headers:
        response.headers["X-Proxy-Decision"] = "rejected"
        # A send refused as bad input (a mistyped ContentSid, a number Twilio would refuse): said in a line the caller's
        # X-Request-Id finds, as a judged send's is. A 401/403 is `auth_failed`'s line, a 5xx the database's or the
        # error's own; other API calls are no sends.
        if request.endpoint == "gateway.create_message" and 400 <= response.status_code < 500 and \
                response.status_code not in (401, 403):
            code = (response.get_json(silent=True) or {}).get("code") if response.is_json else None
            code = code if isinstance(code, int) else response.status_code
            DECISIONS.labels("rejected", str(code), "none").inc()
            logs.event("send", redact=True, decision="rejected", reason="invalid_request", code=code,
                       status=response.status_code, method=request.method, path=logs.masked_path(request.path),
                       request_id=g.get("request_id"))
    return response


def create_form() -> tuple[bytes, MultiDict]:
    """A Messages create's body (kept so the forward is byte-for-byte what was sent) and the fields it
    is judged by; ApiError (400) for a body the gateway would not forward. /v1/preflight reads it the same way.
    """
    if request.query_string:
        raise ApiError(400, 400, "A Messages create takes its fields in the form body, not the query string.")
    raw_body = body_of(request)
    # Judged as a form, so only a form may be forwarded: a body of another type (also one sent chunked,
    # without a Content-Length) would be judged as one thing and reach Twilio as another.
    if raw_body and request.mimetype != URLENCODED:
        raise ApiError(400, 400, "A Messages create must be application/x-www-form-urlencoded, as Twilio's is.")
    # Judged as UTF-8 (and forwarded as a plain form, _forward): under another declared charset (utf-7) the same
    # bytes could read as another To, judged as SMS and sent as WhatsApp.
    if request.mimetype_params.get("charset", "utf-8").strip().lower() not in ("utf-8", "utf8"):
        raise ApiError(400, 400, "A Messages create must be UTF-8: the proxy judges what Twilio will read.")
    form = strict_form(raw_body)
    if form is None:
        raise ApiError(400, 400, "The request body is not valid UTF-8 form data.")
    return raw_body, form


# No automatic OPTIONS on the gateway's routes: Flask answered it with an empty 200 (after the credentials), as
# if the proxy served it; a method twilio-python never uses is a Twilio-shaped 405 (proxy/__init__.py).
@bp.post("/Accounts/<account_sid>/Messages.json", provide_automatic_options=False)
def create_message(account_sid: str):
    rt, started = runtime(), time.perf_counter()
    raw_body, form = create_form()
    try:
        if not rt.schema.reached():
            # Judged on the old tables it would go to Twilio, and its attempt row (newer columns) be lost.
            detail = f"the database's migrations are behind this code's: run `{UPGRADE_COMMAND}`"
            logs.log.error("migrations_not_at_head", extra={"path": logs.masked_path(request.path), "detail": detail,
                                                            "request_id": g.request_id})
            DECISIONS.labels("rejected", "migrations_not_at_head", "none").inc()
            raise ApiError(503, 503, f"This send could not be recorded, so nothing was sent: {detail}.")
        judgement = judge(rt, form)
    except SQLAlchemyError as exc:
        # 503: fail closed, nothing is sent unjudged. FAIL_OPEN is for an outage; a database the
        # migrations never reached is no outage, and no retry would ever bring the judging back.
        if not rt.settings.fail_open or schema_missing(exc):
            raise
        logs.log.critical("fail_open", extra={"request_id": g.request_id,
                                              "detail": "database unavailable; send forwarded unjudged"})
        judgement = fail_open(form)
    decision = judgement.decision
    if decision.action is Action.BLOCKED:
        message = explain(decision, judgement.send, judgement.window, judgement.judged_at) + sticky_note(judgement)
        response = twilio_error(decision.code, 400, message)
        outcome, upstream_status, message_sid, waited = "blocked", None, None, None
    elif decision.action is Action.REROUTED:
        body = rerouted_form(form, judgement)
        response, outcome, upstream_status, message_sid, waited = _forward(body)
        response.headers["X-Proxy-Rerouted-To"] = judgement.fallback.content_sid
        # Held only once the fallback went out: a caller retrying a failed reroute must not
        # leave two copies waiting for release.
        if rt.settings.hold_on_reroute and outcome == "sent":
            try:
                response.headers["X-Proxy-Held-Id"] = str(_hold(account_sid, form, judgement))
            except SQLAlchemyError as exc:
                # Twilio already took the fallback: answering 503 ("nothing was sent") would make a
                # retrying caller send the template twice. Relay Twilio's answer and say the original
                # was not kept, so the caller can send it again itself once the user writes.
                response.headers["X-Proxy-Hold-Failed"] = "database_error"
                logs.event("hold_failed", redact=rt.settings.log_redact_numbers, level=logging.ERROR,
                           error=type(exc).__name__, sender=judgement.sender, user=judgement.user,
                           message_sid=message_sid, request_id=g.request_id)
    else:
        response, outcome, upstream_status, message_sid, waited = _forward(raw_body)
    response.headers["X-Proxy-Decision"] = decision.action.value
    # Logged and recorded once the answer is written (a WSGI server closes the response then, also when the caller
    # went away): the attempt row was stored by a background writer anyway, and the line, the row and the metrics
    # were ~1 ms of the caller's wait at a steady 200 sends/s (bench/README.md, session 23).
    # Stamped now, not when recorded: late_failures reads the time of judging from created_at less duration_ms.
    response.call_on_close(functools.partial(
        _finish, rt, g.request_id, account_sid, form, judgement, outcome, upstream_status, message_sid, _ms(started),
        None if waited is None else round(waited * 1000, 2), utcnow()))
    return response


def _hold(account_sid: str, form: MultiDict, judgement: Judgement) -> int:
    """Keep the original request (StatusCallback included) until the user's next message opens the window."""
    rt = runtime()
    with writing(rt.engine) as conn:
        held_id, _ = holds.hold(conn, sender=judgement.sender, user=judgement.user, account_sid=account_sid,
                                params=list(form.items(multi=True)), request_id=g.request_id, now=utcnow(),
                                ttl_seconds=rt.settings.hold_ttl_seconds,
                                judged_inbound_at=judgement.window.last_inbound_at,
                                window_sender=judgement.window_sender)
        return held_id


def rerouted_form(form: MultiDict, judgement: Judgement) -> list[tuple[str, str]]:
    return rerouted_params(form.items(multi=True), judgement.fallback.content_sid,
                           judgement.fallback.render(judgement.profile_name))


@bp.route("/<path:rest>", methods=["GET", "POST", "DELETE"], provide_automatic_options=False)
def passthrough(rest: str):
    """Every other 2010-04-01 call goes to Twilio unchanged, so the whole client keeps working."""
    if not _safe_passthrough_path(request.path, request.method):
        # A path that Twilio could read as a Messages create must never bypass the judge.
        return twilio_error(400, 400, f"The proxy does not forward {request.method} {request.path!r}: "
                                      "send messages with POST to /2010-04-01/Accounts/{AccountSid}/Messages.json.")
    started = time.perf_counter()
    response, outcome, upstream_status, _, _ = _forward(body_of(request))
    response.headers["X-Proxy-Decision"] = Action.PASSTHROUGH.value
    logs.event("api_passthrough", redact=True, method=request.method, path=logs.masked_path(request.path), outcome=outcome,
               upstream_status=upstream_status, duration_ms=_ms(started), request_id=g.request_id)
    return response


# `/SMS/Messages` too: the legacy create resource sends as the current one does.
_CREATE_LIKE = re.compile(r"/Accounts/[^/]+/(SMS/)?Messages(\.[^/]*)?/*$", re.IGNORECASE)


def _safe_passthrough_path(path: str, method: str) -> bool:
    # `;` too: Twilio's paths have no path parameters, and a server that strips them would see a create.
    if any(c in path for c in "?#;\\") or "//" in path or any(ord(c) < 32 for c in path):
        return False
    if any(segment in (".", "..") for segment in path.split("/")):
        return False
    return not (method == "POST" and _CREATE_LIKE.search(path))


_STRAY_PERCENT = re.compile(rb"%(?![0-9A-Fa-f]{2})")


def _wire_query(raw: bytes) -> str:
    """The query as the caller sent it, in a form urllib3 passes on untouched: raw non-ASCII bytes and a
    stray '%' escaped (urllib3 re-escapes every '%' of a query holding one that starts no escape)."""
    return quote(_STRAY_PERCENT.sub(b"%25", raw), safe="!#$%&'()*+,/:;=?@[]~")


def _forward(body) -> tuple[Response, str, int | None, str | None, float]:
    """Twilio's answer relayed (or the proxy's for a failed call), the outcome, Twilio's status and message sid, and
    the seconds spent waiting on Twilio."""
    rt, req = runtime(), request._get_current_object()  # one context lookup, not one per attribute
    received = req.headers
    headers = {name: received[name] for name in _FORWARDED_HEADERS if name in received}
    operation = "create" if req.path.endswith("/Messages.json") and req.method == "POST" else "passthrough"
    if operation == "create":
        # A create was judged as a UTF-8 form (create_form): Twilio must read it as one, whatever parameters the
        # caller's Content-Type carried (werkzeug drops a charset it cannot parse, `charset="utf-7`, unjudged).
        headers["Content-Type"] = URLENCODED
    started = time.perf_counter()
    try:
        upstream = rt.upstream.request(
            req.method,
            quote(req.path, safe="/:@!$&'()*+,;=-._~"),  # re-encoded: the path Twilio sees is the one judged
            query=_wire_query(req.query_string) if req.query_string else "",
            data=body or None,
            headers=headers,
        )
    except UpstreamError as exc:
        waited = time.perf_counter() - started
        UPSTREAM_SECONDS.labels(operation, exc.kind).observe(waited)
        status = 504 if exc.kind == "timeout" else 502
        # Only a create leaves a message that may have been accepted; a read changes nothing, anything else may have.
        unknown = ("the message may or may not have been accepted (check the Messages list before retrying)"
                   if operation == "create" else "nothing was changed" if req.method in ("GET", "HEAD")
                   else "the request may or may not have been carried out")
        if exc.kind == "timeout":
            text = f"Twilio did not answer within {rt.settings.twilio_timeout_seconds:g}s; {unknown}."
        elif exc.kind == "broken":
            text = f"The connection to Twilio broke after the request was sent ({exc.detail}); {unknown}."
        else:
            text = f"Twilio's API could not be reached ({exc.detail}); nothing was sent."
        return twilio_error(status, status, text), f"upstream_{exc.kind}", None, None, waited
    waited = time.perf_counter() - started
    UPSTREAM_SECONDS.labels(operation, str(upstream.status_code)).observe(waited)
    response = Response(upstream.content, status=upstream.status_code, headers=_relayed(upstream.headers))
    if "content-type" not in upstream.headers:
        del response.headers["Content-Type"]  # werkzeug's default text/html is not Twilio's
    if req.method == "HEAD" and "content-length" in upstream.headers:
        response.headers["Content-Length"] = upstream.headers["content-length"]
    sid = None
    if 200 <= upstream.status_code < 300:
        try:
            sid = json.loads(upstream.content).get("sid")
        except (ValueError, AttributeError):
            sid = None
        if not isinstance(sid, str):
            sid = None  # Twilio's answer is relayed as it is; only a sid that is text is recorded
    outcome = "sent" if 200 <= upstream.status_code < 300 else "upstream_error"
    return response, outcome, upstream.status_code, sid, waited


def _finish(rt, request_id, account_sid, form, judgement: Judgement, outcome, upstream_status, message_sid,
            duration, upstream_ms, over) -> None:
    """The send's metrics, attempt row and log line: run after the request's context is gone, so given all it needs."""
    try:
        decision = judgement.decision
        content_type = attempts.content_type(judgement)
        DECISIONS.labels(decision.action.value, decision.reason, content_type or "none").inc()
        SEND_OVERHEAD_SECONDS.labels(decision.action.value).observe(max(0.0, duration - (upstream_ms or 0)) / 1000)
        rt.attempts.submit(attempts.row(
            judgement, account_sid=account_sid, request_id=request_id, params=list(form.items(multi=True)),
            decision=decision.action.value, outcome=outcome, upstream_status=upstream_status, message_sid=message_sid,
            duration_ms=duration, at=over))
        state = judgement.window
        logs.event(
            "send",
            redact=rt.settings.log_redact_numbers,
            decision=decision.action.value,
            reason=decision.reason,
            code=decision.code,
            channel=judgement.channel,
            content_type=content_type,
            # A passthrough send's ContentSid is not checked: only a real Content SID is logged, never a value put there.
            content_sid=_logged_content_sid(judgement.content_sid),
            approval_status=judgement.send.approval,
            fallback_content_sid=judgement.fallback.content_sid if judgement.fallback else None,
            sender=judgement.sender,
            user=judgement.user,
            window_sender=judgement.window_sender if judgement.window_sender != judgement.sender else None,
            message_sid=message_sid,
            outcome=outcome,
            upstream_status=upstream_status,
            window_expires_at=state.expires_at.isoformat() if state.expires_at else None,
            seconds_left=state.seconds_left,
            duration_ms=duration,
            upstream_ms=upstream_ms,
            request_id=request_id,
        )
    except Exception:  # noqa: BLE001 — the caller has its answer; a server would only drop the connection
        logs.log.exception("unhandled_error", extra={"path": "/2010-04-01/Accounts/.../Messages.json",
                                                     "request_id": request_id})


def _logged_content_sid(content_sid: str | None) -> str | None:
    return content_sid if content_sid is None or CONTENT_SID.match(content_sid) else "not_a_content_sid"


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)
