"""The Messages endpoint through the Flask test client, forwarding to the fake Twilio on 127.0.0.1."""

import contextlib
import json
import threading
import time
from dataclasses import replace
from datetime import timedelta
from urllib.parse import parse_qsl, urlencode

import pytest
from sqlalchemy import select, update

from proxy import create_app
from proxy.attempts import flush_all
from proxy.db import send_attempts, utcnow, windows
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, BUSINESS, USER, basic_auth, inbound_params, signed_post

MESSAGES = f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"
SHAPE = {"code", "message", "more_info", "status"}


def send(client, fields, auth=None, path=MESSAGES):
    body = urlencode(fields, doseq=True) if not isinstance(fields, str) else fields
    return client.post(path, data=body, content_type="application/x-www-form-urlencoded",
                       headers=auth if auth is not None else basic_auth())


def open_window(client, user=USER, business=BUSINESS, sid="SM" + "0" * 32, **extra):
    assert signed_post(client, "/twilio/inbound", inbound_params(sid, user=user, business=business, **extra)).status_code == 200


def attempts(engine):
    assert flush_all()  # attempts are written by a background writer, within ~50 ms of the answer
    with engine.connect() as conn:
        return conn.execute(select(send_attempts).order_by(send_attempts.c.id)).mappings().all()


def test_outside_the_window_text_is_blocked_with_63016_and_nothing_sent(client, fake_twilio, db_engine):
    response = send(client, {"To": USER, "From": BUSINESS, "Body": "Hi there"})
    assert response.status_code == 400
    body = response.get_json()
    assert set(body) == SHAPE
    assert body["code"] == 63016 and body["status"] == 400
    assert body["more_info"] == "https://www.twilio.com/docs/errors/63016"
    assert body["message"].startswith("Failed to send freeform message because you are outside the allowed window.")
    assert "has not messaged" in body["message"]
    assert response.headers["X-Proxy-Decision"] == "blocked"
    assert fake_twilio.creates == []
    [attempt] = attempts(db_engine)
    assert (attempt["decision"], attempt["reason"], attempt["error_code"], attempt["outcome"]) == \
        ("blocked", "no_window", 63016, "blocked")
    assert json.loads(attempt["params"]) == [["To", USER], ["From", BUSINESS], ["Body", "Hi there"]]


def test_inside_the_window_the_send_is_forwarded_verbatim(client, fake_twilio, db_engine):
    open_window(client)
    fields = [("To", USER), ("From", BUSINESS), ("Body", "Your order shipped 📦"),
              ("MediaUrl", "https://example.com/a.png"), ("MediaUrl", "https://example.com/b.png"),
              ("StatusCallback", "https://app.example.com/status"), ("SomeFutureField", "kept")]
    raw = urlencode(fields)
    response = send(client, raw)
    assert response.status_code == 201
    assert response.headers["X-Proxy-Decision"] == "allowed"
    assert response.headers["Content-Type"].startswith("application/json")
    [received] = fake_twilio.creates
    assert received.body == raw.encode()
    assert received.form == fields
    assert received.path == MESSAGES
    assert received.headers["Authorization"] == basic_auth()["Authorization"]
    relayed = response.get_json()
    assert relayed == fake_twilio.messages[relayed["sid"]]
    [attempt] = attempts(db_engine)
    assert (attempt["decision"], attempt["reason"], attempt["outcome"], attempt["upstream_status"]) == \
        ("allowed", "window_open", "sent", 201)
    assert attempt["message_sid"] == relayed["sid"] and attempt["content_type"] == "twilio/media"


