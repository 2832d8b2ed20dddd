"""The gateway's floor: a bare Flask endpoint that forwards each Messages create and relays the answer.

It forwards with the proxy's own transport (proxy.upstream.Upstream: the same urllib3 pool and reuse
check), but authenticates nothing, judges nothing, reads and writes no database and logs nothing:
what gunicorn + Flask + one forwarded HTTP request cost on this machine, under the same gunicorn
settings. The proxy cannot be faster than this; the gap between the two is the proxy's own work.
Served by the Procfile's web command with this module instead of `proxy:create_app()`.
"""

from __future__ import annotations

import os

from flask import Flask, Response, request

from proxy import DEFAULT_POOL_SIZE
from proxy.upstream import Upstream

_FORWARDED = ("Authorization", "Content-Type", "Accept", "User-Agent")
_RELAYED = ("Content-Type", "Twilio-Request-Id")

app = Flask(__name__)
upstream = Upstream(os.environ["TWILIO_API_BASE_URL"], float(os.environ.get("TWILIO_TIMEOUT_SECONDS", "10")),
                    DEFAULT_POOL_SIZE)


@app.post("/2010-04-01/Accounts/<account_sid>/Messages.json")
def create_message(account_sid: str):
    received = request.headers
    answer = upstream.request("POST", request.path, data=request.get_data(),
                              headers={name: received[name] for name in _FORWARDED if name in received})
    response = Response(answer.content, status=answer.status_code)
    for name in _RELAYED:
        if name in answer.headers:
            response.headers[name] = answer.headers[name]
    return response


@app.get("/healthz")
def healthz():
    return {"status": "ok"}
