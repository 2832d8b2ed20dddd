"""The baseline: a bare Flask endpoint answering /twilio/inbound (and /twilio/status) with the proxy's empty TwiML.

No signature check, no form parsing, no database, no logging: what gunicorn + Flask alone cost.
Served by the Procfile's web command with this module instead of `proxy:create_app()`.
"""

from __future__ import annotations

from flask import Flask, Response
from twilio.twiml.messaging_response import MessagingResponse

EMPTY_TWIML = str(MessagingResponse())  # the same bytes proxy.webhooks answers with

app = Flask(__name__)


@app.post("/twilio/inbound")
@app.post("/twilio/status")  # bench/status.py
def inbound():
    return Response(EMPTY_TWIML, status=200, mimetype="text/xml")


@app.get("/healthz")
def healthz():
    return {"status": "ok"}