def test_a_send_is_logged_and_recorded_when_its_answer_has_been_written_not_before(client, fake_twilio, db_engine,
                                                                                   log_lines):
    """A WSGI server closes the response once it has written it (gunicorn also when the caller went away): the send's
    line and attempt row are made then, off the caller's wait. An unbuffered test client closes only when told."""
    open_window(client)
    response = client.post(MESSAGES, data=urlencode({"To": USER, "From": BUSINESS, "Body": "Hi"}),
                           content_type="application/x-www-form-urlencoded", headers=basic_auth(), buffered=False)
    assert response.status_code == 201 and response.headers["X-Proxy-Decision"] == "allowed"
    assert [line for line in log_lines() if line["event"] == "send"] == [] and attempts(db_engine) == []
    answered = utcnow()
    time.sleep(0.2)  # a slow write to the caller: the row still says when the send was over, not when it was recorded
    response.close()
    [line] = [line for line in log_lines() if line["event"] == "send"]
    assert (line["decision"], line["outcome"], line["message_sid"]) == ("allowed", "sent", response.get_json()["sid"])
    assert line["request_id"] == response.headers["X-Request-Id"]
    assert 0 < line["upstream_ms"] < line["duration_ms"]
    [attempt] = attempts(db_engine)
    assert attempt["message_sid"] == line["message_sid"] and attempt["request_id"] == line["request_id"]
    assert attempt["created_at"] <= answered  # late_failures takes created_at less duration_ms as the time of judging


def test_a_send_twilio_took_is_answered_as_twilio_answered_though_recording_it_failed(client, app, fake_twilio,
                                                                                      monkeypatch, log_lines):
    """Before the recording came after the answer, an error in it was the caller's 500 for a message Twilio had
    accepted, and a caller that retries a 500 sends it twice."""
    open_window(client)

    def broken(row):
        raise RuntimeError("attempt queue broken")

    monkeypatch.setattr(app.extensions["proxy"].attempts, "submit", broken)
    response = send(client, {"To": USER, "From": BUSINESS, "Body": "Hi"})
    assert response.status_code == 201 and response.get_json()["sid"] in fake_twilio.messages
    [line] = [line for line in log_lines() if line["event"] == "unhandled_error"]
    assert line["request_id"] == response.headers["X-Request-Id"] and "attempt queue broken" in line["exc_info"]


def overhead_counts(client) -> dict[str, float]:
    """proxy_send_overhead_seconds' count and sum by action, from /metrics."""
    text = client.get("/metrics", headers=basic_auth()).get_data(as_text=True)
    return {series: float(value) for series, value in (line.rsplit(" ", 1) for line in text.splitlines())
            if series.startswith(("proxy_send_overhead_seconds_count", "proxy_send_overhead_seconds_sum"))}


def test_what_the_proxy_adds_to_a_send_is_measured_apart_from_twilios_time(client, fake_twilio, log_lines):
    """Twilio answers in 300 ms here: the send line says so in upstream_ms, and the overhead histogram counts the
    proxy's own milliseconds, not Twilio's (and a blocked send's whole time, Twilio never asked)."""
    before = overhead_counts(client)
    assert send(client, {"To": USER, "From": BUSINESS, "Body": "Hi"}).status_code == 400
    open_window(client)
    fake_twilio.delay = 0.3  # reset by the fixture
    assert send(client, {"To": USER, "From": BUSINESS, "Body": "Hi"}).status_code == 201
    blocked, allowed = [line for line in log_lines() if line["event"] == "send"]
    assert blocked["upstream_ms"] is None and allowed["upstream_ms"] >= 300
    after = overhead_counts(client)

    def added(series):
        return after.get(series, 0) - before.get(series, 0)

    assert added('proxy_send_overhead_seconds_count{action="blocked"}') == 1
    assert added('proxy_send_overhead_seconds_count{action="allowed"}') == 1
    own = added('proxy_send_overhead_seconds_sum{action="allowed"}')
    assert 0 < own < 0.3 and abs(own - (allowed["duration_ms"] - allowed["upstream_ms"]) / 1000) < 1e-3


def test_expired_window_is_blocked_and_says_when_it_closed(client, fake_twilio, db_engine):
    open_window(client)
    with db_engine.begin() as conn:
        conn.execute(update(windows).values(expires_at=utcnow() - timedelta(hours=1)))
    response = send(client, {"To": USER, "From": BUSINESS, "MediaUrl": "https://example.com/a.png"})
    assert response.status_code == 400 and response.get_json()["code"] == 63016
    assert "closed at" in response.get_json()["message"]
    assert fake_twilio.creates == []
    assert attempts(db_engine)[0]["reason"] == "window_closed"


def test_safety_margin_closes_the_window_early(client, fake_twilio, db_engine):
    open_window(client)
    with db_engine.begin() as conn:  # 30 s left, less than the 60 s default margin
        conn.execute(update(windows).values(expires_at=utcnow() + timedelta(seconds=30)))
    response = send(client, {"To": USER, "From": BUSINESS, "Body": "x"})
    assert response.status_code == 400 and response.get_json()["code"] == 63016
    assert "window closes at" in response.get_json()["message"]  # not "closed": it is still open, for 30 s
    assert fake_twilio.creates == []


