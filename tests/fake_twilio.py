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
from werkzeug.exceptions import HTTPException
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
    contents: dict = field(default_factory=dict)
    content_down: bool = False
    url: str = ""
    api_keys: dict = field(default_factory=dict)  # SK sid -> secret, accepted like Twilio does

    def reset(self) -> None:
        self.requests.clear()
        self.messages.clear()
        self.contents.clear()
        self.delay = 0.0
        self.fail_with = None
        self.content_down = False

    def add_content(self, types: dict, approval: str | None = "approved", *, flat: bool = False,
                    sid: str | None = None) -> str:
        """A Content resource shaped like the Content API's examples; approval None means never submitted."""
        sid = sid or "HX" + uuid.uuid4().hex
        self.contents[sid] = {"types": types, "approval": approval, "flat": flat}
        return sid

    def content_requests(self, sid: str | None = None) -> list[Received]:
        return [r for r in self.requests if r.path.startswith("/v1/") and (sid is None or sid in r.path)]

    @property
    def creates(self) -> list[Received]:
        return [r for r in self.requests if r.method == "POST" and r.path.endswith("/Messages.json")]

    def app(self) -> Flask:
        app = Flask("fake_twilio")

        def authorised() -> bool:
            pairs = [(self.account_sid, self.auth_token), *self.api_keys.items()]
            given = request.headers.get("Authorization")
            return any(given == "Basic " + base64.b64encode(f"{u}:{p}".encode()).decode() for u, p in pairs)

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
            if self.content_down and request.path.startswith("/v1/"):
                return _error(20503, 503, "Service Unavailable")
            if self.fail_with and not request.path.startswith("/v1/"):
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

        @app.post("/2010-04-01/Accounts/<account>/Messages/<sid>.json")
        def update(account, sid):  # Twilio's update: redact the body or cancel a scheduled message
            if sid not in self.messages:
                return _error(20404, 404, f"The requested resource {request.path} was not found")
            if "Body" in request.form:
                self.messages[sid]["body"] = request.form["Body"]
            if request.form.get("Status") == "canceled":
                self.messages[sid]["status"] = "canceled"
            return Response(json.dumps(self.messages[sid]), mimetype="application/json; charset=utf-8")

        @app.delete("/2010-04-01/Accounts/<account>/Messages/<sid>.json")
        def delete(account, sid):
            if self.messages.pop(sid, None) is None:
                return _error(20404, 404, f"The requested resource {request.path} was not found")
            return Response(status=204)

        @app.get("/2010-04-01/Accounts/<account>/Messages.json")
        def read(account):
            page = [m for m in self.messages.values()
                    if request.args.get("To") in (None, m["to"]) and request.args.get("From") in (None, m["from"])]
            return Response(json.dumps({"messages": page, "page": 0, "page_size": 50, "first_page_uri": request.path,
                                        "next_page_uri": None, "previous_page_uri": None, "uri": request.path,
                                        "start": 0, "end": len(page)}),
                            mimetype="application/json; charset=utf-8")

        @app.errorhandler(HTTPException)
        def http_error(exc):  # Twilio answers every error in its JSON shape
            return _error(20000 + exc.code if exc.code == 404 else exc.code, exc.code, exc.description)

        def content_json(sid):
            c = self.contents[sid]
            return {
                "sid": sid, "account_sid": self.account_sid, "friendly_name": f"content {sid[-4:]}",
                "language": "en", "variables": {"1": "name"}, "types": c["types"],
                "url": f"{self.url}/v1/Content/{sid}", "date_created": "2026-01-01T00:00:00Z",
                "date_updated": "2026-01-01T00:00:00Z",
                "links": {"approval_create": f"{self.url}/v1/Content/{sid}/ApprovalRequests/whatsapp",
                          "approval_fetch": f"{self.url}/v1/Content/{sid}/ApprovalRequests"},
            }

        def approval_json(sid):
            c = self.contents[sid]
            whatsapp = {"type": "whatsapp", "name": f"template_{sid[-6:]}", "category": "UTILITY",
                        "content_type": next(iter(c["types"]), ""), "status": c["approval"] or "unsubmitted",
                        "rejection_reason": "", "allow_category_change": True}
            return whatsapp

        @app.get("/v1/Content/<sid>")
        def content(sid):
            if sid not in self.contents:
                return _error(20404, 404, f"The requested resource /Content/{sid} was not found")
            return Response(json.dumps(content_json(sid)), mimetype="application/json")

        @app.get("/v1/Content/<sid>/ApprovalRequests")
        def approval(sid):
            if sid not in self.contents:
                return _error(20404, 404, f"The requested resource /Content/{sid}/ApprovalRequests was not found")
            whatsapp = approval_json(sid)
            body = whatsapp if self.contents[sid]["flat"] else {
                "sid": sid, "account_sid": self.account_sid, "whatsapp": whatsapp,
                "url": f"{self.url}/v1/Content/{sid}/ApprovalRequests"}
            return Response(json.dumps(body), mimetype="application/json")

        @app.get("/v1/ContentAndApprovals")
        def content_and_approvals():
            size, page = int(request.args.get("PageSize", 50)), int(request.args.get("Page", 0))
            sids = sorted(self.contents)
            chunk = sids[page * size:(page + 1) * size]
            items = []
            for sid in chunk:
                item = content_json(sid)
                item.pop("url"), item.pop("links")
                approval = approval_json(sid)
                approval.pop("type")
                item["approval_requests"] = approval if self.contents[sid]["flat"] else {"whatsapp": approval}
                items.append(item)
            base = f"{self.url}/v1/ContentAndApprovals?PageSize={size}"
            more = (page + 1) * size < len(sids)
            meta = {"page": page, "page_size": size, "first_page_url": f"{base}&Page=0",
                    "previous_page_url": f"{base}&Page={page - 1}" if page else None,
                    "next_page_url": f"{base}&Page={page + 1}" if more else None,
                    "url": f"{base}&Page={page}", "key": "contents"}
            return Response(json.dumps({"contents": items, "meta": meta}), mimetype="application/json")

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
