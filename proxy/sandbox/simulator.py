"""The simulator: Twilio's Messages and Content APIs plus WhatsApp's own view of each user's window.

Like real Twilio it accepts every well-formed create with 201 and only later fails the ones WhatsApp
refuses (status failed with error_code 63016 or 63005); accepted messages go sent → delivered → read,
and a scheduled one stays scheduled.
Each step is posted as a signed status callback when that URL is on this machine. Its window and
content rules are its own, kept apart from the proxy's decision code.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import threading
import time
import uuid
from xml.etree import ElementTree
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from urllib.parse import urlencode, urlsplit

import requests
from flask import Flask, Response, json, request
from twilio.request_validator import RequestValidator
from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import HTTPException

from ..addresses import (SERVICE_SID, InvalidAddress, as_sent, canonical, channel_of, is_bsuid, is_shortened_bsuid,
                         normalise)
from ..content import CONTENT_SID
from ..gateway import ACCOUNT_IN_PATH
from ..rules import TABLE, UNSENDABLE_APPROVALS, WHATSAPP_COMPLEXITY, Cell
from .templates import SAMPLE_TEMPLATES

SANDBOX_ACCOUNT_SID = "AC" + "5a" * 16
SANDBOX_AUTH_TOKEN = "sandbox-auth-token-not-a-secret"
# One API key, for code that builds its client as Client(api_key, api_secret, account_sid).
SANDBOX_API_KEY_SID = "SK" + "5a" * 16
SANDBOX_API_KEY_SECRET = "sandbox-api-key-secret-not-a-secret"
MESSAGING_SERVICE_SID = SERVICE_SID  # the proxy's own pattern: one definition of what a service SID is
BUSINESS = "whatsapp:+14155238886"  # Twilio's WhatsApp sandbox number, the usual first sender

log = logging.getLogger("proxy.sandbox")


@dataclass
class Received:
    method: str
    path: str
    query: str
    headers: dict
    form: list[tuple[str, str]]
    body: bytes


def is_loopback(url: str) -> bool:
    """The simulator only ever calls this machine: it is a local stand-in, not a relay."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # any other name, e.g. 127.example.com


def whatsapp_key(address: str | None) -> str:
    """How WhatsApp knows an address: by its number, however the request spelt it.

    `-d To=whatsapp:+1…` unencoded reaches Twilio as `whatsapp: 1…`; the proxy normalises it, so the
    simulator must too, or it fails with 63016 a message to a user whose window is open. What cannot be
    normalised (a Messaging Service SID, a create already refused) is compared as given.
    """
    try:
        return normalise(address or "")
    except InvalidAddress:
        return as_sent(address or "") or (address or "").strip()


