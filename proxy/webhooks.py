"""Twilio webhooks: signed inbound messages open windows; status callbacks record delivery states."""

from __future__ import annotations

import time

from flask import Blueprint, Response, g, request
from twilio.request_validator import SIGNATURE_HEADER
from twilio.twiml.messaging_response import MessagingResponse

from . import logs, store
from .addresses import InvalidAddress, normalise
from .db import utcnow
from .errors import twilio_error
from .metrics import WEBHOOKS
from .runtime import runtime

bp = Blueprint("webhooks", __name__, url_prefix="/twilio")

EMPTY_TWIML = str(MessagingResponse())


@bp.before_request
def require_twilio_signature():
    rt = runtime()
    signature = request.headers.get(SIGNATURE_HEADER, "")
    if not signature or not rt.validator.validate(signed_url(), request.form, signature):
        WEBHOOKS.labels("unknown", "signature_rejected").inc()
        logs.event("webhook_rejected", redact=rt.settings.log_redact_numbers, level=30,
                   path=request.path, reason="missing_signature" if not signature else "invalid_signature",
                   request_id=g.request_id)
        return twilio_error(20403, 403, "Forbidden: X-Twilio-Signature is missing or does not match this URL.")
    return None


def signed_url() -> str:
    """The URL Twilio signed: PUBLIC_BASE_URL + path + query behind a load balancer, else as received."""
    base = runtime().settings.public_base_url
    if not base:
        return request.url
    query = request.query_string.decode("latin-1")
    return base + request.path + (f"?{query}" if query else "")


@bp.post("/inbound")
@bp.post("/status")
def webhook():
    # What a webhook is depends on its fields, not on the URL it was sent to: a status
    # callback pointed at /inbound must never open a window.
    if request.form.get("MessageStatus"):
        return _status_callback()
    return _inbound_message()


def _inbound_message() -> Response:
    rt, started = runtime(), time.perf_counter()
    form = request.form
    sid = form.get("MessageSid") or form.get("SmsSid")
    try:
        if not sid:
            raise InvalidAddress("MessageSid is missing")
        user, sender = normalise(form.get("From", "")), normalise(form.get("To", ""))
    except InvalidAddress as exc:
        logs.event("inbound", redact=True, level=30, decision="rejected", reason="malformed_webhook",
                   detail=str(exc), request_id=g.request_id)
        WEBHOOKS.labels("inbound", "malformed").inc()
        return twilio_error(21211, 400, f"Malformed inbound webhook: {exc}")
    service_sid = form.get("MessagingServiceSid") or None
    with rt.engine.begin() as conn:
        expires_at = store.record_inbound(
            conn,
            sid=sid,
            sender=sender,
            user=user,
            messaging_service_sid=service_sid,
            profile_name=form.get("ProfileName") or None,
            num_media=_int_or_none(form.get("NumMedia")),
            received_at=utcnow(),
            window_seconds=rt.settings.session_window_seconds,
        )
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


def _status_callback() -> Response:
    rt, started = runtime(), time.perf_counter()
    form = request.form
    sid = form.get("MessageSid") or form.get("SmsSid")
    if not sid:
        return twilio_error(21211, 400, "Malformed status callback: MessageSid is missing")
    status = form["MessageStatus"].strip().lower()
    error_code = _int_or_none(form.get("ErrorCode"))
    with rt.engine.begin() as conn:
        changed = store.record_status(
            conn,
            sid=sid,
            status=status,
            error_code=error_code,
            sender=_normalised_or_raw(form.get("From")),
            user=_normalised_or_raw(form.get("To")),
            at=utcnow(),
        )
    WEBHOOKS.labels("status", "recorded" if changed else "stale").inc()
    logs.event(
        "status",
        redact=rt.settings.log_redact_numbers,
        decision="recorded" if changed else "stale",
        status=status,
        error_code=error_code,
        sender=_normalised_or_raw(form.get("From")),
        user=_normalised_or_raw(form.get("To")),
        message_sid=sid,
        duration_ms=round((time.perf_counter() - started) * 1000, 2),
        request_id=g.request_id,
    )
    return _twiml()


def _twiml() -> Response:
    return Response(EMPTY_TWIML, status=200, mimetype="text/xml")


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except ValueError:
        return None


def _normalised_or_raw(value: str | None) -> str | None:
    if not value:
        return None
    try:
        return normalise(value)
    except InvalidAddress:
        return value[:128]