def test_window_is_per_sender_and_per_user(client, fake_twilio):
    open_window(client)
    other_user = send(client, {"To": "whatsapp:+14155550199", "From": BUSINESS, "Body": "x"})
    other_sender = send(client, {"To": USER, "From": "whatsapp:+14155550999", "Body": "x"})
    assert other_user.status_code == 400 and other_sender.status_code == 400
    assert send(client, {"To": "whatsapp:14155550111", "From": "WhatsApp:+1 415 555 0100", "Body": "x"}).status_code == 201


def test_messaging_service_sends_are_judged_by_the_service_window(client, fake_twilio):
    service = "MG" + "b" * 32
    assert send(client, {"To": USER, "MessagingServiceSid": service, "Body": "x"}).status_code == 400
    open_window(client, MessagingServiceSid=service)
    response = send(client, {"To": USER, "MessagingServiceSid": service, "Body": "x"})
    assert response.status_code == 201 and response.get_json()["status"] == "accepted"
    assert send(client, {"To": USER, "MessagingServiceSid": "MG" + "c" * 32, "Body": "x"}).status_code == 400


def test_a_messaging_service_sid_in_from_is_judged_by_the_service_window(client, fake_twilio):
    """Twilio takes a Messaging Service SID in From ("You can provide any of the above sender types in your From
    parameter", error 21603's page); the proxy refused it as an invalid phone number (21212)."""
    service = "MG" + "d" * 32
    blocked = send(client, {"To": USER, "From": service, "Body": "x"})
    assert blocked.status_code == 400 and blocked.get_json()["code"] == 63016
    open_window(client, MessagingServiceSid=service)
    response = send(client, {"To": USER, "From": service, "Body": "x"})
    assert response.status_code == 201 and response.headers["X-Proxy-Decision"] == "allowed"
    assert dict(fake_twilio.creates[-1].form)["From"] == service  # forwarded as it was sent
    assert send(client, {"To": USER, "From": "MG" + "e" * 32, "Body": "x"}).status_code == 400  # another service


def test_messenger_is_windowed_too(client, fake_twilio):
    assert send(client, {"To": "messenger:24680", "From": "messenger:13579", "Body": "x"}).status_code == 400
    open_window(client, user="messenger:24680", business="messenger:13579")
    assert send(client, {"To": "messenger:24680", "From": "messenger:13579", "Body": "x"}).status_code == 201


@pytest.mark.parametrize("to", ["+14155550111", "rcs:brand_user"])
def test_other_channels_pass_through_unchecked(client, fake_twilio, db_engine, to):
    response = send(client, {"To": to, "From": "+14155550100", "Body": "x"})
    assert response.status_code == 201
    assert response.headers["X-Proxy-Decision"] == "passthrough"
    assert len(fake_twilio.creates) == 1
    assert attempts(db_engine)[0]["reason"] == "channel_not_windowed"


@pytest.mark.parametrize(
    "auth",
    [{}, basic_auth(password="wrong"), basic_auth(user="AC" + "f" * 32), basic_auth(user="", password=AUTH_TOKEN),
     {"Authorization": "Bearer " + AUTH_TOKEN}, {"Authorization": "Basic !!notbase64"}],
    ids=["none", "wrong-password", "other-account", "empty-user", "bearer", "garbage"],
)
def test_unauthenticated_callers_get_20003_and_nothing_is_sent(client, fake_twilio, db_engine, auth):
    open_window(client)
    response = send(client, {"To": USER, "From": BUSINESS, "Body": "x"}, auth=auth)
    assert response.status_code == 401
    assert response.get_json() == {"code": 20003, "message": "Authenticate",
                                   "more_info": "https://www.twilio.com/docs/errors/20003", "status": 401}
    assert response.headers["X-Proxy-Decision"] == "rejected"
    assert fake_twilio.creates == [] and attempts(db_engine) == []


