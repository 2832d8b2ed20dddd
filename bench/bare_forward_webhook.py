"""The forwarding floor: a Flask webhook that checks X-Twilio-Signature, then relays it to the app.

As bench/bare_webhook.py (twilio-python's RequestValidator over `request.url` and `request.form`), then
the webhook goes to FORWARD_INBOUND_URL with the proxy's own forwarder (proxy.forwarding.Forwarder:
re-signed for the app's URL, the same pooled session) and the app's TwiML is relayed. No database, no
outbox, no logging: the least a middleware that trusts only Twilio and hands webhooks on must do.
Served by the Procfile's web command with this module instead of `proxy:create_app()`.
"""

from __future__ import annotations

import os

from flask import Flask, Response, request
from twilio.request_validator import RequestValidator

from proxy import FORWARD_THREADS
from proxy.forwarding import Forwarder

app = Flask(__name__)
validator = RequestValidator(os.environ["TWILIO_AUTH_TOKEN"])
target = os.environ["FORWARD_INBOUND_URL"]
forwarder = Forwarder(os.environ["TWILIO_AUTH_TOKEN"], float(os.environ.get("FORWARD_TIMEOUT_SECONDS", "10")),
                      FORWARD_THREADS)


@app.post("/twilio/inbound")
def inbound():
    if not validator.validate(request.url, request.form, request.headers.get("X-Twilio-Signature", "")):
        return Response("Forbidden", status=403)
    reply = forwarder.post(target, list(request.form.items(multi=True)), {})
    if not reply.ok:
        return Response("Bad Gateway", status=502)
    return Response(reply.body, status=reply.status, content_type=reply.content_type or "text/xml")


@app.get("/healthz")
def healthz():
    return {"status": "ok"}
