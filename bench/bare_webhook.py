"""The inbound floor: a Flask webhook that checks X-Twilio-Signature as Twilio's own Flask guide does.

`request.form` and twilio-python's RequestValidator over `request.url`, 403 when the signature is
wrong, else the proxy's empty TwiML: the least a webhook endpoint that trusts only Twilio must do.
No database, no logging. The proxy's inbound work on top of it is recording the message and its
window and the log line; the gap between the two is that work. Served by the Procfile's web command
with this module instead of `proxy:create_app()`.
"""

from __future__ import annotations

import os

from flask import Flask, Response, request
from twilio.request_validator import RequestValidator

from bench.bare_app import EMPTY_TWIML

app = Flask(__name__)
validator = RequestValidator(os.environ["TWILIO_AUTH_TOKEN"])


@app.post("/twilio/inbound")
@app.post("/twilio/status")  # bench/status.py
def inbound():
    if not validator.validate(request.url, request.form, request.headers.get("X-Twilio-Signature", "")):
        return Response("Forbidden", status=403)
    return Response(EMPTY_TWIML, status=200, mimetype="text/xml")


@app.get("/healthz")
def healthz():
    return {"status": "ok"}