def test_another_account_in_the_path_is_404(client, fake_twilio):
    path = f"/2010-04-01/Accounts/AC{'e' * 32}/Messages.json"
    response = send(client, {"To": USER, "From": BUSINESS, "Body": "x"}, path=path)
    assert response.status_code == 404
    assert response.get_json()["code"] == 20404 and set(response.get_json()) == SHAPE
    assert response.headers["X-Proxy-Decision"] == "rejected"
    assert fake_twilio.requests == []


def test_database_unavailable_is_503_rejected_and_nothing_sent(settings, fake_twilio, tmp_path, log_lines):
    """SQLite that cannot be opened (the path is a directory) stands in for a database that is down."""
    (tmp_path / "not-a-file").mkdir()
    app = create_app(replace(settings, database_url=f"sqlite:///{tmp_path / 'not-a-file'}"))
    response = send(app.test_client(), {"To": USER, "From": BUSINESS, "Body": "x"})
    app.extensions["proxy"].engine.dispose()
    assert response.status_code == 503 and set(response.get_json()) == SHAPE
    assert response.headers["X-Proxy-Decision"] == "rejected"  # nothing was judged, nothing sent
    assert fake_twilio.requests == []
    [line] = [line for line in log_lines() if line["event"] == "database_unavailable" and line.get("path")]
    assert line["path"] == MESSAGES and line["level"] == "ERROR"


@contextlib.contextmanager
def windows_locked(db_engine, release_after: float | None = None):
    """PostgreSQL: another session holds an ACCESS EXCLUSIVE lock on `windows` until the block ends (or for
    `release_after` seconds); yields the event that releases it and the thread holding it."""
    from sqlalchemy import text

    locked, release = threading.Event(), threading.Event()

    def hold_lock():
        with db_engine.begin() as conn:
            conn.execute(text("LOCK TABLE windows IN ACCESS EXCLUSIVE MODE"))
            locked.set()
            release.wait(30)

    holder = threading.Thread(target=hold_lock)
    holder.start()
    try:
        assert locked.wait(10)
        if release_after is not None:
            threading.Timer(release_after, release.set).start()
        yield release, holder
    finally:
        release.set()
        holder.join(10)


def test_a_stalled_database_refuses_the_send_rather_than_forwarding_it_late(app, client, fake_twilio, db_engine,
                                                                           log_lines, monkeypatch):
    """A window read held up (a lock; a database host that stopped answering mid-query) answered after 39 s and
    the send then went to Twilio, after a caller that gave up could have sent it again: twice to the customer."""
    import time

    from proxy import judge, store

    open_window(client)
    monkeypatch.setattr(judge, "SLOW_DATABASE_SECONDS", 1)
    postgresql = db_engine.dialect.name == "postgresql"
    if not postgresql:  # SQLite's readers never wait for a writer (WAL): the read is slowed instead
        real = store.load_window
        monkeypatch.setattr(store, "load_window", lambda *a: (time.sleep(1.5), real(*a))[1])
    # PostgreSQL: the real thing, a lock another session holds
    with windows_locked(db_engine, release_after=1.5) if postgresql else contextlib.nullcontext():
        response = send(client, {"To": USER, "From": BUSINESS, "Body": "x"})
    assert response.status_code == 503 and set(response.get_json()) == SHAPE, response.get_json()
    assert "nothing was sent" in response.get_json()["message"]
    assert fake_twilio.creates == []
    [line] = [line for line in log_lines() if line["event"] == "database_slow"]
    assert line["level"] == "ERROR" and line["waited_seconds"] >= 1 and line["request_id"]
    monkeypatch.undo()
    assert send(client, {"To": USER, "From": BUSINESS, "Body": "x"}).status_code == 201  # the retry goes


@pytest.mark.parametrize(
    "fields, code",
    [
        ({"From": BUSINESS, "Body": "x"}, 21604),
        ({"To": USER, "Body": "x"}, 21603),
        ({"To": USER, "From": BUSINESS}, 21619),
        ({"To": USER, "From": BUSINESS, "Body": ""}, 21619),
        ({"To": "whatsapp:not-a-number", "From": BUSINESS, "Body": "x"}, 21211),
        ({"To": USER, "From": "whatsapp:???", "Body": "x"}, 21212),
        ({"To": USER, "From": "+14155550100", "Body": "x"}, 21910),
        ({"To": USER, "From": BUSINESS, "ContentSid": "HX" + "a" * 32, "ContentVariables": '{"1": ""}'}, 21656),
    ],
)
def test_form_validation_like_twilio(client, fake_twilio, fields, code):
    response = send(client, fields)
    assert response.status_code == 400
    body = response.get_json()
    assert set(body) == SHAPE and body["code"] == code and body["status"] == 400
    assert response.headers["X-Proxy-Decision"] == "rejected"
    assert fake_twilio.requests == []


