"""A fake Twilio Messages API on 127.0.0.1: a real threaded HTTP server that records what it receives."""

from __future__ import annotations

import base64
import threading
import time
import uuid
from dataclasses import dataclass, field
from email.utils import format_datetime
from datetime import datetime, timezone

from flask import Flask, Response, json, request
from werkzeug.serving import make_server


@dataclass
class Received:
    method: str
    path: str
    query: str
    headers: dict
    form: list[tuple[str, str]]
    body: bytes


@dataclass
class FakeTwilio:
    account_sid: str
    auth_token: str
    requests: list[Received] = field(default_factory=list)
    delay: float = 0.0
    fail_with: tuple[int, dict] | None = None
    messages: dict = field(default_factory=dict)

    def reset(self) -> None:
        self.requests.clear()
        self.messages.clear()
        self.delay = 0.0
        self.fail_with = None

    @property
    def creates(self) -> list[Received]:
        return [r for r in self.requests if r.method == "POST" and r.path.endswith("/Messages.json")]

    def app(self) -> Flask:
        app = Flask("fake_twilio")

        def authorised() -> bool:
            expected = "Basic " + base64.b64encode(f"{self.account_sid}:{self.auth_token}".encode()).decode()
            return request.headers.get("Authorization") == expected

        @app.before_request
        def record():
            body = request.get_data(cache=True)  # before .form, which would consume the stream
            self.requests.append(Received(
                method=request.method, path=request.path, query=request.query_string.decode(),
                headers=dict(request.headers), form=list(request.form.items(multi=True)),
                body=body,
            ))
            if self.delay:
                time.sleep(self.delay)
            if not authorised():
                return _error(20003, 401, "Authenticate")
            if self.fail_with:
                status, body = self.fail_with
                return Response(json.dumps(body), status=status, mimetype="application/json")
            return None

        @app.post("/2010-04-01/Accounts/<account>/Messages.json")
        def create(account):
            now = format_datetime(datetime.now(timezone.utc))
            sid = "SM" + uuid.uuid4().hex
            media = request.form.getlist("MediaUrl")
            message = {
                "account_sid": account, "api_version": "2010-04-01", "body": request.form.get("Body", ""),
                "date_created": now, "date_sent": None, "date_updated": now, "direction": "outbound-api",
                "error_code": None, "error_message": None, "from": request.form.get("From") or None,
                "messaging_service_sid": request.form.get("MessagingServiceSid") or None,
                "num_media": str(len(media)), "num_segments": "1", "price": None, "price_unit": "USD",
                "sid": sid, "status": "accepted" if request.form.get("MessagingServiceSid") else "queued",
                "subresource_uris": {"media": f"/2010-04-01/Accounts/{account}/Messages/{sid}/Media.json"},
                "to": request.form.get("To"), "uri": f"/2010-04-01/Accounts/{account}/Messages/{sid}.json",
            }
            self.messages[sid] = message
            return Response(json.dumps(message), status=201, mimetype="application/json; charset=utf-8",
                            headers={"Twilio-Request-Id": "RQ" + uuid.uuid4().hex})

        @app.get("/2010-04-01/Accounts/<account>/Messages/<sid>.json")
        def fetch(account, sid):
            if sid not in self.messages:
                return _error(20404, 404, f"The requested resource {request.path} was not found")
            return Response(json.dumps(self.messages[sid]), mimetype="application/json; charset=utf-8")

        return app


def _error(code: int, status: int, message: str) -> Response:
    body = {"code": code, "message": message, "more_info": f"https://www.twilio.com/docs/errors/{code}",
            "status": status}
    return Response(json.dumps(body), status=status, mimetype="application/json; charset=utf-8")


class ServerThread:
    """Serve a WSGI app on 127.0.0.1 (an ephemeral port) in a background thread."""

    def __init__(self, app):
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.port = self.server.server_port
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.thread.join(5)
