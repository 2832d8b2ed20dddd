"""Twilio-shaped error responses: {"code", "message", "more_info", "status"}, never RFC 9457 keys."""

from __future__ import annotations

from flask import Response, json

from .policy import TWILIO_TEXT

MORE_INFO = "https://www.twilio.com/docs/errors/{code}"

# Twilio's own wording, so callers matching on messages keep working.
MESSAGES = {
    20003: "Authenticate",
    20404: "The requested resource {path} was not found",
    21211: "The 'To' number {to} is not a valid phone number.",
    21212: "The 'From' number {from_} is not a valid phone number, shortcode, or alphanumeric sender ID.",
    21603: "A 'From' phone number is required.",
    21604: "A 'To' phone number is required.",
    21619: "A Message Body, Media URL or Content SID is required",
    21910: "Invalid From and To pair. From and To should be of the same channel",
    21654: "ContentSid Required",
    21655: "The ContentSid is Invalid",
    21656: "The ContentVariables Parameter is invalid",
    35115: "SendAt must be a valid ISO-8601 date-time",
    21658: "Parameter exceeded character limit: Body can be up to 1,600 characters long.",
    21623: "Number of media files exceeds allowed limit",
    **TWILIO_TEXT,  # 63016, 63005
}


class ApiError(Exception):
    """Raised anywhere in a request to answer with a Twilio-shaped error."""

    def __init__(self, code: int, status: int, message: str | None = None, *, refusal: str | None = None, **fmt):
        """`refusal`: why a 503 was a dependency's fault (the database, the Content API): counted with the
        decisions and webhooks (proxy.count_refusal), like the database errors the app's handler answers."""
        super().__init__(code)
        self.code, self.status, self.message, self.fmt, self.refusal = code, status, message, fmt, refusal

    def response(self) -> Response:
        return twilio_error(self.code, self.status, self.message, **self.fmt)


def error_body(code: int, status: int, message: str) -> dict:
    # A body carrying all of type/title/status/code makes twilio-python raise
    # TwilioServiceException instead of TwilioRestException; this shape never does.
    more_info = MORE_INFO.format(code=code) if code >= 10000 else "https://www.twilio.com/docs/api/errors"
    return {"code": code, "message": message, "more_info": more_info, "status": status}


def twilio_error(code: int, status: int, message: str | None = None, **fmt) -> Response:
    text = message if message is not None else MESSAGES[code].format(**fmt)
    response = Response(json.dumps(error_body(code, status, text)), status=status, mimetype="application/json")
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Basic realm="Twilio API"'
    return response