@pytest.mark.parametrize("fields", [{"To": "+14155550111", "From": "+14155550100"},
                                    {"To": "+14155550111", "From": "+14155550100", "Body": "x" * 1601},
                                    {"To": "+14155550111", "MessagingServiceSid": "MG" + "0" * 32, "Body": "x"}])
def test_sms_is_left_to_twilio_to_validate(client, fake_twilio, fields):
    """SMS passes through unchanged: the proxy answers none of its own validation codes for it."""
    response = send(client, fields)
    assert response.headers["X-Proxy-Decision"] == "passthrough"
    [create] = fake_twilio.creates
    assert dict(create.form) == fields


def test_twilio_errors_are_relayed_unchanged(client, fake_twilio, db_engine):
    open_window(client)
    error = {"code": 21610, "message": "Attempt to send to unsubscribed recipient",
             "more_info": "https://www.twilio.com/docs/errors/21610", "status": 400}
    fake_twilio.fail_with = (400, error)
    response = send(client, {"To": USER, "From": BUSINESS, "Body": "x"})
    assert response.status_code == 400 and response.get_json() == error
    assert response.headers["X-Proxy-Decision"] == "allowed"
    [attempt] = attempts(db_engine)
    assert (attempt["outcome"], attempt["upstream_status"]) == ("upstream_error", 400)


def test_upstream_timeout_is_504_and_the_attempt_is_stored(client, fake_twilio, db_engine):
    open_window(client)
    fake_twilio.delay = 3.0  # longer than the 2 s timeout the test settings use
    response = send(client, {"To": USER, "From": BUSINESS, "Body": "x"})
    assert response.status_code == 504
    assert set(response.get_json()) == SHAPE
    assert attempts(db_engine)[0]["outcome"] == "upstream_timeout"
    assert len(fake_twilio.creates) == 1  # never retried: a create is not idempotent


def test_upstream_unreachable_is_502(settings, db_engine):
    import socket
    from dataclasses import replace

    from proxy import create_app
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(replace(settings, twilio_api_base_url=f"http://127.0.0.1:{port}"))
    client = app.test_client()
    response = send(client, {"To": "+14155550111", "From": "+14155550100", "Body": "x"})
    assert response.status_code == 502 and set(response.get_json()) == SHAPE
    assert attempts(db_engine)[0]["outcome"] == "upstream_unreachable"
    app.extensions["proxy"].engine.dispose()


def test_a_connection_cut_after_the_request_is_502_may_have_been_sent_and_not_retried(settings, db_engine):
    """Twilio read the create and the connection broke before its answer: the caller must not be told
    that nothing was sent, and the create is not tried again (it may have been accepted)."""
    import socket
    import threading
    from dataclasses import replace

    from proxy import create_app
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    requests_seen = []

    def read_then_hang_up():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            requests_seen.append(conn.recv(65536))
            conn.close()

    threading.Thread(target=read_then_hang_up, daemon=True).start()
    app = create_app(replace(settings, twilio_api_base_url=f"http://127.0.0.1:{server.getsockname()[1]}"))
    try:
        response = send(app.test_client(), {"To": "+14155550111", "From": "+14155550100", "Body": "x"})
        assert response.status_code == 502 and set(response.get_json()) == SHAPE
        assert "may or may not have been accepted" in response.get_json()["message"]
        assert attempts(db_engine)[0]["outcome"] == "upstream_broken"
        assert len(requests_seen) == 1 and requests_seen[0].startswith(b"POST ")
        # A read cut off the same way changed nothing: it is not told a message may have been accepted.
        read = app.test_client().get(f"{MESSAGES}?PageSize=1", headers=basic_auth())
        assert read.status_code == 502 and read.get_json()["message"].endswith("; nothing was changed.")
    finally:
        server.close()
        app.extensions["proxy"].engine.dispose()