@dataclass
class Simulator:
    account_sid: str = SANDBOX_ACCOUNT_SID
    auth_token: str = SANDBOX_AUTH_TOKEN
    inbound_url: str | None = None  # where a user's messages go (the proxy's /twilio/inbound)
    status_callback_url: str | None = None  # status callbacks of sends without their own StatusCallback
    callback_delay: float = 0.05
    window_seconds: int = 86400
    requests: list[Received] = field(default_factory=list)
    delay: float = 0.0
    fail_with: tuple[int, dict | str] | None = None  # a str is answered as an HTML page (a firewall's, say)
    messages: dict = field(default_factory=dict)
    contents: dict = field(default_factory=dict)
    content_down: bool = False
    url: str = ""
    api_keys: dict = field(default_factory=dict)  # SK sid -> secret, accepted like Twilio does
    windows: dict = field(default_factory=dict)  # (business, user) by whatsapp_key -> last inbound: WhatsApp's view
    callbacks: list = field(default_factory=list)  # (url, params) of every status callback sent
    _threads: list = field(default_factory=list)

    def reset(self) -> None:
        self.requests.clear()
        self.messages.clear()
        self.contents.clear()
        self.windows.clear()
        self.callbacks.clear()
        self.delay = 0.0
        self.fail_with = None
        self.content_down = False

    # -- content ------------------------------------------------------------------------------------
    def add_content(self, types: dict, approval: str | None = "approved", *, flat: bool = False,
                    sid: str | None = None, name: str | None = None) -> str:
        """A Content resource shaped like the Content API's examples; approval None means never submitted."""
        sid = sid or "HX" + uuid.uuid4().hex
        self.contents[sid] = {"types": types, "approval": approval, "flat": flat, "name": name}
        return sid

    def load_samples(self) -> dict[tuple[str, bool], str]:
        """One template per content type, approved and not: {(type, approved): sid}."""
        sids = {}
        for content_type, body in SAMPLE_TEMPLATES.items():
            for approved in (True, False):
                name = f"{content_type.replace('/', '_')}_{'approved' if approved else 'unapproved'}"
                sid = "HX" + uuid.uuid5(uuid.NAMESPACE_URL, name).hex
                sids[(content_type, approved)] = self.add_content({content_type: body},
                                                                  "approved" if approved else "unsubmitted",
                                                                  sid=sid, name=name)
        return sids

    def content_requests(self, sid: str | None = None) -> list[Received]:
        return [r for r in self.requests if r.path.startswith("/v1/") and (sid is None or sid in r.path)]

    @property
    def creates(self) -> list[Received]:
        return [r for r in self.requests if r.method == "POST" and r.path.endswith("/Messages.json")]

    # -- WhatsApp's view ------------------------------------------------------------------------------
    def window_open(self, sender: str | None, user: str, now: datetime | None = None) -> bool:
        now = now or datetime.now(timezone.utc)
        limit = timedelta(seconds=self.window_seconds)
        user, sender = whatsapp_key(user), (whatsapp_key(sender) if sender is not None else None)
        return any(u == user and (sender is None or b == sender or sender.startswith("MG"))
                   and now - at < limit for (b, u), at in self.windows.items())

    def knows(self, user: str) -> bool:
        """A user has written to one of the businesses (Twilio has posted a webhook from this address)."""
        key = whatsapp_key(user)
        return any(u == key for _, u in self.windows)

    def expire_window(self, user: str) -> None:
        """WhatsApp closes a window early ("in rare cases"): the proxy only learns it from a 63016."""
        user = whatsapp_key(user)
        for key in [k for k in self.windows if k[1] == user]:
            del self.windows[key]

    def _content_refusal(self, form) -> Response | None:
        """Twilio's 21619 (no Body, MediaUrl or ContentSid) and 21655 (a ContentSid that is no Content SID). One of
        the right shape that this simulator does not hold passes: tests pair it with Content APIs of their own."""
        content_sid = (form.get("ContentSid") or "").strip()
        if not (form.get("Body") or any(u.strip() for u in form.getlist("MediaUrl")) or content_sid):
            return _error(21619, 400, "A Message Body, Media URL or Content SID is required")
        if content_sid and not CONTENT_SID.match(content_sid):
            return _error(21655, 400, "The ContentSid is Invalid")
        return None

    def verdict(self, form) -> int | None:
        """What WhatsApp does with an accepted create: None delivers it, else the error it fails with."""
        to = form.get("To", "")
        if channel_of(to) != "whatsapp":
            return None
        sender = form.get("From") or form.get("MessagingServiceSid")
        in_window = self.window_open(sender, to)
        content_sid = form.get("ContentSid")
        if content_sid:
            content = self.contents.get(content_sid)
            if content is None:
                return 63005
            present = [t for t, body in content["types"].items() if body is not None and t in WHATSAPP_COMPLEXITY]
            if not present:
                return 63005
            kind = max(present, key=WHATSAPP_COMPLEXITY.index)
            approval = (content["approval"] or "").lower()
            approved = approval == "approved"
            if in_window and approval in UNSENDABLE_APPROVALS:
                return 63005  # "can't be sent to end users", whatever the type
            buttons = [str(a.get("type", "")).upper() for a in content["types"][kind].get("actions") or []]
        else:
            kind, approved, buttons = ("twilio/media" if form.getlist("MediaUrl") else "twilio/text"), False, []
        in_session, out_of_session = TABLE[kind]
        if not in_window:
            return None if out_of_session is Cell.NEEDS_APPROVAL and approved else 63016
        if approved:
            return None
        if in_session is Cell.ALLOWED:
            # WhatsApp's interactive reply message takes three buttons; a quick-reply with more needs approval.
            return None if kind != "twilio/quick-reply" or len(buttons) <= 3 else 63005
        if in_session is Cell.DEPENDS_ON_BUTTONS and _whatsapp_accepts_buttons(buttons):
            return None
        return 63005

    # -- playing the user -------------------------------------------------------------------------------
    def say(self, user: str, body: str = "", *, to: str = BUSINESS, profile_name: str = "Sandbox User",
            button_payload: str | None = None, latitude: str | None = None, longitude: str | None = None,
            messaging_service_sid: str | None = None, url: str | None = None) -> requests.Response:
        """The user writes to the business: WhatsApp opens the window, Twilio posts a signed webhook.

        Twilio always posts the canonical `whatsapp:+E164` (or a BSUID, as it is), whatever spelling the simulated
        user was given; an address that is neither raises InvalidAddress (a ValueError).
        """
        target = url or self.inbound_url
        if not target or not is_loopback(target):
            raise ValueError("the simulator posts webhooks only to a 127.0.0.1/localhost URL")
        sent_from, to = canonical(user), normalise(to)
        user = whatsapp_key(sent_from)
        sid = "SM" + uuid.uuid4().hex
        params = {"MessageSid": sid, "SmsSid": sid, "SmsMessageSid": sid, "AccountSid": self.account_sid,
                  "From": sent_from, "To": to, "Body": body, "NumMedia": "0", "NumSegments": "1",
                  "SmsStatus": "received", "ApiVersion": "2010-04-01", "ProfileName": profile_name,
                  "MessageType": "text"}
        if not is_bsuid(user):  # Meta's wa_id is the number, which a user known by a BSUID may withhold
            params["WaId"] = sent_from.removeprefix("whatsapp:").lstrip("+")
        if messaging_service_sid:
            params["MessagingServiceSid"] = messaging_service_sid
        if button_payload is not None:
            params.update(ButtonPayload=button_payload, ButtonText=body, MessageType="button")
        if latitude is not None and longitude is not None:
            params.update(Latitude=latitude, Longitude=longitude, MessageType="location")
        self.windows[(to, user)] = datetime.now(timezone.utc)
        signature = RequestValidator(self.auth_token).compute_signature(target, params)
        return requests.post(target, data=params, headers={"X-Twilio-Signature": signature,
                                                           "I-Twilio-Idempotency-Token": uuid.uuid4().hex},
                             timeout=30, allow_redirects=False)

    def _accept(self, account: str, form, direction: str) -> dict:
        """A message Twilio took: stored (fetch and list see it), and played out unless it is scheduled."""
        scheduled = _scheduling(form)
        now = format_datetime(datetime.now(timezone.utc))
        sid = "SM" + uuid.uuid4().hex
        media = form.getlist("MediaUrl")
        message = {
            "account_sid": account, "api_version": "2010-04-01", "body": form.get("Body", ""),
            "date_created": now, "date_sent": None, "date_updated": now, "direction": direction,
            "error_code": None, "error_message": None, "from": form.get("From") or None,
            "messaging_service_sid": form.get("MessagingServiceSid") or None,
            "num_media": str(len(media)), "num_segments": "1", "price": None, "price_unit": "USD",
            "sid": sid,
            "status": "scheduled" if scheduled else "accepted" if form.get("MessagingServiceSid") else "queued",
            "subresource_uris": {"media": f"/2010-04-01/Accounts/{account}/Messages/{sid}/Media.json"},
            "to": form.get("To"), "uri": f"/2010-04-01/Accounts/{account}/Messages/{sid}.json",
        }
        self.messages[sid] = message
        # A scheduled message waits for its SendAt, which the simulator never plays out: it stays
        # `scheduled` (until canceled) rather than reaching WhatsApp now, before its time.
        if not scheduled:
            # Like Twilio, the message's own StatusCallback wins over the sender's (the proxy's, in `sandbox up`).
            callback = form.get("StatusCallback") or self.status_callback_url
            thread = threading.Thread(target=self._lifecycle, args=(message, callback, self.verdict(form)),
                                      daemon=True)
            self._threads.append(thread)
            thread.start()
        return message

    def send_twiml(self, answer: requests.Response, user: str, business: str) -> list[dict]:
        """What Twilio does with the TwiML a webhook was answered with: each `<Message>` sent, a reply from the
        business to the user unless its `to`/`from` say otherwise, judged by WhatsApp like any send (the proxy
        does not judge TwiML: a `<Message>` to another user fails here with 63016, as it would there)."""
        if answer.status_code != 200 or not answer.content.strip():
            return []
        try:
            root = ElementTree.fromstring(answer.content)
        except ElementTree.ParseError:  # Twilio: 12100, nothing sent
            return []
        if root.tag != "Response":
            return []
        sent = []
        for element in root.iter("Message"):
            body = element.find("Body")
            text = (body.text if body is not None else element.text) or ""
            form = MultiDict([("To", element.get("to") or user), ("From", element.get("from") or business),
                              ("Body", text.strip())]
                             + [("MediaUrl", m.text.strip()) for m in element.iter("Media") if (m.text or "").strip()])
            if element.get("statusCallback"):
                form["StatusCallback"] = element.get("statusCallback")
            sent.append(self._accept(self.account_sid, form, "outbound-reply"))
        return sent

    # -- the message's lifecycle and its status callbacks ---------------------------------------------
    def _lifecycle(self, message: dict, url: str | None, code: int | None) -> None:
        """WhatsApp's verdict played out on the message (fetch and list see it), each step posted to url."""
        statuses = ["sent", "failed"] if code else ["sent", "delivered", "read"]
        for status in statuses:
            time.sleep(self.callback_delay)
            message["status"] = status
            if status == "failed":
                message["error_code"], message["error_message"] = code, _ERRORS.get(code)
            if not url or not is_loopback(url):
                # A local stand-in, never a relay: it calls no other host (an app's real https://… callback,
                # which Twilio would call), but the verdict stands in the message all the same.
                continue
            params = {"MessageSid": message["sid"], "SmsSid": message["sid"], "AccountSid": self.account_sid,
                      "From": message["from"] or "", "To": message["to"], "MessageStatus": status,
                      "SmsStatus": status, "ApiVersion": "2010-04-01", "ChannelPrefix": "whatsapp",
                      "ChannelToAddress": whatsapp_key(message["to"]).removeprefix("whatsapp:")}
            if status == "failed":
                params["ErrorCode"] = str(code)
                params["ChannelStatusMessage"] = _ERRORS.get(code, "")
            if status in ("delivered", "read"):
                params["EventType"] = status.upper()
            signature = RequestValidator(self.auth_token).compute_signature(url, params)
            self.callbacks.append((url, params))
            try:
                # Not followed: a redirect could point anywhere, and the sandbox only calls what it was given.
                # With Twilio's idempotency token, one per callback: README's de-duplication advice relies on it.
                requests.post(url, data=params, timeout=15, allow_redirects=False,
                              headers={"X-Twilio-Signature": signature, "I-Twilio-Idempotency-Token": uuid.uuid4().hex})
            except requests.RequestException as exc:
                log.warning("status callback to %s failed: %s", url, type(exc).__name__)

    def wait_for_callbacks(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        for thread in list(self._threads):
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads = [t for t in self._threads if t.is_alive()]

    # -- the HTTP API -----------------------------------------------------------------------------------
    def app(self) -> Flask:
        app = Flask("twilio_simulator")

        def authorised() -> bool:
            pairs = [(self.account_sid, self.auth_token), *self.api_keys.items()]
            given = request.headers.get("Authorization")
            return any(given == "Basic " + base64.b64encode(f"{u}:{p}".encode()).decode() for u, p in pairs)

        @app.before_request
        def record():
            if request.path.startswith("/sandbox"):
                return None
            body = request.get_data(cache=True)  # before .form, which would consume the stream
            self.requests.append(Received(
                method=request.method, path=request.path, query=request.query_string.decode(),
                headers=dict(request.headers), form=list(request.form.items(multi=True)), body=body,
            ))
            if self.delay:
                time.sleep(self.delay)
            if not authorised():
                return _error(20003, 401, "Authenticate")
            # Credentials are one account's: another account's resources are not theirs (a 201 "account_sid":
            # "ACother" from the simulator was no Twilio answer).
            in_path = ACCOUNT_IN_PATH.match(request.path)
            if in_path and in_path.group(1) != self.account_sid:
                return _error(20003, 401, "Authenticate")
            if self.content_down and request.path.startswith("/v1/"):
                return _error(20503, 503, "Service Unavailable")
            if self.fail_with and not request.path.startswith("/v1/"):
                status, error = self.fail_with
                if isinstance(error, str):
                    return Response(error, status=status, mimetype="text/html")
                return Response(json.dumps(error), status=status, mimetype="application/json")
            return None

        @app.after_request
        def twilio_headers(response):
            # The headers Twilio's REST API answers with; twilio-python's *_with_http_info methods show them.
            if not request.path.startswith("/sandbox"):
                for name, value in _TWILIO_RESPONSE_HEADERS.items():
                    response.headers.setdefault(name, value)
                response.headers.setdefault("Twilio-Request-Id", "RQ" + uuid.uuid4().hex)
            return response

        @app.post("/2010-04-01/Accounts/<account>/Messages.json")
        def create(account):
            refused = (_to_refusal(request.form, self.knows) or _sender_refusal(request.form)
                       or _content_variables_refusal(request.form) or self._content_refusal(request.form)
                       or _schedule_refusal(request.form))
            if refused is not None:
                return refused
            reply = json.dumps(self._accept(account, request.form, "outbound-api"))
            return Response(reply, status=201, mimetype="application/json; charset=utf-8",
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
            # Newest first, in pages of PageSize (Twilio: default 50, at most 1000), as Twilio lists them.
            matching = [m for m in reversed(self.messages.values())
                        if request.args.get("To") in (None, m["to"]) and request.args.get("From") in (None, m["from"])]
            try:
                size = min(max(int(request.args.get("PageSize", 50)), 1), 1000)
                number = max(int(request.args.get("Page", 0)), 0)
            except ValueError:
                return _error(20001, 400, "Invalid PageSize or Page")
            start = number * size
            page = matching[start:start + size]
            filters = [(k, v) for k, v in request.args.items(multi=True) if k in ("To", "From")]

            def uri(n):
                token = [("PageToken", f"PA{page[-1]['sid']}" if n > number else f"PB{page[0]['sid']}")] \
                    if n != 0 and page else []
                return f"{request.path}?{urlencode(filters + [('PageSize', size), ('Page', n)] + token)}"

            return Response(json.dumps({"messages": page, "page": number, "page_size": size, "first_page_uri": uri(0),
                                        "next_page_uri": uri(number + 1) if start + size < len(matching) else None,
                                        "previous_page_uri": uri(number - 1) if number else None,
                                        "uri": f"{request.path}?{request.query_string.decode()}".rstrip("?"),
                                        "start": start, "end": start + max(len(page) - 1, 0)}),
                            mimetype="application/json; charset=utf-8")

        def content_json(sid):
            c = self.contents[sid]
            return {
                "sid": sid, "account_sid": self.account_sid, "friendly_name": c.get("name") or f"content {sid[-4:]}",
                "language": "en", "variables": {"1": "name"}, "types": c["types"],
                "url": f"{self.url}/v1/Content/{sid}", "date_created": "2026-01-01T00:00:00Z",
                "date_updated": "2026-01-01T00:00:00Z",
                "links": {"approval_create": f"{self.url}/v1/Content/{sid}/ApprovalRequests/whatsapp",
                          "approval_fetch": f"{self.url}/v1/Content/{sid}/ApprovalRequests"},
            }

        def approval_json(sid):
            c = self.contents[sid]
            return {"type": "whatsapp", "name": c.get("name") or f"template_{sid[-6:]}", "category": "UTILITY",
                    "content_type": next(iter(c["types"]), ""), "status": c["approval"] or "unsubmitted",
                    "rejection_reason": "", "allow_category_change": True}

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
            try:
                size, page = int(request.args.get("PageSize", 50)), int(request.args.get("Page", 0))
            except ValueError:
                size = page = -1
            if not (1 <= size <= 1000 and page >= 0):  # 0 paged forever, a negative one dropped a template
                return _error(20001, 400, "Invalid PageSize or Page")
            sids = sorted(self.contents)
            items = []
            for sid in sids[page * size:(page + 1) * size]:
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

        # The sandbox's own controls (no Twilio equivalent), used by `flask --app proxy sandbox say`.
        @app.post("/sandbox/say")
        def sandbox_say():
            form = request.form
            if (form.get("Latitude") is None) != (form.get("Longitude") is None):
                return _error(400, 400, "say: Latitude and Longitude go together: a location needs both.")
            service = form.get("MessagingServiceSid") or None
            if service is not None and not MESSAGING_SERVICE_SID.fullmatch(service):
                return _error(400, 400, "say: a MessagingServiceSid is MG and 32 hex digits.")
            try:
                reply = self.say(form["From"], form.get("Body", ""), to=form.get("To") or BUSINESS,
                                 profile_name=form.get("ProfileName") or "Sandbox User",
                                 button_payload=form.get("ButtonPayload"), latitude=form.get("Latitude"),
                                 longitude=form.get("Longitude"), messaging_service_sid=service)
            except (KeyError, ValueError) as exc:
                return _error(400, 400, f"say needs a From and To that are numbers (and a loopback inbound URL): "
                                        f"{exc}")
            except requests.RequestException as exc:
                return _error(502, 502, f"the proxy at {self.inbound_url} did not answer ({type(exc).__name__})")
            replies = self.send_twiml(reply, canonical(form["From"]), normalise(form.get("To") or BUSINESS))
            return {"proxy_status": reply.status_code, "proxy_reply": reply.text,
                    "twiml_replies": [{"sid": m["sid"], "to": m["to"]} for m in replies]}

        @app.get("/sandbox")
        def sandbox_index():
            return {"account_sid": self.account_sid, "inbound_url": self.inbound_url,
                    "status_callback_url": self.status_callback_url,
                    "templates": [{"sid": sid, "name": c.get("name"), "types": list(c["types"]),
                                   "approval": c["approval"] or "unsubmitted"} for sid, c in self.contents.items()],
                    "windows": [{"sender": b, "user": u, "last_inbound_at": at.isoformat()}
                                for (b, u), at in self.windows.items()]}

        @app.errorhandler(HTTPException)
        def http_error(exc):  # Twilio answers every error in its JSON shape
            return _error(20000 + exc.code if exc.code == 404 else exc.code, exc.code, exc.description)

        return app


def _whatsapp_accepts_buttons(buttons: list[str]) -> bool:
    # What WhatsApp itself accepts in session without approval (Twilio's per-type pages, lenient reading).
    allowed = {"QUICK_REPLY", "URL", "VOICE_CALL", "VOICE_CALL_REQUEST"}
    return len(buttons) <= 3 and set(buttons) <= allowed and len(set(buttons)) <= 1 and buttons.count("URL") <= 1


_TWILIO_RESPONSE_HEADERS = {
    "Twilio-Concurrent-Requests": "1", "Twilio-Request-Duration": "0.042", "X-Home-Region": "us1",
    "X-API-Domain": "api.twilio.com", "X-Powered-By": "AT-5000", "X-Shenanigans": "none",
    "Strict-Transport-Security": "max-age=31536000", "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Headers": "Accept, Authorization, Content-Type, If-Match, If-Modified-Since, "
                                    "If-None-Match, If-Unmodified-Since, Idempotency-Key",
    "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS", "Access-Control-Expose-Headers": "ETag",
    "Access-Control-Allow-Credentials": "true",
}

_ERRORS = {
    63016: "Failed to send freeform message because you are outside the allowed window. If you are using WhatsApp, "
           "please use a Message Template.",
    63005: "Channel did not accept given content. Please see Channel specific error message for more information",
}


def _to_refusal(form, knows) -> Response | None:
    """Twilio's synchronous checks of To: present (21604) and, on WhatsApp, a phone number, a BSUID, or a user
    `knows(To)` says has written (Twilio sends to the address it posted a user's webhook from) (21211).

    Only WhatsApp addresses are checked: WhatsApp is what the simulator stands in for, and SMS numbers,
    which the proxy passes through unjudged, are left to real Twilio's own rules.
    """
    to = (form.get("To") or "").strip()
    if not to:
        return _error(21604, 400, "A 'To' phone number is required.")
    if channel_of(to) == "whatsapp":
        try:
            known = not is_shortened_bsuid(canonical(to))  # the proxy's key for a long BSUID is no one's address
        except InvalidAddress:
            known = knows(to)
        if not known:
            return _error(21211, 400, f"The 'To' number {to} is not a valid phone number.")
    return None


def _sender_refusal(form) -> Response | None:
    """Twilio's 21603: a create names its sender, in From or as a MessagingServiceSid."""
    if not (form.get("From") or "").strip() and not (form.get("MessagingServiceSid") or "").strip():
        return _error(21603, 400, "A 'From' phone number is required.")
    return None


def _content_variables_refusal(form) -> Response | None:
    """Twilio's synchronous checks of ContentVariables: a JSON object, no null or "" value, with a ContentSid."""
    raw = form.get("ContentVariables")
    if raw is None or not raw.strip():
        return None
    if not form.get("ContentSid"):
        return _error(21654, 400, "ContentSid Required")
    try:
        variables = json.loads(raw)
    except ValueError:
        variables = None
    if not isinstance(variables, dict) or any(value is None or value == "" for value in variables.values()):
        return _error(21656, 400, "The ContentVariables Parameter is invalid")
    return None


def _scheduling(form) -> bool:
    """Asked to schedule: a SendAt with ScheduleType=fixed, the pair Twilio's scheduling page requires. A SendAt
    alone schedules nothing here (the proxy's judge reads it the same way: proxy/judge.py schedulable)."""
    return bool(form.get("SendAt", "").strip()) and form.get("ScheduleType", "").strip() == "fixed"


def _schedule_refusal(form) -> Response | None:
    """Twilio schedules a message only through a Messaging Service (a SendAt without one is 35118), and only 5
    minutes to 35 days ahead (35115)."""
    if not _scheduling(form):
        return None
    raw = form.get("SendAt", "").strip()
    # "Pass the MessagingServiceSid in either the MessagingServiceSid parameter or the From parameter" (35118's page).
    if not form.get("MessagingServiceSid", "").strip() and not form.get("From", "").strip().startswith("MG"):
        return _error(35118, 400, "MessagingServiceSid is required to schedule a message")
    try:
        at = datetime.fromisoformat(raw.replace("Z", "+00:00"))
        # Without an offset: UTC, as the proxy's judge reads it (proxy/judge.py send_time).
        ahead = (at if at.tzinfo else at.replace(tzinfo=timezone.utc)) - datetime.now(timezone.utc)
    except (ValueError, OverflowError):
        ahead = None
    if ahead is None or not timedelta(minutes=5) <= ahead <= timedelta(days=35):
        return _error(35115, 400, "SendAt time must be between 5 minutes and 35 days in the future")
    return None


def _error(code: int, status: int, message: str) -> Response:
    body = {"code": code, "message": message, "more_info": f"https://www.twilio.com/docs/errors/{code}",
            "status": status}
    return Response(json.dumps(body), status=status, mimetype="application/json; charset=utf-8")