@pytest.mark.parametrize("method", ["PUT", "PATCH"])
def test_put_or_patch_is_refused_twilio_shaped_and_never_reaches_twilio(client, fake_twilio, method):
    """Twilio's 2010 API once took PUT like POST for a create ("Creating or updating a resource involves
    performing an HTTP PUT or HTTP POST"): a PUT to Messages.json must not go out unjudged. twilio-python
    uses only GET, POST and DELETE, so nothing is lost by refusing both everywhere."""
    body = urlencode({"To": USER, "From": BUSINESS, "Body": "outside the window"})
    for path in (MESSAGES, f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/SM{'1' * 32}.json"):
        response = client.open(path, method=method, data=body, content_type="application/x-www-form-urlencoded",
                               headers=basic_auth())
        assert response.status_code == 405 and set(response.get_json()) == SHAPE
        assert response.headers["X-Proxy-Decision"] == "rejected" and "POST" in response.headers["Allow"]
    assert fake_twilio.requests == []


@pytest.mark.parametrize("method", ["PUT", "PATCH", "OPTIONS", "TRACE"])
def test_a_method_twilio_python_never_uses_asks_for_credentials_first(client, fake_twilio, method):
    """Refused by routing, PUT, PATCH and TRACE were answered 405 before any credentials were checked, and
    OPTIONS with Flask's empty 200; none with the X-Proxy-Decision every Messages API answer carries."""
    for path in (MESSAGES, f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/SM{'1' * 32}.json"):
        response = client.open(path, method=method)
        assert response.status_code == 401 and response.get_json()["code"] == 20003
        assert response.headers["X-Proxy-Decision"] == "rejected"
        response = client.open(path, method=method, headers=basic_auth())
        assert response.status_code == 405 and set(response.get_json()) == SHAPE
        assert response.headers["X-Proxy-Decision"] == "rejected"
    assert fake_twilio.requests == []


def test_a_passthrough_query_reaches_twilio_as_sent(client, fake_twilio):
    """One stray '%' made urllib3 escape every '%' of the query (the To filter arrived as whatsapp%253A…),
    and a raw non-ASCII byte arrived as two characters."""
    client.get(f"{MESSAGES}?To=whatsapp%3A%2B14155550111&Body=100%", headers=basic_auth())
    # Raw UTF-8 bytes on the wire (WSGI hands them over as latin-1 text).
    client.get(MESSAGES, headers=basic_auth(), environ_overrides={"QUERY_STRING": "Body=caf\u00e9".encode().decode("latin-1")})
    first, second = fake_twilio.requests
    assert "To=whatsapp%3A%2B14155550111&Body=100%25" in first.query, first.query
    assert "Body=caf%C3%A9" in second.query, second.query


def test_a_bodiless_answer_is_relayed_without_an_invented_content_type(settings, db_engine):
    """Twilio answers a DELETE 204 with no Content-Type; werkzeug's default text/html is not Twilio's."""
    import socketserver
    import threading

    class NoContent(socketserver.BaseRequestHandler):
        def handle(self):
            data = b""
            while b"\r\n\r\n" not in data:
                data += self.request.recv(4096)
            self.request.sendall(b"HTTP/1.1 204 No Content\r\nTwilio-Request-Id: RQ1\r\nConnection: close\r\n\r\n")

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), NoContent)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    app = create_app(replace(settings, twilio_api_base_url=f"http://127.0.0.1:{server.server_address[1]}"))
    try:
        response = app.test_client().delete(f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/SM{'1' * 32}.json",
                                            headers=basic_auth())
        assert response.status_code == 204 and response.headers["Twilio-Request-Id"] == "RQ1"
        assert "Content-Type" not in response.headers, response.headers["Content-Type"]
    finally:
        server.shutdown()
        server.server_close()
        app.extensions["proxy"].engine.dispose()


def test_head_keeps_twilios_content_length(settings, db_engine):
    """A HEAD's answer has no body; its Content-Length is Twilio's, not werkzeug's 0. (Twilio stands in as a
    socket answering with a fixed length: the simulator's list changes between two calls.)"""
    import socketserver
    import threading

    class Head(socketserver.BaseRequestHandler):
        def handle(self):
            data = b""
            while b"\r\n\r\n" not in data:
                data += self.request.recv(4096)
            self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1234\r\n"
                                 b"Connection: close\r\n\r\n")

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Head)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    app = create_app(replace(settings, twilio_api_base_url=f"http://127.0.0.1:{server.server_address[1]}"))
    try:
        head = app.test_client().head(f"{MESSAGES}?PageSize=1", headers=basic_auth())
        assert head.status_code == 200 and head.data == b""
        assert head.headers["Content-Length"] == "1234" and head.headers["Content-Type"] == "application/json"
    finally:
        server.shutdown()
        server.server_close()
        app.extensions["proxy"].engine.dispose()


def test_other_api_calls_pass_through(client, fake_twilio):
    open_window(client)
    created = send(client, {"To": USER, "From": BUSINESS, "Body": "x"}).get_json()
    fetched = client.get(f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/{created['sid']}.json", headers=basic_auth())
    assert fetched.status_code == 200 and fetched.get_json() == created
    assert fetched.headers["X-Proxy-Decision"] == "passthrough"
    missing = client.get(f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/SM{'0' * 32}.json", headers=basic_auth())
    assert missing.status_code == 404 and missing.get_json()["code"] == 20404
    assert client.get(f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/{created['sid']}.json").status_code == 401


def test_unknown_paths_and_methods_get_twilio_shaped_errors(client):
    response = client.get("/nope")
    assert response.status_code == 404 and set(response.get_json()) == SHAPE
    response = client.get("/twilio/inbound")
    assert response.status_code == 405 and set(response.get_json()) == SHAPE


def test_query_string_is_forwarded_for_passthrough(client, fake_twilio):
    client.get(f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json?PageSize=5&To=%2B1415", headers=basic_auth())
    [received] = fake_twilio.requests
    assert dict(parse_qsl(received.query)) == {"PageSize": "5", "To": "+1415"}


def test_a_body_that_is_not_a_form_is_refused_even_without_a_content_length(client, fake_twilio, db_engine):
    """Chunked, a multipart body has no Content-Length: it must still be refused, never judged as an
    urlencoded form (whose fields could differ from the parts Twilio would read) and forwarded."""
    import io

    body = (b"To=sms:+15005550006&From=sms:+15005550001&Body=hi&x=\r\n--b\r\n"
            b'Content-Disposition: form-data; name="To"\r\n\r\n' + USER.encode() + b"\r\n--b\r\n"
            b'Content-Disposition: form-data; name="From"\r\n\r\n' + BUSINESS.encode() + b"\r\n--b--\r\n")
    response = client.post(MESSAGES, input_stream=io.BytesIO(body),
                           headers={**basic_auth(), "Content-Type": "multipart/form-data; boundary=b",
                                    "Transfer-Encoding": "chunked"},
                           environ_overrides={"wsgi.input_terminated": True})  # as gunicorn serves chunked bodies
    assert response.status_code == 400 and set(response.get_json()) == SHAPE
    assert "x-www-form-urlencoded" in response.get_json()["message"]
    assert fake_twilio.requests == []


@pytest.mark.parametrize("extra, status", [(0, 201), (1, 413)])
def test_a_chunked_create_over_the_size_limit_is_413_never_cut_and_sent(app, client, fake_twilio, extra, status):
    """Without a Content-Length werkzeug stops reading at MAX_CONTENT_LENGTH; the rest of the fields must
    not be silently dropped from what is judged and forwarded."""
    import io

    open_window(client)
    fields = [("To", USER), ("From", BUSINESS), ("Body", "hi"), ("Pad", "")]
    tail = "&StatusCallback=https%3A%2F%2Fapp.example.com%2Fstatus"
    pad = app.config["MAX_CONTENT_LENGTH"] - len(urlencode(fields) + tail) + extra
    body = (urlencode(fields) + "p" * pad + tail).encode()
    assert len(body) == app.config["MAX_CONTENT_LENGTH"] + extra
    response = client.post(MESSAGES, input_stream=io.BytesIO(body),
                           headers={**basic_auth(), "Content-Type": "application/x-www-form-urlencoded",
                                    "Transfer-Encoding": "chunked"},
                           environ_overrides={"wsgi.input_terminated": True})  # as gunicorn serves chunked bodies
    assert response.status_code == status
    if status == 413:
        assert set(response.get_json()) == SHAPE and fake_twilio.creates == []
    else:
        [create] = fake_twilio.creates
        assert create.body == body
