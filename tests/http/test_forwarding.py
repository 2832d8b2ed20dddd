"""Webhook middleware: forwarding to the app, the durable outbox and its worker, late 63016, hold and release."""

import base64
import gzip
import json
import socket
import sys
import threading
import time
from dataclasses import replace
from datetime import timedelta
from urllib.parse import parse_qsl

import pytest
from sqlalchemy import func, select, text, update
from sqlalchemy.exc import OperationalError
from twilio.request_validator import RequestValidator

from proxy import create_app, holds, outbox as outbox_items, store as store_module, webhooks
from proxy.db import held_messages, late_failures, outbox, send_attempts, sticky_senders, utcnow, windows
from proxy.forwarding import Forwarder
from proxy.policy import Policy
from proxy.policy_file import Fallback
from proxy.worker import Worker
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, BUSINESS, USER, basic_auth, inbound_params, sign, signed_post
from tests.http.conftest import SCHEDULE
from tests.http.test_gateway import MESSAGES, attempts, send

LEASE_SECONDS = 120


def items(engine):
    with engine.connect() as conn:
        return conn.execute(select(outbox).order_by(outbox.c.id)).mappings().all()


def run_worker(app, now=None):
    return Worker(app.extensions["proxy"]).run_once(now)


def test_inbound_is_forwarded_signed_and_the_apps_twiml_relayed(forwarding, fake_app, db_engine):
    client = forwarding.test_client()
    params = inbound_params("SM" + "1" * 32, Body="where is my order?")
    response = client.post("/twilio/inbound", data=params, headers={
        "X-Twilio-Signature": sign("http://localhost/twilio/inbound", params),
        "I-Twilio-Idempotency-Token": "idem-1"})
    assert response.status_code == 200
    assert response.get_data(as_text=True) == fake_app.reply and response.mimetype == "text/xml"
    [(path, form, headers)] = fake_app.received
    assert path == "/app/inbound" and form == list(params.items()) and fake_app.rejected == 0
    assert headers["I-Twilio-Idempotency-Token"] == "idem-1"
    assert headers["X-Proxy-Window-Expires-At"].endswith("Z")
    assert [i["status"] for i in items(db_engine)] == ["delivered"]


@pytest.mark.parametrize("trouble", ["down", "slow", "5xx"])
def test_app_trouble_answers_empty_twiml_and_the_outbox_retries(forwarding, fake_app, db_engine, trouble):
    if trouble == "down":
        fake_app.fail_status = 503
    elif trouble == "slow":
        fake_app.delay = 1.5  # more than FORWARD_TIMEOUT_SECONDS
    else:
        fake_app.fail_status = 500
    client = forwarding.test_client()
    response = signed_post(client, "/twilio/inbound", inbound_params("SM" + "2" * 32))
    assert response.status_code == 200 and response.get_data(as_text=True).endswith("<Response />")
    [item] = items(db_engine)
    assert (item["status"], item["attempts"]) == ("pending", 1) and item["last_error"]
    failed_at = item["updated_at"]
    assert item["next_attempt_at"] - failed_at == timedelta(seconds=SCHEDULE[1])
    fake_app.reset()
    assert run_worker(forwarding, failed_at + timedelta(seconds=SCHEDULE[1] - 1)) == 0  # not due yet
    assert run_worker(forwarding, utcnow() + timedelta(seconds=SCHEDULE[1] + 1)) == 1
    received = [p for p, _, _ in fake_app.received]
    if trouble == "slow":  # the slow app also gets the first copy, after the proxy stopped waiting
        deadline = time.monotonic() + 5
        while len(fake_app.received) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        received = [p for p, _, _ in fake_app.received][:1]
    assert received == ["/app/inbound"]
    assert items(db_engine)[0]["status"] == "delivered"


def test_a_forward_still_waiting_for_a_thread_at_its_deadline_never_goes_out(fake_app):
    """Every forwarding thread busy: the post gives up at its deadline and must not reach the app
    afterwards, or the outbox's retry would be a second copy."""
    forwarder = Forwarder(AUTH_TOKEN, timeout=0.3, pool_size=1)
    free = threading.Event()
    busy = forwarder.pool.submit(free.wait, 10)  # the one thread is taken
    reply = forwarder.post(fake_app.url + "/app/inbound", [("MessageSid", "SM" + "c" * 32)], {})
    free.set()
    busy.result(timeout=10)
    forwarder.pool.submit(lambda: None).result(timeout=10)  # one thread, in order: whatever was queued has run
    assert fake_app.started == 0
    assert not reply.ok and reply.error.startswith("not sent")


def drip_server(first: bytes):
    """An app on 127.0.0.1 that sends `first`, then one byte of a header every 50 ms, each well within
    any read timeout, until the proxy hangs up. Returns its URL and the event set when it saw the hang-up."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    hung_up = threading.Event()

    def drip():
        conn, _ = listener.accept()
        listener.close()
        conn.recv(65536)
        try:
            conn.sendall(first)
            for _ in range(2000):  # 100 s at most
                conn.sendall(b"x")
                time.sleep(0.05)
        except OSError:  # reset, or a broken pipe: the proxy hung up
            hung_up.set()
        finally:
            conn.close()

    threading.Thread(target=drip, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}/app/inbound", hung_up


@pytest.mark.parametrize("phase", ["status line", "headers", "body"])
def test_an_app_dripping_its_answer_is_hung_up_on_at_the_deadline_and_frees_its_thread(fake_app, phase):
    """A socket timeout is per read: without a hang-up the one forwarding thread would stay with this app
    for as long as it dripped, and every later forward would find no thread free."""
    first = {"status line": b"HTTP/1.1 2",
             "headers": b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nX-Slow: ",
             "body": b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: 60000\r\n\r\n<Response>"}[phase]
    url, hung_up = drip_server(first)
    forwarder = Forwarder(AUTH_TOKEN, timeout=0.5, pool_size=1)
    reply = forwarder.post(url, [("MessageSid", "SM" + "d" * 32)], {})
    assert not reply.ok and reply.error == "no answer within 0.5s"
    assert hung_up.wait(10)
    after = forwarder.post(fake_app.url + "/app/inbound", [("MessageSid", "SM" + "e" * 32)], {})
    assert (after.ok, after.status, len(fake_app.received)) == (True, 200, 1)


def test_an_app_that_is_down_is_reported_unreachable_not_slow():
    """urllib3 files a refused connection under ConnectTimeoutError: it was logged as "no answer within 10s"."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, never listening: connections to it are refused
        reply = Forwarder(AUTH_TOKEN, timeout=10, pool_size=1).post(f"http://127.0.0.1:{port}/app/inbound",
                                                                    [("MessageSid", "SM" + "d" * 32)], {})
    assert not reply.ok and reply.status is None and not reply.final
    assert reply.error == "unreachable (could not connect: Connection refused)"


def test_a_hang_up_never_cuts_the_post_that_took_the_connection_over(monkeypatch):
    """urllib3 puts a connection back in the pool as soon as an answer is read to its end, inside the read:
    a post whose thread then missed its deadline must not shut down the connection another post now uses."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from proxy import forwarding

    received = []

    class KeepAlive(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # the connection is kept and reused

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, self.client_address[1]))
            time.sleep(0.9 if self.path == "/one" else 0.4)
            body = b"<Response/>"
            self.send_response(200)
            self.send_header("Content-Type", "text/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), KeepAlive)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    forwarder = Forwarder(AUTH_TOKEN, timeout=1.0, pool_size=4)
    read, content_type = threading.Event(), forwarding._content_type

    def held_up_after_reading(response):  # the first post's thread, descheduled past its deadline
        if not read.is_set():
            read.set()
            time.sleep(0.5)
        return content_type(response)

    monkeypatch.setattr(forwarding, "_content_type", held_up_after_reading)
    first = {}
    thread = threading.Thread(target=lambda: first.update(reply=forwarder.post(base + "/one", [("a", "1")], {})))
    thread.start()
    assert read.wait(5)
    second = forwarder.post(base + "/two", [("a", "2")], {})
    thread.join(10)
    server.shutdown()
    assert first["reply"].error == "no answer within 1s"
    assert [path for path, _ in received] == ["/one", "/two"] and received[0][1] == received[1][1]  # one connection
    assert (second.ok, second.status) == (True, 200)


def test_a_post_past_its_deadline_before_its_request_was_written_never_goes_out(fake_app):
    """The hang-up came while the thread was still preparing the post: nothing is sent afterwards."""
    from proxy import forwarding

    forwarder = Forwarder(AUTH_TOKEN, timeout=5, pool_size=1)
    line = forwarding._Line()
    line.hang_up()
    reply = forwarder._post(fake_app.url + "/app/inbound", [("MessageSid", "SM" + "f" * 31 + "1")], {},
                            time.monotonic() + 5, line, 5)
    assert not reply.ok and reply.error.startswith("unreachable")
    assert fake_app.started == 0
    again = forwarder.post(fake_app.url + "/app/inbound", [("MessageSid", "SM" + "f" * 31 + "2")], {})
    assert again.ok and fake_app.started == 1


def test_the_proxys_own_headers_in_a_webhook_never_reach_the_app(forwarding, fake_app, db_engine):
    """The signature does not cover headers: a replayed callback carrying X-Proxy-Window-Expires-At (or an
    outbox id) must not hand the app that value under the proxy's valid signature."""
    client = forwarding.test_client()
    forged = {"X-Proxy-Window-Expires-At": "2099-01-01T00:00:00Z", "X-Proxy-Outbox-Id": "999999",
              "I-Twilio-Idempotency-Token": "idem-9"}
    params = {"MessageSid": "SM" + "5" * 31 + "b", "MessageStatus": "delivered", "From": BUSINESS, "To": USER}
    client.post("/twilio/status", data=params, headers={
        **forged, "X-Twilio-Signature": sign("http://localhost/twilio/status", params)})
    run_worker(forwarding)
    [(_, _, headers)] = fake_app.received
    [item] = items(db_engine)
    assert "X-Proxy-Window-Expires-At" not in headers
    assert headers["X-Proxy-Outbox-Id"] == str(item["id"]) and headers["I-Twilio-Idempotency-Token"] == "idem-9"
    fake_app.reset()
    params = inbound_params("SM" + "5" * 31 + "c")
    client.post("/twilio/inbound", data=params, headers={
        **forged, "X-Twilio-Signature": sign("http://localhost/twilio/inbound", params)})
    [(_, _, headers)] = fake_app.received
    assert headers["X-Proxy-Window-Expires-At"].startswith(str(utcnow().year))  # the window's own
    assert headers["X-Proxy-Outbox-Id"] == str(items(db_engine)[-1]["id"])


@pytest.mark.parametrize("sms", [{"To": "12345", "From": "+14155550111"}, {"To": "+14155550100", "From": "89898"}])
def test_an_sms_to_or_from_a_short_code_is_stored_and_forwarded(forwarding, fake_app, db_engine, sms):
    """No E.164 number, but a message on a channel without windows: refusing it lost it (Twilio does not
    send a webhook it had a 4xx for again). A WhatsApp address that is no number is still refused."""
    client = forwarding.test_client()
    params = inbound_params("SM" + "5" * 31 + "d", **sms)
    del params["WaId"], params["ProfileName"]
    response = signed_post(client, "/twilio/inbound", params)
    assert response.status_code == 200 and response.get_data(as_text=True) == fake_app.reply
    [(_, form, _)] = fake_app.received
    assert dict(form)["To"] == sms["To"] and dict(form)["From"] == sms["From"]
    refused = signed_post(client, "/twilio/inbound", inbound_params("SM" + "5" * 31 + "e", To="whatsapp:12345"))
    assert refused.status_code == 400 and refused.get_json()["code"] == 21211
    assert len(fake_app.received) == 1 and [i["status"] for i in items(db_engine)] == ["delivered"]


def test_credentials_in_the_forward_url_reach_the_app_as_basic_auth(fake_app):
    """user:password@ in FORWARD_INBOUND_URL, as Twilio takes them in a webhook URL: an app behind Basic
    auth gets an Authorization header (%-escapes decoded), and the credentials are not sent in the URL."""
    host = fake_app.url.removeprefix("http://")
    forwarder = Forwarder(AUTH_TOKEN, timeout=5)
    reply = forwarder.post(f"http://app%40user:p%3Ass@{host}/app/inbound", [("MessageSid", "SM" + "f" * 32)], {})
    # Signed for the URL the app sees, as Twilio signs one with credentials: its RequestValidator accepts it.
    assert (reply.status, fake_app.rejected, len(fake_app.received)) == (200, 0, 1)
    assert fake_app.last_headers["Authorization"] == "Basic " + base64.b64encode(b"app@user:p:ss").decode()
    assert fake_app.last_headers["Host"] == host
    forwarder.post(f"{fake_app.url}/app/inbound", [("MessageSid", "SM" + "e" * 32)], {})
    assert "Authorization" not in fake_app.last_headers


def wire_server(answers: int):
    """A raw HTTP/1.1 server on 127.0.0.1 that records each request line, headers and body exactly as sent."""
    listener = socket.create_server(("127.0.0.1", 0))
    seen = []

    def serve():
        with listener:
            for _ in range(answers):
                conn, _ = listener.accept()
                with conn:
                    data = b""
                    while b"\r\n\r\n" not in data:
                        data += conn.recv(65536)
                    head, _, body = data.partition(b"\r\n\r\n")
                    lines = head.decode("latin-1").split("\r\n")
                    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
                    while len(body) < int(headers.get("content-length", 0)):
                        body += conn.recv(65536)
                    seen.append((lines[0], headers, body.decode()))
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: 10\r\n"
                                 b"Connection: close\r\n\r\n<Response/")

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1], seen


WRITTEN_FORWARD_URLS = ["http://LOCALHOST:{port}/App/inbound", "http://127.0.0.1:{port}/app/inbound?next=%2fpath",
                        "http://127.0.0.1:{port}/app/in%7ebound", "http://127.0.0.1:{port}/app/./x/../inbound",
                        "http://127.0.0.1:{port}/app/é", "http://127.0.0.1:{port}/app/inbound?a=b c",
                        "http://127.0.0.1:{port}/app/inbound#rp=5xx",
                        "http://user:pw@LOCALHOST:{port}/app/./in%7ebound?next=%2fpath",
                        "http://127.0.0.1:{port}", "http://127.0.0.1:{port}?next=x"]


def test_a_forward_is_signed_for_the_url_it_is_sent_to_however_that_was_written():
    """urllib3 sends its own reading of a URL (host lower-cased, escapes upper-cased, `./` gone, non-ASCII
    encoded, no fragment): signed as written, the app's RequestValidator, checking the URL it was requested
    at as Twilio's guide says, refused every webhook (the credentials' case alone was signed as sent)."""
    port, seen = wire_server(len(WRITTEN_FORWARD_URLS))
    forwarder = Forwarder(AUTH_TOKEN, timeout=5)
    pairs = [("MessageSid", "SM" + "f" * 32), ("Body", "hi there")]
    for written in WRITTEN_FORWARD_URLS:
        assert forwarder.post(written.format(port=port), pairs, {}).status == 200
    validator = RequestValidator(AUTH_TOKEN)
    for written, (request_line, headers, body) in zip(WRITTEN_FORWARD_URLS, seen):
        target = request_line.split(" ")[1]
        assert "#" not in target and headers["host"] == headers["host"].lower()
        url = f"http://{headers['host']}{target}"
        assert validator.validate(url, dict(parse_qsl(body)), headers["x-twilio-signature"]), (written, url)


def test_an_answer_the_app_compressed_is_relayed_decoded(forwarding, fake_app):
    fake_app.reply = gzip.compress(fake_app.reply.encode())
    fake_app.headers = [("Content-Encoding", "gzip")]
    response = signed_post(forwarding.test_client(), "/twilio/inbound", inbound_params("SM" + "d" * 31 + "e"))
    assert fake_app.last_headers["Accept-Encoding"] == "gzip, deflate"
    assert response.get_data(as_text=True).endswith("<Response><Message>Thanks!</Message></Response>")
    assert "Content-Encoding" not in response.headers


def test_a_write_run_twice_stores_no_outbox_id_from_its_first_run(db_engine):
    """A request's write may run twice (a batch rerun, proxy/group_commit.py); the headers it passes to
    enqueue carry the first run's item id by then, and that id is not the second item's."""
    headers = {"User-Agent": "TwilioProxy/1.1"}
    with db_engine.begin() as conn:
        first = outbox_items.enqueue(conn, kind="inbound", ordering_key="k", target="http://127.0.0.1:9/app", headers=headers,
                               body=[], now=utcnow())
        second = outbox_items.enqueue(conn, kind="inbound", ordering_key="k", target="http://127.0.0.1:9/app",
                                headers=headers, body=[], now=utcnow())
    stored = {item["id"]: json.loads(item["headers"]) for item in items(db_engine)}
    assert stored == {first: {"User-Agent": "TwilioProxy/1.1"}, second: {"User-Agent": "TwilioProxy/1.1"}}
    assert headers["X-Proxy-Outbox-Id"] == str(second)  # the inline attempt's copy carries its own id


def test_a_forwarded_webhooks_batch_order_puts_the_conversations_delivery_first_and_keeps_its_callbacks_order(
        forwarding, fake_app, monkeypatch):
    """A batch runs sorted by its writes' order keys: a forward's `delivered` ahead of its conversation's next
    webhook (whose turn check would otherwise see the first still pending, and wait), and a conversation's
    forwarded status callbacks in the order they came (their outbox items are delivered in id order)."""
    seen = []
    write = webhooks._write_alone
    monkeypatch.setattr(webhooks, "_write_alone",
                        lambda rt, work, order, **kw: seen.append(order) or write(rt, work, order, **kw))
    client = forwarding.test_client()
    signed_post(client, "/twilio/inbound", inbound_params("SM" + "4" * 32))
    inbound, delivered = seen
    assert delivered < inbound
    seen.clear()
    # A number in a Messaging Service: every inbound carries its SID, and sorts first (its window row is taken
    # first); the delivery of one must still sort ahead of the next.
    signed_post(client, "/twilio/inbound", {**inbound_params("SM" + "4" * 31 + "1"), "MessagingServiceSid": "MG" + "2" * 32})
    inbound, delivered = seen
    assert delivered < inbound
    seen.clear()
    for sid in ("SM" + "f" * 32, "SM" + "0" * 32):  # the later one is the first by its sid
        signed_post(client, "/twilio/status", {"MessageSid": sid, "MessageStatus": "delivered", "From": BUSINESS,
                                               "To": USER})
    assert len(seen) == 2 and sorted(seen) == seen


def test_a_lease_the_batch_ate_into_is_renewed_before_the_attempt(forwarding, fake_app, db_engine, monkeypatch):
    """The inline attempt's lease is taken when its webhook is stored; if the rest of the batch and its commit
    took long (a held row), it is renewed before the post, or a worker could deliver a second copy alongside."""
    write = webhooks._write_alone

    def slow_batch(rt, work, order, **kw):
        result = write(rt, work, order, **kw)
        if kw.get("several"):
            time.sleep(1.5)
        return result

    monkeypatch.setattr(webhooks, "_write_alone", slow_batch)
    fake_app.delay = 0.3
    lease, stored_at = lease_at_the_app(forwarding, fake_app, db_engine, "SM" + "5" * 32)
    assert lease - stored_at >= timedelta(seconds=inline_lease_seconds(forwarding) + 1.2)


def lease_at_the_app(forwarding, fake_app, db_engine, sid):
    """Post an inbound webhook: its outbox item's lease while the app has it, and when the item was stored."""
    n, leases, deadline = fake_app.started + 1, {}, time.monotonic() + 10

    def watch():
        while fake_app.started < n and time.monotonic() < deadline:
            time.sleep(0.01)
        leases["during"] = items(db_engine)[n - 1]["lease_until"]

    watcher = threading.Thread(target=watch)
    watcher.start()
    signed_post(forwarding.test_client(), "/twilio/inbound", inbound_params(sid))
    watcher.join(10)
    return leases["during"], items(db_engine)[n - 1]["created_at"]


def inline_lease_seconds(app) -> float:
    from proxy.settings import LEASE_MARGIN_SECONDS
    return app.extensions["proxy"].settings.forward_timeout_seconds + LEASE_MARGIN_SECONDS


def test_every_copy_of_a_forward_carries_its_outbox_id(forwarding, fake_app, db_engine):
    """A post the app answers too late was still received: the worker's retry is a second copy, and the
    app tells them apart from new webhooks by X-Proxy-Outbox-Id."""
    fake_app.delay = 1.5  # more than FORWARD_TIMEOUT_SECONDS, after the post went out
    signed_post(forwarding.test_client(), "/twilio/inbound",
                inbound_params("SM" + "d" * 32))
    [item] = items(db_engine)
    assert item["status"] == "pending"
    deadline = time.monotonic() + 10
    while not fake_app.received and time.monotonic() < deadline:
        time.sleep(0.05)
    fake_app.delay = 0
    assert run_worker(forwarding, utcnow() + timedelta(seconds=6)) == 1
    copies = [(dict(form)["MessageSid"], headers.get("X-Proxy-Outbox-Id")) for _, form, headers in fake_app.received]
    assert copies == [("SM" + "d" * 32, str(item["id"]))] * 2
    status = {"MessageSid": "SM" + "e" * 32, "MessageStatus": "read", "From": BUSINESS, "To": USER}
    signed_post(forwarding.test_client(), "/twilio/status", status)
    assert run_worker(forwarding) == 1
    assert fake_app.received[-1][2]["X-Proxy-Outbox-Id"] == str(items(db_engine)[-1]["id"])


@pytest.mark.parametrize("twiml, warned", [
    ('<Response><Message>Thanks!</Message></Response>', None),  # a reply to the user: the window just opened
    (f'<Response><Message to="{USER}">Thanks!</Message></Response>', None),
    ('<Response><Message to="whatsapp:+14155550999">free-form</Message></Response>', "message_to_another_user"),
    ("<Response><Message to='+14155550111'>by SMS</Message></Response>", "message_to_another_user"),
    ('<Response><Redirect>https://app.example/next</Redirect></Response>', "redirect"),
    # Review (session 17): a reply from another sender, whose window this message did not open; a `>` in an
    # earlier attribute's value (legal XML) hid the `to` after it.
    ('<Response><Message from="whatsapp:+14155550999">free-form</Message></Response>', "message_from_another_sender"),
    ('<Response><Message action="https://app.example/cb?a=>" to="whatsapp:+14155550999">free-form</Message>'
     '</Response>', "message_to_another_user"),
    # The business's own sender, the user spelt with an XML character reference: the window this message opened.
    (f'<Response><Message from="{BUSINESS}" to="whatsapp:&#43;14155550111">Thanks!</Message></Response>', None),
    ("<Response><Message statusCallback='https://app.example/s?to=whatsapp:+14155550999'>Hi</Message></Response>",
     None),
    # Every reason, not the first found: the redirect hid the message to another user.
    ('<Response><Message to="whatsapp:+14155550999" from="whatsapp:+14155550998">x</Message>'
     '<Redirect>https://app.example/next</Redirect></Response>',
     "message_to_another_user,message_from_another_sender,redirect"),
])
def test_twiml_holding_a_send_the_proxy_did_not_judge_is_relayed_with_a_warning(forwarding, fake_app, log_lines,
                                                                                twiml, warned):
    """The app's answer is Twilio's to act on: a <Message> to another user, or a <Redirect> to more TwiML,
    can send outside a window without the gateway's judgement. Relayed (it is the app's answer), but said."""
    fake_app.reply = '<?xml version="1.0" encoding="UTF-8"?>' + twiml
    response = signed_post(forwarding.test_client(), "/twilio/inbound", inbound_params("SM" + "4" * 32))
    assert response.get_data(as_text=True) == fake_app.reply
    lines = [line for line in log_lines() if line["event"] == "twiml_not_judged"]
    assert [(line["level"], line["reason"]) for line in lines] == ([("WARNING", warned)] if warned else [])
    assert "free-form" not in json.dumps(log_lines())


@pytest.mark.parametrize("status", [400, 422])
def test_app_4xx_is_the_apps_answer_and_is_relayed(forwarding, fake_app, db_engine, log_lines, status):
    fake_app.fail_status = status
    response = signed_post(forwarding.test_client(), "/twilio/inbound", inbound_params("SM" + "3" * 32))
    assert response.status_code == status
    assert items(db_engine)[0]["status"] == "delivered"
    [line] = [line for line in log_lines() if line["event"] == "delivery"]
    assert (line["level"], line["decision"], line["app_status"]) == ("WARNING", "delivered", status)


def test_a_queued_webhook_goes_to_the_forward_url_configured_when_it_is_delivered(settings, db_engine, fake_app):
    """A typo in FORWARD_INBOUND_URL's path: the app answers 404 (its handler never saw the webhook), the
    webhook is kept, exhausted; the operator fixes the URL and replays, and the backlog goes to the new one.
    It went to the URL it was queued for, and a 404 counted as delivered: every webhook lost."""
    wrong = replace(settings, forward_inbound_url=fake_app.url + "/typo/inbound", forward_timeout_seconds=1.0,
                    retry_schedule=SCHEDULE)
    fake_app.fail_status = 404  # no such route in the app
    signed_post(create_app(wrong).test_client(), "/twilio/inbound", inbound_params("SM" + "a" * 31 + "1"))
    fake_app.fail_status = None
    [item] = items(db_engine)
    assert item["status"] == "exhausted" and "check the forward URL" in item["last_error"]
    fixed = create_app(replace(wrong, forward_inbound_url=fake_app.url + "/app/inbound"))  # redeployed, fixed
    result = fixed.test_cli_runner().invoke(args=["outbox", "replay", "--all"])
    assert result.exit_code == 0, result.output
    assert run_worker(fixed) == 1
    assert [path for path, _, _ in fake_app.received] == ["/app/inbound"] and fake_app.rejected == 0
    assert items(db_engine)[0]["status"] == "delivered"
    fixed.extensions["proxy"].engine.dispose()


@pytest.mark.parametrize("status", [401, 403, 404, 405])
def test_an_app_answering_404_or_403_is_not_counted_delivered_nor_retried_and_holds_back_nothing(
        forwarding, fake_app, db_engine, status):
    """A wrong URL, credentials or signature check answer these, but so may an app on purpose (an order it does
    not know, a blocked user). Retried, one such answer held back every later webhook of the conversation for
    the whole retry schedule; delivered, a wrong URL lost every webhook. Exhausted at once: kept for a replay."""
    client = forwarding.test_client()
    fake_app.fail_status = status
    first = signed_post(client, "/twilio/inbound", inbound_params("SM" + "1" * 32, Body="ORDER 999"))
    assert first.status_code == 200 and first.get_data(as_text=True).endswith("<Response />")
    fake_app.fail_status = None
    reply = signed_post(client, "/twilio/inbound", inbound_params("SM" + "2" * 32, Body="hi"))
    assert fake_app.bodies("/app/inbound") == ["hi"] and reply.get_data(as_text=True) == fake_app.reply
    assert [(i["status"], i["attempts"]) for i in items(db_engine)] == [("exhausted", 1), ("delivered", 1)]
    assert f"answered {status}" in items(db_engine)[0]["last_error"]
    # Status callbacks the same way, through the worker.
    fake_app.fail_status = status
    signed_post(client, "/twilio/status", {"MessageSid": "SM" + "a" * 32, "MessageStatus": "sent",
                                           "From": BUSINESS, "To": USER})
    assert run_worker(forwarding) == 1
    fake_app.fail_status = None
    signed_post(client, "/twilio/status", {"MessageSid": "SM" + "b" * 32, "MessageStatus": "delivered",
                                           "From": BUSINESS, "To": USER})
    assert run_worker(forwarding) == 1
    assert [dict(form)["MessageSid"] for path, form, _ in fake_app.received if path == "/app/status"] == ["SM" + "b" * 32]
    assert [i["status"] for i in items(db_engine)][2:] == ["exhausted", "delivered"]


@pytest.mark.parametrize("status", [301, 302, 307, 308, 408, 429])
def test_an_app_answering_a_redirect_did_not_take_the_webhook_and_the_outbox_retries(forwarding, fake_app,
                                                                                     db_engine, status):
    """Redirects are not followed (forward targets come from configuration only), so the app's handler never
    saw the webhook: the item was marked delivered (lost), and Twilio got a 3xx without its Location.
    408 and 429 are the app's "not now" (HTTP's retryable 4xx), not its answer: retried like a 5xx."""
    fake_app.fail_status = status
    response = signed_post(forwarding.test_client(), "/twilio/inbound", inbound_params("SM" + "3" * 31 + "a"))
    assert response.status_code == 200 and response.get_data(as_text=True).endswith("<Response />")
    [item] = items(db_engine)
    assert (item["status"], item["attempts"]) == ("pending", 1) and f"answered {status}" in item["last_error"]
    fake_app.reset()
    assert run_worker(forwarding, utcnow() + timedelta(seconds=SCHEDULE[1] + 1)) == 1
    assert items(db_engine)[0]["status"] == "delivered" and len(fake_app.received) == 1


def test_a_content_type_no_server_may_send_is_not_relayed_to_twilio(forwarding, fake_app):
    """The app's TwiML with a control character in its Content-Type: relayed as it was, gunicorn refused the
    header and Twilio got a bare 500 page. A second Content-Type was relayed joined to the first."""
    client = forwarding.test_client()
    fake_app.headers = [("Content-Type", "text/xml\x01")]
    response = signed_post(client, "/twilio/inbound", inbound_params("SM" + "3" * 31 + "b"))
    assert response.status_code == 200 and response.get_data(as_text=True) == fake_app.reply
    assert response.headers.getlist("Content-Type") == ["text/xml"]
    fake_app.headers = [("Content-Type", "text/xml; charset=utf-8"), ("Content-Type", "text/html")]
    response = signed_post(client, "/twilio/inbound", inbound_params("SM" + "3" * 31 + "c"))
    assert response.headers.getlist("Content-Type") == ["text/xml; charset=utf-8"]


HUGE = 64 * 1024 * 1024  # a broken app's answer: far more than Twilio takes, and than loopback buffers hold


@pytest.mark.parametrize("declare_length", [True, False], ids=["content-length", "chunked"])
def test_an_answer_longer_than_twilio_takes_is_not_relayed_nor_read_whole_nor_retried(forwarding, fake_app,
                                                                                      db_engine, log_lines,
                                                                                      declare_length):
    """The app's answer was read whole into memory, however long (a debug page, a runaway loop: a worker's
    memory) and relayed. Twilio refuses TwiML over 64 kB (11750), and a truncated one is worse than none: Twilio
    gets empty TwiML. The app did get the webhook: delivered, not sent again. The proxy hangs up mid-answer."""
    fake_app.huge_reply, fake_app.declare_length = HUGE, declare_length
    client = forwarding.test_client()
    response = signed_post(client, "/twilio/inbound", inbound_params("SM" + "3" * 31 + "e"))
    assert response.status_code == 200 and response.get_data(as_text=True).endswith("<Response />")
    assert response.mimetype == "text/xml"
    [item] = items(db_engine)
    assert (item["status"], item["attempts"]) == ("delivered", 1) and len(fake_app.received) == 1
    [line] = [line for line in log_lines() if line["event"] == "app_answer_too_large"]
    assert line["level"] == "WARNING" and line["limit_bytes"] == 64 * 1024 and line["outbox_id"] == item["id"]
    assert line["content_length"] == (HUGE if declare_length else None) and line["app_status"] == 200
    assert "xxxx" not in json.dumps(log_lines())  # nothing of the answer itself
    assert fake_app.stream_ended.wait(10) and fake_app.streamed < HUGE  # the connection was closed, not drained

    fake_app.reset()  # the next forward finds a working connection pool
    response = signed_post(client, "/twilio/inbound", inbound_params("SM" + "3" * 31 + "f"))
    assert response.get_data(as_text=True) == fake_app.reply


def test_a_compressed_answer_that_decodes_past_64_kib_is_not_relayed(forwarding, fake_app, db_engine, log_lines):
    """The cap is on the answer as decoded: a few kB of gzip can decode to megabytes (a bomb, or a runaway page
    served compressed), and it is what would be relayed."""
    fake_app.reply = gzip.compress(b"<Response>" + b" " * 8_000_000)
    fake_app.headers = [("Content-Encoding", "gzip")]
    assert len(fake_app.reply) < 64 * 1024
    response = signed_post(forwarding.test_client(), "/twilio/inbound", inbound_params("SM" + "3" * 30 + "ab"))
    assert response.status_code == 200 and response.get_data(as_text=True).endswith("<Response />")
    [item] = items(db_engine)
    assert (item["status"], item["attempts"]) == ("delivered", 1)
    [line] = [line for line in log_lines() if line["event"] == "app_answer_too_large"]
    assert line["content_length"] == len(fake_app.reply)  # what it declared: the compressed length


@pytest.mark.parametrize("size, relayed", [(64 * 1024, True), (64 * 1024 + 1, False)])
def test_an_answer_of_up_to_64_kib_is_relayed_whole(forwarding, fake_app, db_engine, size, relayed):
    fake_app.huge_reply = size
    response = signed_post(forwarding.test_client(), "/twilio/inbound", inbound_params("SM" + "3" * 30 + "aa"))
    body = response.get_data()
    assert (len(body), body.startswith(b"<Response>xxx")) == ((size, True) if relayed else (len(body), False))
    assert items(db_engine)[0]["status"] == "delivered"


def test_a_status_callback_answered_at_length_is_delivered_once(forwarding, fake_app, db_engine, log_lines):
    fake_app.huge_reply = HUGE
    params = {"MessageSid": "SM" + "a" * 31 + "b", "MessageStatus": "delivered", "From": BUSINESS, "To": USER,
              "AccountSid": ACCOUNT_SID}
    assert signed_post(forwarding.test_client(), "/twilio/status", params).status_code == 200
    assert run_worker(forwarding) == 1
    [item] = items(db_engine)
    assert (item["status"], item["attempts"]) == ("delivered", 1)
    [line] = [line for line in log_lines() if line["event"] == "app_answer_too_large"]
    assert line["kind"] == "status" and line["outbox_id"] == item["id"]
    assert fake_app.stream_ended.wait(10) and fake_app.streamed < HUGE


@pytest.mark.parametrize("app_answers", [True, False])
def test_a_database_failure_after_the_app_answered_still_gives_twilio_the_apps_answer(forwarding, fake_app,
                                                                                       db_engine, monkeypatch,
                                                                                       app_answers):
    """The message was stored and the app has had the webhook: only the attempt's bookkeeping failed. Twilio got
    a 503 (the app's TwiML thrown away); the item, still under the inline lease, is delivered again after it."""
    from proxy import outbox as box

    def refused(*args, **kwargs):
        raise OperationalError("UPDATE outbox", {}, Exception("server closed the connection unexpectedly"))

    monkeypatch.setattr(box, "delivered" if app_answers else "failed", refused)
    if not app_answers:
        fake_app.fail_status = 503
    response = signed_post(forwarding.test_client(), "/twilio/inbound", inbound_params("SM" + "3" * 31 + "d"))
    assert response.status_code == 200
    if app_answers:
        assert response.get_data(as_text=True) == fake_app.reply
    else:
        assert response.get_data(as_text=True).endswith("<Response />")
    monkeypatch.undo()
    [item] = items(db_engine)
    assert item["status"] == "pending" and item["lease_until"] is not None  # the worker's after the lease
    fake_app.reset()
    assert run_worker(forwarding, utcnow() + timedelta(seconds=LEASE_SECONDS)) == 1
    assert items(db_engine)[0]["status"] == "delivered" and len(fake_app.received) == 1


def test_retried_twilio_webhook_is_forwarded_once(forwarding, fake_app):
    client = forwarding.test_client()
    params = inbound_params("SM" + "4" * 32)
    signed_post(client, "/twilio/inbound", params)
    signed_post(client, "/twilio/inbound", params)
    assert len(fake_app.received) == 1


def test_one_conversation_is_delivered_in_order(forwarding, fake_app, db_engine):
    client = forwarding.test_client()
    fake_app.fail_status = 503
    signed_post(client, "/twilio/inbound", inbound_params("SM" + "5" * 32, Body="first"))
    fake_app.fail_status = None
    # The app is back, but the first message still waits: the second must not overtake it.
    second = signed_post(client, "/twilio/inbound", inbound_params("SM" + "6" * 32, Body="second"))
    assert second.get_data(as_text=True).endswith("<Response />")
    other = signed_post(client, "/twilio/inbound", inbound_params("SM" + "7" * 32, user="whatsapp:+14155550122",
                                                                   Body="other user"))
    assert other.get_data(as_text=True) == fake_app.reply  # other conversations are not held up
    later = utcnow() + timedelta(seconds=6)
    assert run_worker(forwarding, later) == 1  # only the head of the conversation is due
    assert run_worker(forwarding, later) == 1
    assert fake_app.bodies("/app/inbound") == ["other user", "first", "second"]


def test_exhausted_items_can_be_listed_and_replayed(forwarding, fake_app, db_engine):
    fake_app.fail_status = 503
    signed_post(forwarding.test_client(), "/twilio/inbound", inbound_params("SM" + "8" * 32))
    t = utcnow()
    for step in (6, 400):  # attempts 2 and 3 of the 3-step schedule
        run_worker(forwarding, t + timedelta(seconds=step))
    [item] = items(db_engine)
    assert (item["status"], item["attempts"]) == ("exhausted", 3)
    runner = forwarding.test_cli_runner()
    listed = runner.invoke(args=["outbox", "list", "--status", "exhausted"])
    assert listed.exit_code == 0 and json.loads(listed.stdout.splitlines()[0])["id"] == item["id"]
    assert "1 exhausted" in listed.stderr
    fake_app.fail_status = None
    assert "1 item(s)" in runner.invoke(args=["outbox", "replay", str(item["id"])]).output
    assert run_worker(forwarding) == 1
    assert items(db_engine)[0]["status"] == "delivered" and len(fake_app.received) == 1
    assert runner.invoke(args=["outbox", "replay"]).exit_code != 0


@pytest.mark.parametrize("state", ["missing", "being delivered", "delivered"])
def test_replaying_an_item_that_cannot_be_replayed_fails_saying_why(forwarding, fake_app, db_engine, state):
    """An id that does not exist (a typo) or an item that is not exhausted or uncertain printed "0 item(s)
    queued again" and exited 0: an operator's script took it for done."""
    if state == "being delivered":
        fake_app.fail_status = 503
    signed_post(forwarding.test_client(), "/twilio/inbound", inbound_params("SM" + "8" * 31 + "a"))
    if state == "being delivered":  # a worker holds its lease
        with db_engine.begin() as conn:
            conn.execute(outbox.update().values(lease_until=utcnow() + timedelta(minutes=1)))
    [item] = items(db_engine)
    assert item["status"] == ("pending" if state == "being delivered" else "delivered")
    item_id = item["id"] + 1000 if state == "missing" else item["id"]
    result = forwarding.test_cli_runner().invoke(args=["outbox", "replay", str(item_id)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert str(item_id) in line and "exhausted or uncertain" in line and "Traceback" not in result.output
    assert ("does not exist" if state == "missing" else f"is {state}") in line, line
    assert "queued again" not in result.output
    assert items(db_engine) == [item]  # untouched


def test_replaying_a_pending_item_makes_it_due_now(forwarding, fake_app, db_engine):
    """The app is back: a webhook waiting for its next attempt (minutes away) had no way to go now."""
    fake_app.fail_status = 503
    signed_post(forwarding.test_client(), "/twilio/inbound", inbound_params("SM" + "8" * 31 + "b"))
    [item] = items(db_engine)
    assert item["status"] == "pending"
    assert run_worker(forwarding) == 0  # its next attempt is seconds away
    fake_app.fail_status = None
    result = forwarding.test_cli_runner().invoke(args=["outbox", "replay", str(item["id"])])
    assert result.exit_code == 0 and "due now" in result.output, result.output
    assert run_worker(forwarding) == 1
    [after] = items(db_engine)
    assert (after["status"], after["attempts"]) == ("delivered", 2)  # the inline attempt still counts


def test_replaying_an_item_queued_behind_another_names_that_one(forwarding, fake_app, db_engine):
    """It said "was waiting for its next attempt: due now" for an item already due that waits only for an
    earlier webhook of its conversation, which the worker delivers first."""
    fake_app.fail_status = 503
    client = forwarding.test_client()
    for sid in ("SM" + "8" * 31 + "c", "SM" + "8" * 31 + "d"):
        signed_post(client, "/twilio/inbound", inbound_params(sid))
    first, second = items(db_engine)
    assert (first["attempts"], second["attempts"]) == (1, 0)  # the second never had its turn
    result = forwarding.test_cli_runner().invoke(args=["outbox", "replay", str(second["id"])])
    assert result.exit_code == 0, result.output
    assert f"behind item {first['id']} of its conversation" in result.output, result.output
    assert f"`outbox replay {first['id']}`" in result.output and "waiting for its next attempt" not in result.output


def test_replaying_all_with_nothing_exhausted_is_no_error(forwarding, db_engine):
    result = forwarding.test_cli_runner().invoke(args=["outbox", "replay", "--all"])
    assert result.exit_code == 0 and "0 item(s) queued again" in result.output


def test_a_webhook_behind_one_being_delivered_waits_its_turn_and_relays_the_apps_reply(forwarding, fake_app,
                                                                                        db_engine):
    """The user writes twice in quick succession: the second webhook was handed to the worker while the first
    was still being delivered, so Twilio got empty TwiML and the app's reply to it was thrown away."""
    fake_app.delay = 0.5
    first_sid, second_sid = "SM" + "a" * 32, "SM" + "b" * 32
    answers = {}

    def post(sid):
        answers[sid] = signed_post(forwarding.test_client(), "/twilio/inbound", inbound_params(sid))

    first = threading.Thread(target=post, args=(first_sid,))
    first.start()
    deadline = time.monotonic() + 10
    while fake_app.started < 1 and time.monotonic() < deadline:  # the first is at the app now
        time.sleep(0.01)
    post(second_sid)
    first.join(10)
    for sid in (first_sid, second_sid):
        assert answers[sid].status_code == 200 and answers[sid].get_data(as_text=True) == fake_app.reply, sid
    assert [dict(form)["MessageSid"] for _, form, _ in fake_app.received] == [first_sid, second_sid]
    assert [(i["status"], i["attempts"]) for i in items(db_engine)] == [("delivered", 1)] * 2


@pytest.mark.parametrize("stalled, posted", [(0.8, True), (2.2, False)])
def test_an_inline_attempt_gets_only_what_is_left_of_twilios_deadline(settings, db_engine, fake_app, monkeypatch,
                                                                       stalled, posted):
    """A write that waited (a database stalled) left the app its whole FORWARD_TIMEOUT_SECONDS: Twilio got the
    app's TwiML after its own 15 s, when it had given up (11205), while the item was counted delivered. Here
    Twilio's limit is 4 s (3 s with the margin) and the app answers in 2.5 s."""
    from proxy import store, webhooks

    monkeypatch.setattr(webhooks, "TWILIO_WEBHOOK_TIMEOUT_SECONDS", 4)
    record = store.record_inbound
    monkeypatch.setattr(store, "record_inbound", lambda conn, **kw: (time.sleep(stalled), record(conn, **kw))[1])
    app = create_app(replace(settings, forward_inbound_url=fake_app.url + "/app/inbound", forward_timeout_seconds=10,
                             retry_schedule=SCHEDULE))
    fake_app.delay = 2.5
    response = signed_post(app.test_client(), "/twilio/inbound", inbound_params("SM" + "e" * 31 + "1"))
    app.extensions["proxy"].engine.dispose()
    # Cut off at what was left (2.2 s of 3 s), not relayed at 3.3 s, past Twilio's limit.
    assert response.status_code == 200 and response.get_data(as_text=True).endswith("<Response />")
    [item] = items(db_engine)
    # Left to the worker: tried and cut off (the app may have had it: at-least-once), or never tried (under 1 s left).
    assert item["status"] == "pending" and item["attempts"] == (1 if posted else 0)
    assert fake_app.started == (1 if posted else 0)
    deadline = time.monotonic() + 5
    while posted and not fake_app.received and time.monotonic() < deadline:  # its late answer, before the next test
        time.sleep(0.05)


def test_a_turn_that_came_too_late_for_twilios_deadline_is_left_to_the_worker(settings, db_engine, fake_app,
                                                                               monkeypatch):
    """The earlier webhook's delivery ended, but its check took so long that under a second of Twilio's limit was
    left: posted anyway (0.34 s), it was cut off and counted a failed attempt. Twilio's limit here is 3 s."""
    from proxy import outbox, webhooks

    monkeypatch.setattr(webhooks, "TWILIO_WEBHOOK_TIMEOUT_SECONDS", 3)
    app = create_app(replace(settings, forward_inbound_url=fake_app.url + "/app/inbound", forward_timeout_seconds=1,
                             retry_schedule=SCHEDULE))
    checks, earlier_pending = [], outbox.earlier_pending

    def slow_check(conn, key, item_id, now):
        checks.append(item_id)
        if len(checks) == 1:
            return "in_flight"  # the earlier one is at the app
        time.sleep(1.6)  # ... and this check stalls (a held row)
        return earlier_pending(conn, key, item_id, now)

    monkeypatch.setattr(outbox, "earlier_pending", slow_check)
    monkeypatch.setattr(outbox, "enqueue_in_turn", lambda conn, **kw: (outbox.enqueue(
        conn, **{k: v for k, v in kw.items() if k != "checked_at"}), "in_flight"))
    response = signed_post(app.test_client(), "/twilio/inbound", inbound_params("SM" + "e" * 31 + "3"))
    app.extensions["proxy"].engine.dispose()
    assert response.status_code == 200 and response.get_data(as_text=True).endswith("<Response />")
    [item] = items(db_engine)
    assert (item["status"], item["attempts"]) == ("pending", 0) and fake_app.started == 0


def test_a_database_failing_while_a_stored_webhook_waits_its_turn_is_no_503(forwarding, fake_app, db_engine,
                                                                          monkeypatch, log_lines):
    """The second webhook is stored and queued, then waits for the first's delivery; the database failing then
    answered Twilio 503 "nothing was sent or recorded", while the message, its window and its forward were kept."""
    fake_app.delay = 0.5
    first = threading.Thread(target=signed_post, args=(forwarding.test_client(), "/twilio/inbound",
                                                       inbound_params("SM" + "a" * 32)))
    first.start()
    deadline = time.monotonic() + 10
    while fake_app.started < 1 and time.monotonic() < deadline:
        time.sleep(0.01)

    stored_with = outbox_items.earlier_pending

    def down_once_stored(*args, **kwargs):
        if sys._getframe(1).f_code.co_name != "_take_turn":  # the store itself (SQLite's turn check) goes through
            return stored_with(*args, **kwargs)
        raise OperationalError("SELECT", {}, Exception("connection refused"))

    monkeypatch.setattr(outbox_items, "earlier_pending", down_once_stored)
    second = signed_post(forwarding.test_client(), "/twilio/inbound", inbound_params("SM" + "b" * 32))
    first.join(10)
    assert second.status_code == 200 and second.get_data(as_text=True) == webhooks.EMPTY_TWIML
    lines = [line for line in log_lines() if line.get("message_sid") == "SM" + "b" * 32 or
             line["event"] == "database_unavailable"]
    assert [line["event"] for line in lines] == ["inbound", "database_unavailable"]
    assert lines[0]["decision"] == "window_opened"
    # Kept for the worker: pending under the attempt's lease, delivered once it runs out.
    assert [i["status"] for i in items(db_engine)] == ["delivered", "pending"]


def test_the_inline_attempts_lease_counts_from_its_turn_not_from_the_webhooks_arrival(forwarding, fake_app,
                                                                                       db_engine):
    """A webhook that waited (for its turn, a lock, a pooled connection) kept the lease counted from its
    arrival: it could run out mid-delivery, and a worker then delivered a second copy alongside."""
    fake_app.delay = 0.6
    threading.Thread(target=signed_post, args=(forwarding.test_client(), "/twilio/inbound",
                                               inbound_params("SM" + "c" * 32))).start()
    deadline = time.monotonic() + 10
    while fake_app.started < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    lease, arrived = lease_at_the_app(forwarding, fake_app, db_engine, "SM" + "d" * 32)
    # It waited about 0.6 s for the first delivery: its lease runs that much past one counted from arrival.
    assert lease - arrived >= timedelta(seconds=inline_lease_seconds(forwarding) + 0.4)


def test_worker_once_delivers_everything_due_in_each_conversations_order(forwarding, fake_app, db_engine):
    """A pass takes one item per conversation; `worker --once` left a conversation's later webhooks for
    later runs (three runs for three queued webhooks)."""
    fake_app.fail_status = 503
    client = forwarding.test_client()
    sids = ["SM" + str(i) * 32 for i in range(1, 4)]
    for sid in sids:
        signed_post(client, "/twilio/inbound", inbound_params(sid))
    assert [i["status"] for i in items(db_engine)] == ["pending"] * 3
    fake_app.reset()
    with db_engine.begin() as conn:  # due now, not after the retry schedule's pause
        conn.execute(update(outbox).values(next_attempt_at=utcnow() - timedelta(seconds=1)))
    result = forwarding.test_cli_runner().invoke(args=["worker", "--once"])
    assert result.exit_code == 0 and result.output.strip() == "3 item(s) processed", result.output
    assert [i["status"] for i in items(db_engine)] == ["delivered"] * 3
    assert [dict(form)["MessageSid"] for _, form, _ in fake_app.received] == sids


def test_a_restarted_worker_delivers_exactly_once(forwarding, fake_app, db_engine, settings):
    fake_app.fail_status = 503
    signed_post(forwarding.test_client(), "/twilio/inbound", inbound_params("SM" + "9" * 32))
    fake_app.fail_status = None
    later = utcnow() + timedelta(seconds=6)
    # Worker A claims the item and dies before delivering it (its lease stays on the row).
    with db_engine.begin() as conn:
        from proxy import outbox as box
        [claimed] = box.claim(conn, later, LEASE_SECONDS)
    assert claimed.kind == "inbound"
    restarted = create_app(forwarding.extensions["proxy"].settings)  # a new process
    assert run_worker(restarted, later) == 0  # the lease still protects the item
    assert run_worker(restarted, later + timedelta(seconds=LEASE_SECONDS + 1)) == 1
    assert run_worker(restarted, later + timedelta(seconds=LEASE_SECONDS + 10)) == 0
    assert len(fake_app.received) == 1 and items(db_engine)[0]["status"] == "delivered"
    restarted.extensions["proxy"].engine.dispose()


def test_two_workers_never_deliver_one_item_twice(forwarding, fake_app, db_engine):
    fake_app.fail_status = 503
    client = forwarding.test_client()
    for i in range(40):  # 40 conversations, each with a queued webhook
        signed_post(client, "/twilio/inbound", inbound_params(f"SM{i:032x}", user=f"whatsapp:+1415555{i:04d}",
                                                               Body=f"m{i}"))
    fake_app.reset()
    due = utcnow() + timedelta(seconds=6)
    apps = [create_app(forwarding.extensions["proxy"].settings) for _ in range(2)]
    counts = [0, 0]

    def work(n):
        while Worker(apps[n].extensions["proxy"]).run_once(due):
            counts[n] += 1

    threads = [threading.Thread(target=work, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    bodies = fake_app.bodies("/app/inbound")
    assert sorted(bodies) == sorted(f"m{i}" for i in range(40))  # each exactly once
    assert all(i["status"] == "delivered" for i in items(db_engine))
    for app in apps:
        app.extensions["proxy"].engine.dispose()


def test_a_worker_delivers_only_the_items_it_still_holds(forwarding, fake_app, db_engine):
    """A batch can outlast its lease (WORKER_CONCURRENCY deliveries at a time, each up to FORWARD_TIMEOUT_SECONDS):
    an item another worker claimed meanwhile is that worker's to deliver, not a second copy."""
    client = forwarding.test_client()
    for i in range(3):  # three conversations, each with a status callback queued
        signed_post(client, "/twilio/status", {"MessageSid": f"SM{i:032x}", "MessageStatus": "delivered",
                                               "From": BUSINESS, "To": f"whatsapp:+1415555{i:04d}"})
    due = utcnow()
    other = create_app(forwarding.extensions["proxy"].settings)
    took_over, turn = [], threading.Lock()

    stalled_until = due + timedelta(seconds=LEASE_SECONDS + 1)

    class Stalled(Worker):
        def process(self, item, now):
            with turn:  # the batch's deliveries start at once: the first stalls them all
                if not took_over:  # stalls after claiming, past its lease: another worker claims the batch
                    took_over.append(run_worker(other, stalled_until))
            super().process(item, max(now, stalled_until))  # the stall as this worker's clock saw it pass

    assert Stalled(forwarding.extensions["proxy"]).run_once(due) == 3
    assert took_over == [3]
    sids = [dict(form)["MessageSid"] for _, form, _ in fake_app.received]
    assert sorted(sids) == [f"SM{i:032x}" for i in range(3)]  # each exactly once
    assert all(i["status"] == "delivered" and i["attempts"] == 1 for i in items(db_engine))
    other.extensions["proxy"].engine.dispose()


def test_a_delivery_renews_its_lease_only_when_the_claims_could_run_out_during_it(forwarding, fake_app, db_engine,
                                                                                   monkeypatch):
    """Started soon after its claim, a delivery is covered by the claim's lease to its end: no write to renew
    it. One that waited in its batch until less than the longest delivery (and the clocks' margin) is left
    renews it first, as any whose lease may have run out must."""
    from proxy.settings import LEASE_MARGIN_SECONDS

    client = forwarding.test_client()
    for i in range(3):  # three conversations, each with a status callback queued
        signed_post(client, "/twilio/status", {"MessageSid": f"SM{i:032x}", "MessageStatus": "delivered",
                                               "From": BUSINESS, "To": f"whatsapp:+1415555{i:04d}"})
    rt, due = forwarding.extensions["proxy"], utcnow()
    with db_engine.begin() as conn:
        soon, last_safe, late = outbox_items.claim(conn, due, LEASE_SECONDS)
    renewed, keep = [], outbox_items.keep
    monkeypatch.setattr(outbox_items, "keep", lambda conn, item, *args: renewed.append(item.id) or keep(conn, item, *args))
    covered = LEASE_SECONDS - rt.settings.longest_delivery_seconds - LEASE_MARGIN_SECONDS  # 74 s here
    worker = Worker(rt)
    worker.process(soon, due + timedelta(seconds=1))
    worker.process(last_safe, due + timedelta(seconds=covered))
    worker.process(late, due + timedelta(seconds=covered + 1))
    assert renewed == [late.id]
    assert [(i["status"], i["attempts"]) for i in items(db_engine)] == [("delivered", 1)] * 3
    assert len(fake_app.received) == 3


def test_a_running_worker_fills_a_slot_as_soon_as_a_delivery_ends(settings, db_engine, fake_app):
    """One slow delivery must not hold back the other slots: while one conversation's webhook is at the app,
    the other slot delivers another conversation's three, each claimed as the one before it is delivered.
    Claimed in batches, the second and third waited for the slow one to end."""
    from tests.http.test_operations import Rounds

    app = create_app(replace(settings, forward_status_url=fake_app.url + "/app/status", forward_timeout_seconds=5.0,
                             worker_concurrency=2))
    client = app.test_client()
    slow, other = "whatsapp:+14155550001", "whatsapp:+14155550002"
    for i, user in enumerate([slow, other, other, other]):
        signed_post(client, "/twilio/status", {"MessageSid": f"SM{i:032x}", "MessageStatus": "delivered",
                                               "From": BUSINESS, "To": user})
    others_done, waited = threading.Event(), []

    def delivered_to(user):
        return [dict(form)["MessageSid"] for _, form, _ in fake_app.received if dict(form)["To"] == user]

    class OneSlow(Worker):
        def process(self, item, *args):
            if item.ordering_key.endswith(slow):
                waited.append(others_done.wait(5))  # at the app until the others are delivered
            super().process(item, *args)
            if len(delivered_to(other)) == 3:
                others_done.set()

    OneSlow(app.extensions["proxy"]).run_forever(Rounds(1))
    assert waited == [True]
    assert delivered_to(other) == [f"SM{i:032x}" for i in (1, 2, 3)]  # in order
    assert delivered_to(slow) == [f"SM{0:032x}"]
    assert [i["status"] for i in items(db_engine)] == ["delivered"] * 4
    app.extensions["proxy"].engine.dispose()


def test_a_running_worker_that_cannot_claim_more_lets_its_deliveries_end_then_says_so(settings, db_engine, fake_app,
                                                                                      log_lines):
    """The database went away between two claims (a slot freed while another delivery was at the app): the
    delivery under way still ends and is recorded, and the worker reports the outage as for a failed poll."""
    from tests.http.test_operations import Rounds

    app = create_app(replace(settings, forward_status_url=fake_app.url + "/app/status", worker_concurrency=2))
    client = app.test_client()
    for i, user in enumerate([USER, "whatsapp:+14155550002"]):
        signed_post(client, "/twilio/status", {"MessageSid": f"SM{i:032x}", "MessageStatus": "delivered",
                                               "From": BUSINESS, "To": user})
    asked = []

    class Outage(Worker):
        def process(self, item, *args):
            if item.ordering_key.endswith(USER):
                time.sleep(0.5)  # still under way when the other slot frees
            super().process(item, *args)

        def _more(self, limit):
            asked.append(limit)
            raise OperationalError("SELECT", {}, Exception("connection refused"))

    started = len(log_lines())
    Outage(app.extensions["proxy"]).run_forever(Rounds(1))
    assert asked == [10]  # a batch (max(10, WORKER_CONCURRENCY)), not a slot
    assert [i["status"] for i in items(db_engine)] == ["delivered"] * 2
    assert [line["event"] for line in log_lines()[started:] if line["event"].startswith("database")] == \
        ["database_unavailable"]
    app.extensions["proxy"].engine.dispose()


@pytest.mark.parametrize("concurrency", [1, 2])
def test_a_stopped_worker_ends_after_the_deliveries_at_hand_and_hands_back_the_rest(settings, db_engine, fake_app,
                                                                                    concurrency):
    """SIGTERM (a deploy, a restart) set the stop event, but the worker went on through its whole batch, up to
    10 deliveries of FORWARD_TIMEOUT_SECONDS each: past the platform's grace, then SIGKILL mid-delivery.
    The deliveries under way when it comes end (each within its timeout); none starts after it."""
    app = create_app(replace(settings, forward_status_url=fake_app.url + "/app/status", forward_timeout_seconds=1.0,
                             worker_concurrency=concurrency))
    client = app.test_client()
    for i in range(5):  # five conversations, each with a status callback queued
        signed_post(client, "/twilio/status", {"MessageSid": f"SM{i:032x}", "MessageStatus": "delivered",
                                               "From": BUSINESS, "To": f"whatsapp:+1415555{i:04d}"})
    fake_app.delay = 0.3  # the batch's first deliveries are all at the app when the first one ends
    stop = threading.Event()

    class Stopped(Worker):
        def process(self, item, *args):
            super().process(item, *args)
            stop.set()  # SIGTERM arrives during the first deliveries

    Stopped(app.extensions["proxy"]).run_forever(stop)
    assert len(fake_app.received) == concurrency == fake_app.started
    assert [(i["status"], i["lease_until"]) for i in items(db_engine)] == \
        [("delivered", None)] * concurrency + [("pending", None)] * (5 - concurrency)
    fake_app.delay = 0
    assert run_worker(app) == 5 - concurrency  # the next worker takes them at once, not after their lease
    app.extensions["proxy"].engine.dispose()


def queue_for_the_worker(client, fake_app, webhooks):
    """Inbound webhooks, (sid, user, body) each, that reach the outbox while the app is down; the app is then
    back. Returns when the worker may take them (after the first retry's pause)."""
    fake_app.fail_status = 503
    for sid, user, body in webhooks:
        signed_post(client, "/twilio/inbound", inbound_params(sid, user=user, Body=body))
    fake_app.reset()
    return utcnow() + timedelta(seconds=SCHEDULE[1] + 1)


def test_a_batch_of_different_conversations_is_delivered_concurrently(settings, db_engine, fake_app):
    """One delivery after another, an app answering in 3 s took a minute for 20 webhooks (and one that
    hangs, FORWARD_TIMEOUT_SECONDS each): a backlog after an outage drained for hours. A batch holds one
    item per conversation, so its deliveries go to the app together, WORKER_CONCURRENCY at most."""
    app = create_app(replace(settings, forward_inbound_url=fake_app.url + "/app/inbound", forward_timeout_seconds=5.0,
                             retry_schedule=SCHEDULE, worker_concurrency=4))
    users = [f"whatsapp:+1415555{i:04d}" for i in range(6)]
    due = queue_for_the_worker(app.test_client(), fake_app,
                               [(f"SM{i:032x}", user, f"m{i}") for i, user in enumerate(users)])
    fake_app.delay = 0.5
    assert run_worker(app, due) == 6  # one batch
    assert 1 < fake_app.max_in_flight <= 4  # together, but never more than WORKER_CONCURRENCY at once
    assert sorted(fake_app.bodies("/app/inbound")) == [f"m{i}" for i in range(6)]
    assert [(i["status"], i["attempts"], i["lease_until"]) for i in items(db_engine)] == [("delivered", 2, None)] * 6
    app.extensions["proxy"].engine.dispose()


def test_one_conversation_is_never_at_the_app_twice_at_once_and_arrives_in_order(settings, db_engine, fake_app,
                                                                                 log_lines):
    app = create_app(replace(settings, forward_inbound_url=fake_app.url + "/app/inbound", forward_timeout_seconds=5.0,
                             retry_schedule=SCHEDULE))
    chatty, others = "whatsapp:+14155550999", [f"whatsapp:+1415555{i:04d}" for i in range(3)]
    webhooks = [(f"SM{i:032x}", chatty, f"chatty {i}") for i in range(4)]
    webhooks[1:1] = [(f"SM{100 + i:032x}", user, f"other {i}") for i, user in enumerate(others)]
    due = queue_for_the_worker(app.test_client(), fake_app, webhooks)
    fake_app.delay = 0.2
    started = len(log_lines())
    passes = []
    while claimed := run_worker(app, due):
        passes.append(claimed)
    assert passes == [4, 1, 1, 1]  # a pass takes the head of each conversation
    assert fake_app.max_in_flight > 1  # the others went alongside the chatty one's first
    assert fake_app.max_in_flight_by_pair[tuple(sorted((chatty, BUSINESS)))] == 1
    assert [body for body in fake_app.bodies("/app/inbound") if body.startswith("chatty")] == \
        [f"chatty {i}" for i in range(4)]
    deliveries = [line for line in log_lines()[started:] if line["event"] == "delivery"]
    assert sorted(line["outbox_id"] for line in deliveries) == [i["id"] for i in items(db_engine)]  # one line each
    assert {line["decision"] for line in deliveries} == {"delivered"}
    app.extensions["proxy"].engine.dispose()


def test_the_worker_command_has_a_connection_and_a_forwarding_thread_for_each_delivery(settings, db_engine):
    """A delivery holds a database connection while it writes and a forwarding thread while it waits for the
    app: the web's pool (10 connections, 16 threads per gunicorn worker) would make them queue, and a forward
    still waiting for a thread at its deadline is a failed attempt."""
    from proxy import DB_POOL_SIZE, worker_runtime

    web = create_app(replace(settings, worker_concurrency=40)).extensions["proxy"]
    rt = worker_runtime(web)
    try:
        assert rt.settings is web.settings and rt.engine is not web.engine
        assert rt.engine.pool.size() >= 40 + 2 and rt.forwarder.threads >= 40  # and the claims, the attempt writer
        assert rt.reader.pool is rt.engine.pool and rt.attempts.engine is rt.engine and rt.content.engine is rt.engine
        assert web.engine.pool.size() == DB_POOL_SIZE  # the web's own is left as it is
    finally:
        rt.engine.dispose()
        web.engine.dispose()


def test_status_callbacks_are_forwarded_through_the_outbox(forwarding, fake_app, db_engine):
    params = {"MessageSid": "SM" + "a" * 32, "MessageStatus": "delivered", "From": BUSINESS, "To": USER,
              "AccountSid": ACCOUNT_SID}
    assert signed_post(forwarding.test_client(), "/twilio/status", params).status_code == 200
    assert fake_app.received == []
    assert run_worker(forwarding) == 1
    [(path, form, _)] = fake_app.received
    assert path == "/app/status" and dict(form)["MessageStatus"] == "delivered" and fake_app.rejected == 0


def test_the_query_twilio_posted_to_reaches_the_app_signed(forwarding, fake_app, db_engine, settings):
    """An app that put `?order=44` in its StatusCallback (at the proxy), or `?tenant=acme` in its inbound URL, got
    neither: the forward went to FORWARD_*_URL alone. Added after the forward URL's own query, and signed."""
    client = forwarding.test_client()
    inbound = inbound_params("SM" + "a" * 31 + "1")
    assert signed_post(client, "/twilio/inbound?tenant=acme&x=%2B1", inbound).status_code == 200
    status = {"MessageSid": "SM" + "a" * 32, "MessageStatus": "delivered", "From": BUSINESS, "To": USER,
              "AccountSid": ACCOUNT_SID}
    assert signed_post(client, "/twilio/status?order=44", status).status_code == 200
    # bodySHA256 is the hash of a JSON webhook's body, which a forward never sends: not passed on.
    assert signed_post(client, "/twilio/status?bodySHA256=x&order=45", {**status, "MessageStatus": "read"}
                       ).status_code == 200
    while run_worker(forwarding):
        pass
    assert fake_app.rejected == 0
    assert fake_app.queries == ["tenant=acme&x=%2B1", "order=44", "order=45"]
    # The forward URL's own query first; the worker's delivery (to the URL configured now) keeps the webhook's.
    own = create_app(replace(forwarding.extensions["proxy"].settings,
                             forward_status_url=fake_app.url + "/app/status?src=proxy"))
    assert signed_post(own.test_client(), "/twilio/status?order=46", {**status, "MessageSid": "SM" + "b" * 32}
                       ).status_code == 200
    assert run_worker(own) == 1
    assert fake_app.queries[-1] == "src=proxy&order=46" and fake_app.rejected == 0


def fallback_app(settings, fake_twilio, **extra):
    sid = fake_twilio.add_content({"twilio/text": {"body": "Hi {{1}}"}}, "approved")
    app = create_app(replace(settings, policy=Policy(default_action="reroute"),
                             fallback=Fallback(sid, {"1": "{profile_name}"}), **extra))
    app.fallback_sid = sid
    return app


def failed_callback(sid, status="failed", code="63016"):
    return {"MessageSid": sid, "MessageStatus": status, "ErrorCode": code, "From": BUSINESS, "To": USER,
            "AccountSid": ACCOUNT_SID, "ChannelPrefix": "whatsapp"}


def test_late_63016_closes_the_window_and_sends_the_fallback_once(settings, db_engine, fake_twilio, log_lines):
    app = fallback_app(settings, fake_twilio)
    client = app.test_client()
    signed_post(client, "/twilio/inbound", inbound_params("SM" + "b" * 32))
    body = "in window body-marker-3c81"
    sid = send(client, {"To": USER, "From": BUSINESS, "Body": body}).get_json()["sid"]
    for _ in range(3):  # Twilio may repeat a callback
        assert signed_post(client, "/twilio/status", failed_callback(sid)).status_code == 200
    # One line, however often Twilio repeats the callback; numbers masked, never the body.
    [late] = [line for line in log_lines() if line["event"] == "late_window_failure"]
    assert (late["level"], late["decision"], late["message_sid"], late["code"]) == \
        ("WARNING", "closed_and_rerouted", sid, 63016)
    assert (late["sender"], late["user"]) == ("whatsapp:+1415*****00", "whatsapp:+1415*****11")
    assert late["fallback_content_sid"] == app.fallback_sid
    logged = json.dumps(log_lines())
    assert "body-marker-3c81" not in logged and "4155550111" not in logged and "4155550100" not in logged
    window = client.get(f"/v1/windows?sender={BUSINESS}&user={USER}", headers=basic_auth()).get_json()
    assert window["open"] is False
    with db_engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(late_failures)).scalar_one() == 1
    assert run_worker(app) == 1
    assert run_worker(app) == 0
    fallback_sends = [r for r in fake_twilio.creates if dict(r.form).get("ContentSid") == app.fallback_sid]
    assert len(fallback_sends) == 1
    assert dict(fallback_sends[0].form)["ContentVariables"] == json.dumps({"1": "Ada"})
    # The next free-form send is blocked: the proxy learnt the window was closed.
    assert send(client, {"To": USER, "From": BUSINESS, "Body": "again"}).headers["X-Proxy-Decision"] == "rerouted"


def test_late_63016_without_a_fallback_closes_the_window_and_says_so(settings, db_engine, fake_twilio, log_lines):
    client = create_app(settings).test_client()
    signed_post(client, "/twilio/inbound", inbound_params("SM" + "b" * 31 + "3"))
    sid = send(client, {"To": USER, "From": BUSINESS, "Body": "body-marker-3c82"}).get_json()["sid"]
    assert signed_post(client, "/twilio/status", failed_callback(sid)).status_code == 200
    [late] = [line for line in log_lines() if line["event"] == "late_window_failure"]
    assert (late["decision"], late["message_sid"], late["fallback_content_sid"]) == ("closed", sid, None)
    assert late["user"] == "whatsapp:+1415*****11"
    assert "body-marker-3c82" not in json.dumps(log_lines())


def test_late_63016_keeps_a_window_the_user_reopened_after_the_send(settings, db_engine, fake_twilio):
    app = fallback_app(settings, fake_twilio)
    client = app.test_client()
    signed_post(client, "/twilio/inbound", inbound_params("SM" + "b" * 31 + "1"))
    sid = send(client, {"To": USER, "From": BUSINESS, "Body": "in window"}).get_json()["sid"]
    app.extensions["proxy"].attempts.flush()
    with db_engine.begin() as conn:  # the attempt row says when the send came in; the user wrote after it
        conn.execute(update(windows).values(last_inbound_at=utcnow() - timedelta(seconds=90)))
        conn.execute(update(send_attempts).values(created_at=utcnow() - timedelta(seconds=60)))
    signed_post(client, "/twilio/inbound", inbound_params("SM" + "b" * 31 + "2"))
    assert signed_post(client, "/twilio/status", failed_callback(sid)).status_code == 200
    window = client.get(f"/v1/windows?sender={BUSINESS}&user={USER}", headers=basic_auth()).get_json()
    assert window["open"] is True
    assert send(client, {"To": USER, "From": BUSINESS, "Body": "again"}).headers["X-Proxy-Decision"] == "allowed"
    with db_engine.connect() as conn:  # recorded as what happened: it said `closed`
        assert conn.execute(select(late_failures.c.action)).scalar_one() == "kept_open_and_rerouted"


def test_late_63016_on_a_scheduled_send_closes_a_window_the_user_wrote_in_before_its_send_at(
        settings, db_engine, fake_twilio, log_lines):
    """WhatsApp tried the message at its SendAt, after the user's latest message: the window it found closed is
    the one the proxy still had open (it was measured from when the request came in, and kept open)."""
    client = create_app(settings).test_client()
    signed_post(client, "/twilio/inbound", inbound_params("SM" + "b" * 31 + "4"))
    send_at = (utcnow() + timedelta(hours=2)).isoformat()
    sid = send(client, {"To": USER, "From": BUSINESS, "Body": "later", "SendAt": send_at,
                        "ScheduleType": "fixed", "MessagingServiceSid": "MG" + "1" * 32}).get_json()["sid"]
    signed_post(client, "/twilio/inbound", inbound_params("SM" + "b" * 31 + "5"))  # before the SendAt
    assert signed_post(client, "/twilio/status", failed_callback(sid)).status_code == 200
    assert client.get(f"/v1/windows?sender={BUSINESS}&user={USER}", headers=basic_auth()).get_json()["open"] is False
    [late] = [line for line in log_lines() if line["event"] == "late_window_failure"]
    assert (late["decision"], late["message_sid"]) == ("closed", sid)


@pytest.mark.parametrize("callback", [failed_callback("SM" + "c" * 32, status="undelivered", code="30008"),
                                      failed_callback("SM" + "c" * 32, code="30008"),
                                      failed_callback("SM" + "c" * 32, status="delivered")])
def test_other_failures_do_not_close_the_window(settings, db_engine, fake_twilio, callback):
    app = fallback_app(settings, fake_twilio)
    client = app.test_client()
    signed_post(client, "/twilio/inbound", inbound_params("SM" + "d" * 32))
    sid = send(client, {"To": USER, "From": BUSINESS, "Body": "x"}).get_json()["sid"]
    signed_post(client, "/twilio/status", {**callback, "MessageSid": sid})
    assert client.get(f"/v1/windows?sender={BUSINESS}&user={USER}", headers=basic_auth()).get_json()["open"]
    assert run_worker(app) == 0


def test_undelivered_with_63016_closes_the_window_too(settings, db_engine, fake_twilio, log_lines):
    # Twilio reports 63016 on `failed` or on `undelivered` (reference/twilio-facts.md): the code names the cause.
    app = fallback_app(settings, fake_twilio)
    client = app.test_client()
    signed_post(client, "/twilio/inbound", inbound_params("SM" + "c" * 31 + "1"))
    sid = send(client, {"To": USER, "From": BUSINESS, "Body": "x"}).get_json()["sid"]
    assert signed_post(client, "/twilio/status", failed_callback(sid, status="undelivered")).status_code == 200
    assert not client.get(f"/v1/windows?sender={BUSINESS}&user={USER}", headers=basic_auth()).get_json()["open"]
    [late] = [line for line in log_lines() if line["event"] == "late_window_failure"]
    assert late["message_sid"] == sid
    assert send(client, {"To": USER, "From": BUSINESS, "Body": "again"}).headers["X-Proxy-Decision"] == "rerouted"


def test_63016_for_a_message_the_proxy_did_not_send_is_only_recorded(settings, db_engine, fake_twilio):
    app = fallback_app(settings, fake_twilio)
    client = app.test_client()
    signed_post(client, "/twilio/inbound", inbound_params("SM" + "e" * 32))
    signed_post(client, "/twilio/status", failed_callback("SM" + "f" * 32))
    assert client.get(f"/v1/windows?sender={BUSINESS}&user={USER}", headers=basic_auth()).get_json()["open"]


def test_hold_then_release_in_order_when_the_user_writes(settings, db_engine, fake_twilio):
    app = fallback_app(settings, fake_twilio, hold_on_reroute=True)
    client = app.test_client()
    held_ids = []
    for body in ("first", "second", "third"):
        response = send(client, {"To": USER, "From": BUSINESS, "Body": body, "StatusCallback": "https://app/cb"})
        assert response.headers["X-Proxy-Decision"] == "rerouted"
        held_ids.append(int(response.headers["X-Proxy-Held-Id"]))
    assert held_ids == sorted(held_ids)
    listed = client.get("/v1/held", headers=basic_auth()).get_json()["held"]
    assert [h["id"] for h in listed] == held_ids and all(h["status"] == "held" for h in listed)
    assert client.get("/v1/held").status_code == 401
    fake_twilio.requests.clear()

    signed_post(client, "/twilio/inbound", inbound_params("SM" + "1" * 31 + "2"))
    assert run_worker(app) == 1
    sent = [dict(r.form) for r in fake_twilio.creates]
    assert [s["Body"] for s in sent] == ["first", "second", "third"]
    assert all(s["StatusCallback"] == "https://app/cb" and "ContentSid" not in s for s in sent)
    released = client.get("/v1/held?status=released", headers=basic_auth()).get_json()["held"]
    originals = [m["sid"] for m in fake_twilio.messages.values() if m["body"] in ("first", "second", "third")]
    assert [h["message_sid"] for h in released] == originals and len(originals) == 3
    signed_post(client, "/twilio/inbound", inbound_params("SM" + "1" * 31 + "3"))
    run_worker(app)
    assert len(fake_twilio.creates) == 3  # nothing is released twice


@pytest.mark.parametrize("approval, kept, error", [
    ("rejected", "failed", "63005: needs_approval, even inside the window"),  # it will never be approved
    ("pending", "held", None),  # it may be approved by the user's next message
])
def test_a_held_message_refused_for_what_it_is_lets_the_next_go_on(settings, db_engine, fake_twilio, log_lines,
                                                                   approval, kept, error):
    """Judged again on release: an unapproved carousel needs its approval inside the window too. It held back
    every later message of the pair until they all expired; now the text held after it goes out. One that
    cannot change is failed; one that may is kept for the user's next message."""
    app = fallback_app(settings, fake_twilio, hold_on_reroute=True)
    client = app.test_client()
    carousel = fake_twilio.add_content({"twilio/carousel": {"body": "c", "cards": []}}, approval)
    for form in ({"ContentSid": carousel}, {"Body": "your code is 1234"}):
        assert send(client, {"To": USER, "From": BUSINESS, **form}).headers["X-Proxy-Decision"] == "rerouted"
    fake_twilio.requests.clear()
    signed_post(client, "/twilio/inbound", inbound_params("SM" + "2" * 31 + "1"))
    run_worker(app)
    assert [dict(r.form).get("Body") for r in fake_twilio.creates] == ["your code is 1234"]
    with db_engine.connect() as conn:
        rows = conn.execute(select(held_messages.c.status, held_messages.c.last_error)
                            .order_by(held_messages.c.id)).all()
    assert rows == [(kept, error), ("released", None)]
    assert [line["decision"] for line in log_lines() if line["event"] == "release"] == [
        "failed" if kept == "failed" else "still_held", "released"]


def test_a_held_template_paused_for_a_while_goes_out_with_the_users_next_message(settings, db_engine, fake_twilio):
    """Meta pauses a template for its quality for hours; holds last days: kept, not failed."""
    app = fallback_app(settings, fake_twilio, hold_on_reroute=True, content_cache_seconds=0)
    client = app.test_client()
    template = fake_twilio.add_content({"twilio/text": {"body": "Your order shipped"}}, "paused")
    assert send(client, {"To": USER, "From": BUSINESS, "ContentSid": template}).headers["X-Proxy-Held-Id"]
    fake_twilio.requests.clear()
    signed_post(client, "/twilio/inbound", inbound_params("SM" + "2" * 31 + "4"))
    run_worker(app)
    assert fake_twilio.creates == []
    fake_twilio.contents[template]["approval"] = "approved"
    signed_post(client, "/twilio/inbound", inbound_params("SM" + "2" * 31 + "5"))
    run_worker(app)
    assert [dict(r.form)["ContentSid"] for r in fake_twilio.creates] == [template]
    with db_engine.connect() as conn:
        assert conn.execute(select(held_messages.c.status)).scalar_one() == "released"


def test_held_messages_wait_in_order_when_the_window_closed_again_before_their_release(settings, db_engine,
                                                                                      fake_twilio, log_lines):
    app = fallback_app(settings, fake_twilio, hold_on_reroute=True)
    client = app.test_client()
    for body in ("first", "second"):
        assert send(client, {"To": USER, "From": BUSINESS, "Body": body}).headers["X-Proxy-Decision"] == "rerouted"
    fake_twilio.requests.clear()
    signed_post(client, "/twilio/inbound", inbound_params("SM" + "2" * 31 + "2"))  # the release is queued
    with db_engine.begin() as conn:  # the worker was away for a day: the window closed again
        conn.execute(update(windows).values(expires_at=utcnow() - timedelta(seconds=1)))
    run_worker(app)
    assert fake_twilio.creates == []
    [line] = [line for line in log_lines() if line["event"] == "release"]
    assert (line["decision"], line["reason"]) == ("still_held", "window_closed")
    signed_post(client, "/twilio/inbound", inbound_params("SM" + "2" * 31 + "3"))
    run_worker(app)
    assert [dict(r.form)["Body"] for r in fake_twilio.creates] == ["first", "second"]


def test_a_release_that_fails_after_sending_one_message_records_its_attempt_and_lets_go(settings, db_engine,
                                                                                       fake_twilio, monkeypatch):
    """A release renews its lease after each message it sends; a failure after that was checked against the
    first lease and not recorded: no attempt counted, the item leased for OUTBOX_LEASE_SECONDS rather than
    retried on the schedule, and never exhausted however often it failed."""
    app = fallback_app(settings, fake_twilio, hold_on_reroute=True)
    client = app.test_client()
    for body in ("first", "second"):
        assert send(client, {"To": USER, "From": BUSINESS, "Body": body}).headers["X-Proxy-Decision"] == "rerouted"
    signed_post(client, "/twilio/inbound", inbound_params("SM" + "9" * 31 + "1"))
    fake_twilio.requests.clear()
    upstream = app.extensions["proxy"].upstream
    real, calls = upstream.request, []

    class RateLimited:  # Twilio answers the second create 429: never taken
        status_code, text, headers = 429, '{"code": 20429, "message": "Too Many Requests"}', {}

    def second_is_rate_limited(method, path, **kw):
        calls.append(path)
        return RateLimited() if len(calls) == 2 else real(method, path, **kw)

    monkeypatch.setattr(upstream, "request", second_is_rate_limited)
    assert run_worker(app) == 1
    with db_engine.connect() as conn:
        item = conn.execute(select(outbox).where(outbox.c.kind == "release")).mappings().one()
        statuses = conn.execute(select(held_messages.c.status).order_by(held_messages.c.id)).scalars().all()
    assert statuses == ["released", "held"]
    assert (item["status"], item["attempts"], item["lease_until"]) == ("pending", 1, None)
    assert "429" in item["last_error"]
    monkeypatch.setattr(upstream, "request", real)
    assert run_worker(app, utcnow() + timedelta(seconds=SCHEDULE[1] + 1)) == 1  # retried on the schedule
    assert [dict(r.form)["Body"] for r in fake_twilio.creates] == ["first", "second"]


def test_messages_held_before_hold_on_reroute_was_turned_off_are_still_released(settings, db_engine, fake_twilio,
                                                                               log_lines):
    """Turned off, webhooks queue no release (their write stays one statement): the worker's sweep releases
    the pairs whose user has written since, once each; a pair whose user has not stays held."""
    on = fallback_app(settings, fake_twilio, hold_on_reroute=True)
    other = "whatsapp:+14155550199"
    for to in (USER, other):
        assert send(on.test_client(), {"To": to, "From": BUSINESS, "Body": "order shipped"}).headers["X-Proxy-Held-Id"]
    off = create_app(replace(on.extensions["proxy"].settings, hold_on_reroute=False))  # redeployed without holds
    fake_twilio.requests.clear()
    signed_post(off.test_client(), "/twilio/inbound", inbound_params("SM" + "d" * 32))
    assert run_worker(off) == 1
    assert [(dict(r.form)["To"], dict(r.form)["Body"]) for r in fake_twilio.creates] == [(USER, "order shipped")]
    assert run_worker(off) == 0 and len(fake_twilio.creates) == 1  # queued once
    with db_engine.connect() as conn:
        assert dict(conn.execute(select(held_messages.c.user, held_messages.c.status)).all()) == {
            USER: "released", other: "held"}
    assert [(l["decision"], l.get("reason")) for l in log_lines() if l["event"] == "release"] == [
        ("queued", "hold_on_reroute_off"), ("released", None)]
    # The other user writes as their window is about to close (inside the safety margin, where the judge counts
    # it closed): nothing is queued, rather than a release finding it still held at every sweep.
    signed_post(off.test_client(), "/twilio/inbound", inbound_params("SM" + "e" * 32, user=other))
    margin = off.extensions["proxy"].settings.window_safety_margin_seconds
    with db_engine.begin() as conn:
        conn.execute(update(windows).where(windows.c.user == other)
                     .values(expires_at=utcnow() + timedelta(seconds=margin - 5)))
    assert run_worker(off) == 0 and run_worker(off) == 0 and len(fake_twilio.creates) == 1
    off.extensions["proxy"].engine.dispose()


def test_a_held_send_whose_time_has_gone_by_is_released_now_not_refused(settings, db_engine, fake_twilio):
    """Released with its SendAt, gone by (or under Twilio's 5 minutes ahead) by the time the user wrote: Twilio
    refused it with 35115, the worker gave up, and the message was lost."""
    service = "MG" + "1" * 32
    app = fallback_app(settings, fake_twilio, hold_on_reroute=True)
    client = app.test_client()
    send_at = (utcnow() + timedelta(minutes=10)).isoformat().replace("+00:00", "Z")
    held = send(client, {"To": USER, "MessagingServiceSid": service, "Body": "reminder", "SendAt": send_at,
                         "ScheduleType": "fixed", "StatusCallback": "https://app/cb"})
    assert held.headers["X-Proxy-Decision"] == "rerouted"
    with db_engine.begin() as conn:  # its time comes and goes before the user writes
        [(row_id, params)] = conn.execute(select(held_messages.c.id, held_messages.c.params)).all()
        gone = [(k, (utcnow() - timedelta(minutes=1)).isoformat() if k == "SendAt" else v)
                for k, v in json.loads(params)]
        conn.execute(update(held_messages).where(held_messages.c.id == row_id).values(params=json.dumps(gone)))
    signed_post(client, "/twilio/inbound", inbound_params("SM" + "4" * 32, MessagingServiceSid=service))
    run_worker(app)
    release = fake_twilio.creates[-1]
    assert dict(release.form)["Body"] == "reminder" and dict(release.form)["StatusCallback"] == "https://app/cb"
    assert "SendAt" not in dict(release.form) and "ScheduleType" not in dict(release.form)
    with db_engine.connect() as conn:
        assert conn.execute(select(held_messages.c.status)).scalar_one() == "released"


def test_a_release_that_leaves_its_message_held_is_queued_again_only_by_the_users_next_message(
        settings, db_engine, fake_twilio):
    """HOLD_ON_REROUTE off: a held message scheduled (SendAt) past the window's end stays held at release. The
    sweep queued another release at every poll (a day of them); now one per message of the user."""
    on = fallback_app(settings, fake_twilio, hold_on_reroute=True)
    send_at = (utcnow() + timedelta(hours=30)).isoformat().replace("+00:00", "Z")
    assert send(on.test_client(), {"To": USER, "From": BUSINESS, "Body": "reminder", "SendAt": send_at,
                                   "ScheduleType": "fixed", "MessagingServiceSid": "MG" + "1" * 32}
                ).headers["X-Proxy-Held-Id"]
    off = create_app(replace(on.extensions["proxy"].settings, hold_on_reroute=False))

    def releases():
        with db_engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(outbox).where(outbox.c.kind == "release")).scalar()

    signed_post(off.test_client(), "/twilio/inbound", inbound_params("SM" + "d" * 32))
    for _ in range(4):
        run_worker(off)
    assert releases() == 1
    signed_post(off.test_client(), "/twilio/inbound", inbound_params("SM" + "d" * 31 + "e"))
    for _ in range(3):
        run_worker(off)
    assert releases() == 2
    with db_engine.connect() as conn:
        assert conn.execute(select(held_messages.c.status)).scalar_one() == "held"  # still scheduled too late
    off.extensions["proxy"].engine.dispose()


def test_expired_holds_are_dropped_with_a_log_line(settings, db_engine, fake_twilio, log_lines):
    app = fallback_app(settings, fake_twilio, hold_on_reroute=True, hold_ttl_seconds=60)
    client = app.test_client()
    send(client, {"To": USER, "From": BUSINESS, "Body": "x"})
    run_worker(app, utcnow() + timedelta(seconds=61))
    with db_engine.connect() as conn:
        assert conn.execute(select(held_messages.c.status)).scalar_one() == "expired"
    [dropped] = [line for line in log_lines() if line["event"] == "hold_expired"]
    assert dropped["decision"] == "dropped" and dropped["user"] == "whatsapp:+1415*****11"
    fake_twilio.requests.clear()
    signed_post(client, "/twilio/inbound", inbound_params("SM" + "3" * 31 + "1"))
    assert run_worker(app) == 0 and fake_twilio.creates == []


def test_a_user_writing_while_the_fallback_is_in_flight_still_gets_the_held_message(
        settings, db_engine, fake_twilio, monkeypatch):
    """The user's message lands after Twilio took the fallback but before the hold is stored: its webhook
    finds nothing held, so storing the hold must see the newly opened window and queue the release."""
    app = fallback_app(settings, fake_twilio, hold_on_reroute=True)
    upstream = app.extensions["proxy"].upstream
    forward, inbound = upstream.request, []

    def twilio_answers_after_the_user_wrote(method, path, **kwargs):
        answer = forward(method, path, **kwargs)
        if not inbound:  # only the fallback create: the worker's release goes straight through
            writer = threading.Thread(target=lambda: inbound.append(
                signed_post(app.test_client(), "/twilio/inbound", inbound_params("SM" + "4" * 31 + "a"))))
            writer.start()
            writer.join()
        return answer

    monkeypatch.setattr(upstream, "request", twilio_answers_after_the_user_wrote)
    response = send(app.test_client(), {"To": USER, "From": BUSINESS, "Body": "order shipped"})
    assert [r.status_code for r in inbound] == [200]
    assert response.status_code == 201 and response.headers["X-Proxy-Decision"] == "rerouted"
    held_id = int(response.headers["X-Proxy-Held-Id"])
    assert [(i["kind"], i["target"]) for i in items(db_engine)] == [("release", f"{BUSINESS}\n{USER}")]
    assert run_worker(app) == 1
    assert [dict(r.form).get("Body") for r in fake_twilio.creates] == [None, "order shipped"]
    with db_engine.connect() as conn:
        assert conn.execute(select(held_messages.c.id, held_messages.c.status)).all() == [(held_id, "released")]


def test_a_hold_stored_in_a_window_the_judge_already_saw_queues_no_release(settings, db_engine, fake_twilio):
    """Rerouted inside the window (a carousel needing approval): only a new message from the user releases it."""
    app = fallback_app(settings, fake_twilio, hold_on_reroute=True)
    client = app.test_client()
    signed_post(client, "/twilio/inbound", inbound_params("SM" + "4" * 31 + "b"))
    carousel = fake_twilio.add_content({"twilio/carousel": {"body": "c", "cards": []}}, "pending")
    response = send(client, {"To": USER, "From": BUSINESS, "ContentSid": carousel})
    assert "X-Proxy-Held-Id" in response.headers
    assert items(db_engine) == []


def test_a_hold_the_database_refuses_after_twilio_took_the_fallback_still_answers_twilios_201(
        settings, db_engine, fake_twilio, log_lines, monkeypatch):
    """Twilio accepted the fallback: a 503 would make the caller send the template a second time."""
    app = fallback_app(settings, fake_twilio, hold_on_reroute=True)

    def refused(*args, **kwargs):
        raise OperationalError("INSERT INTO held_messages", {}, Exception("database is locked"))

    monkeypatch.setattr(holds, "hold", refused)
    response = send(app.test_client(), {"To": USER, "From": BUSINESS, "Body": "a private order note"})
    assert response.status_code == 201
    sid = response.get_json()["sid"]
    assert sid in fake_twilio.messages and len(fake_twilio.creates) == 1
    assert response.headers["X-Proxy-Decision"] == "rerouted"
    assert response.headers["X-Proxy-Rerouted-To"] == app.fallback_sid
    assert "X-Proxy-Held-Id" not in response.headers
    assert response.headers["X-Proxy-Hold-Failed"] == "database_error"
    [attempt] = attempts(db_engine)
    assert (attempt["decision"], attempt["outcome"], attempt["message_sid"]) == ("rerouted", "sent", sid)
    lines = log_lines()
    [failed] = [line for line in lines if line["event"] == "hold_failed"]
    assert failed["level"] == "ERROR" and failed["error"] == "OperationalError"
    assert failed["message_sid"] == sid and failed["user"] == "whatsapp:+1415*****11"
    assert [line["decision"] for line in lines if line["event"] == "send"] == ["rerouted"]
    written = json.dumps(lines)
    assert "private order note" not in written and AUTH_TOKEN not in written
    with db_engine.connect() as conn:
        assert conn.execute(select(held_messages)).all() == []


def test_a_drip_feeding_app_cannot_hold_twilios_webhook(settings, db_engine):
    """The inline forward has one overall deadline, not a per-read timeout: Twilio gets its answer at the
    deadline, the app is hung up on, and the outbox takes over."""
    url, hung_up = drip_server(b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nX-Slow: ")
    app = create_app(replace(settings, forward_inbound_url=url, forward_timeout_seconds=1.0, retry_schedule=SCHEDULE))
    response = signed_post(app.test_client(), "/twilio/inbound", inbound_params("SM" + "7" * 31 + "a"))
    assert response.status_code == 200 and response.get_data(as_text=True).endswith("<Response />")
    assert hung_up.wait(10)
    assert items(db_engine)[0]["status"] == "pending"  # the outbox takes over
    app.extensions["proxy"].engine.dispose()


def test_twilios_error_text_is_logged_and_kept_without_the_number(settings, db_engine, fake_twilio, log_lines):
    """Twilio's 21211 names the rejected `To` in its message: the release keeps its code and a masked message."""
    app = fallback_app(settings, fake_twilio, hold_on_reroute=True)
    client = app.test_client()
    send(client, {"To": USER, "From": BUSINESS, "Body": "held"})
    signed_post(client, "/twilio/inbound", inbound_params("SM" + "4" * 31 + "1"))
    fake_twilio.fail_with = (400, {"code": 21211, "message": f"The 'To' number {USER} is not a valid phone number.",
                                   "more_info": "https://www.twilio.com/docs/errors/21211", "status": 400})
    run_worker(app)
    with db_engine.connect() as conn:
        status, error = conn.execute(select(held_messages.c.status, held_messages.c.last_error)).one()
    [failed] = [line for line in log_lines() if line["event"] == "release" and line["decision"] == "failed"]
    assert status == "failed" and "21211" in error and failed["error"] == error
    assert "whatsapp:+1415*****11" in error
    assert "4155550111" not in json.dumps(log_lines()) and "4155550111" not in error


def test_a_page_that_is_not_twilios_error_is_never_logged_or_kept(settings, db_engine, fake_twilio, log_lines):
    """A firewall's 403 page quoting the request put the held message's body into the release line and
    held_messages.last_error; only its status is kept now."""
    app = fallback_app(settings, fake_twilio, hold_on_reroute=True)
    client = app.test_client()
    send(client, {"To": USER, "From": BUSINESS, "Body": "held secret 4111"})
    signed_post(client, "/twilio/inbound", inbound_params("SM" + "4" * 31 + "2"))
    fake_twilio.fail_with = (403, "<html>Request blocked: To=whatsapp%3A%2B1&Body=held+secret+4111</html>")
    run_worker(app)
    with db_engine.connect() as conn:
        status, error = conn.execute(select(held_messages.c.status, held_messages.c.last_error)).one()
    [failed] = [line for line in log_lines() if line["event"] == "release" and line["decision"] == "failed"]
    assert status == "failed" and "403" in error and failed["error"] == error
    assert "secret" not in error and "held+secret" not in json.dumps(log_lines())


def test_a_release_twilio_may_have_received_is_left_uncertain_and_never_sent_again(settings, db_engine, fake_twilio,
                                                                                   log_lines):
    """A 5xx from Twilio may come after it accepted the message: retrying could send it twice. `uncertain`, said at
    ERROR, as a fallback's is: not `failed`, which says Twilio refused it."""
    app = fallback_app(settings, fake_twilio, hold_on_reroute=True)
    client = app.test_client()
    release_answered(client, fake_twilio, 500, 20500, "Internal Server Error", sid_suffix="2")

    def releases():
        return [r for r in fake_twilio.requests if r.method == "POST" and dict(r.form).get("Body") == "held"]

    run_worker(app)
    assert len(releases()) == 1
    fake_twilio.fail_with = None
    for _ in range(2):
        run_worker(app, utcnow() + timedelta(days=1))  # long after any retry would have been due
    with db_engine.connect() as conn:
        status, error = conn.execute(select(held_messages.c.status, held_messages.c.last_error)).one()
    assert status == "uncertain" and "500" in error and "may have been accepted" in error
    assert len(releases()) == 1
    [line] = [line for line in log_lines() if line["event"] == "release" and line["decision"] == "uncertain"]
    assert line["level"] == "ERROR"
    assert client.get("/v1/held?status=uncertain", headers=basic_auth()).get_json()["held"][0]["status"] == "uncertain"
    text = client.get("/metrics", headers=basic_auth()).get_data(as_text=True)
    assert 'proxy_held_messages{status="uncertain"} 1.0' in text and 'proxy_held_messages{status="held"} 0.0' in text


def test_a_long_release_keeps_its_lease_whatever_its_messages_outcome(settings, db_engine, fake_twilio):
    """The lease was renewed only after a message released: a run of creates Twilio answered 5xx (each left
    `uncertain`) outlasted it, and a second worker claimed the same release and ran it beside the first."""
    app = fallback_app(settings, fake_twilio, hold_on_reroute=True, twilio_timeout_seconds=0.5,
                       outbox_lease_seconds=3)
    client = app.test_client()
    for i in range(20):
        assert send(client, {"To": USER, "From": BUSINESS, "Body": f"held-{i:02d}"}).headers["X-Proxy-Held-Id"]
    signed_post(client, "/twilio/inbound", inbound_params("SM" + "7" * 32))
    fake_twilio.delay = 0.3  # 20 creates: twice the lease
    fake_twilio.fail_with = (500, {"code": 20500, "message": "x", "more_info": "", "status": 500})
    rt = app.extensions["proxy"]
    first = threading.Thread(target=lambda: Worker(rt).run_once())
    first.start()
    try:
        time.sleep(4)  # past the claim's lease, the first release still running
        assert first.is_alive()
        assert Worker(rt).run_once() == 0  # nothing to claim: the release is still the first worker's
    finally:
        first.join()
    with db_engine.connect() as conn:
        assert conn.execute(select(outbox.c.status).where(outbox.c.kind == "release")).scalar_one() == "delivered"
        assert set(conn.execute(select(held_messages.c.status)).scalars()) == {"uncertain"}


def test_an_attempt_that_lost_its_lease_records_no_outcome(db_engine):
    """Only the attempt holding the lease marks an item delivered: one that overran it must not overwrite what the
    worker that claimed it since recorded, nor mark done what that worker is still delivering."""
    at = utcnow()
    with db_engine.begin() as conn:
        item_id = outbox_items.enqueue(conn, kind="inbound", ordering_key="k", target="http://app", headers={},
                                       body=[], now=at, lease_until=at + timedelta(seconds=5))
        assert not outbox_items.delivered(conn, item_id, at, at + timedelta(seconds=9))  # another lease
        conn.execute(update(outbox).where(outbox.c.id == item_id).values(status="uncertain"))
        assert not outbox_items.delivered(conn, item_id, at, at + timedelta(seconds=5))  # another outcome
        assert conn.execute(select(outbox.c.status).where(outbox.c.id == item_id)).scalar_one() == "uncertain"
        conn.execute(update(outbox).where(outbox.c.id == item_id).values(status="pending"))
        assert outbox_items.delivered(conn, item_id, at, at + timedelta(seconds=5))
        assert conn.execute(select(outbox.c.status).where(outbox.c.id == item_id)).scalar_one() == "delivered"


def test_a_held_message_can_be_canceled_before_its_release(settings, db_engine, fake_twilio, log_lines):
    """An order canceled, a user who opted out: the app had no way to withdraw what it had been told was held."""
    app = fallback_app(settings, fake_twilio, hold_on_reroute=True)
    client = app.test_client()
    kept = send(client, {"To": USER, "From": BUSINESS, "Body": "kept"})
    dropped = send(client, {"To": USER, "From": BUSINESS, "Body": "withdrawn"})
    kept_id, dropped_id = (int(r.headers["X-Proxy-Held-Id"]) for r in (kept, dropped))
    one = client.get(f"/v1/held/{dropped_id}", headers=basic_auth()).get_json()
    assert (one["status"], one["request_id"]) == ("held", dropped.headers["X-Request-Id"])  # what the send was told
    assert client.delete(f"/v1/held/{dropped_id}").status_code == 401
    for _ in range(2):  # a DELETE repeated is answered alike
        assert client.delete(f"/v1/held/{dropped_id}", headers=basic_auth()).status_code == 204
    assert len([line for line in log_lines() if line["event"] == "hold_canceled"]) == 1
    signed_post(client, "/twilio/inbound", inbound_params("SM" + "4" * 31 + "7"))
    run_worker(app)
    assert [dict(r.form).get("Body") for r in fake_twilio.creates if dict(r.form).get("Body")] == ["kept"]
    listed = client.get("/v1/held?status=all", headers=basic_auth()).get_json()["held"]
    statuses = {h["id"]: h["status"] for h in listed}
    assert statuses == {kept_id: "released", dropped_id: "canceled"}
    late = client.delete(f"/v1/held/{kept_id}", headers=basic_auth())  # sent already: nothing to withdraw
    assert late.status_code == 409 and late.get_json()["code"] == 409 and "released" in late.get_json()["message"]
    missing = client.delete("/v1/held/999999", headers=basic_auth())
    assert missing.status_code == 404 and missing.get_json()["code"] == 20404
    # Past the column's range (a 500), other scripts' digits and leading zeros (aliases of a real id): no such id.
    for path in ("999999", str(2**63), "9" * 400, "\u0661", f"0{kept_id}", "0", "-1", "abc"):
        for method in (client.get, client.delete):
            answer = method(f"/v1/held/{path}", headers=basic_auth())
            assert answer.status_code == 404 and answer.get_json()["code"] == 20404, (path, answer.status_code)
    # The CLI does the same.
    again = int(send(client, {"To": "whatsapp:+14155550199", "From": BUSINESS, "Body": "x"}).headers["X-Proxy-Held-Id"])
    runner = app.test_cli_runner()
    result = runner.invoke(args=["held", "cancel", str(again)])
    assert result.exit_code == 0 and f"held message {again} canceled" in result.output
    refused = runner.invoke(args=["held", "cancel", str(kept_id)])
    assert refused.exit_code == 1 and "released" in refused.output
    text = client.get("/metrics", headers=basic_auth()).get_data(as_text=True)
    assert 'proxy_held_messages{status="canceled"} 2.0' in text


def release_answered(client, fake_twilio, status, code, message, *, sid_suffix):
    """A message held, the user writing again, and Twilio answering its release's create with `status`."""
    send(client, {"To": USER, "From": BUSINESS, "Body": "held"})
    signed_post(client, "/twilio/inbound", inbound_params("SM" + "4" * 31 + sid_suffix))
    fake_twilio.fail_with = (status, {"code": code, "message": message,
                                      "more_info": f"https://www.twilio.com/docs/errors/{code}", "status": status})


def test_a_release_twilio_refused_is_failed_at_warning(settings, db_engine, fake_twilio, log_lines):
    app = fallback_app(settings, fake_twilio, hold_on_reroute=True)
    release_answered(app.test_client(), fake_twilio, 400, 21610, "Attempt to send to unsubscribed recipient",
                     sid_suffix="3")
    run_worker(app)
    with db_engine.connect() as conn:
        assert conn.execute(select(held_messages.c.status)).scalar_one() == "failed"
    [line] = [line for line in log_lines() if line["event"] == "release" and line["decision"] == "failed"]
    assert line["level"] == "WARNING" and "21610" in line["error"]


def stuck_release(app, client, db_engine, fake_twilio, monkeypatch, *, sid_suffix):
    """A release whose create Twilio answered, but whose outcome could not be stored (the database went away
    right then): the held row is left `sending`."""
    send(client, {"To": USER, "From": BUSINESS, "Body": "held"})
    signed_post(client, "/twilio/inbound", inbound_params("SM" + "4" * 31 + sid_suffix))
    real_mark = holds.mark

    def database_gone(conn, held_id, status, now, **kwargs):
        if status == holds.RELEASED:
            raise OperationalError("UPDATE held_messages", {}, Exception("server closed the connection"))
        return real_mark(conn, held_id, status, now, **kwargs)

    monkeypatch.setattr(holds, "mark", database_gone)
    run_worker(app)
    monkeypatch.setattr(holds, "mark", real_mark)
    with db_engine.connect() as conn:
        assert conn.execute(select(held_messages.c.status)).scalar_one() == "sending"


def test_a_held_message_left_sending_is_settled_from_its_attempt_after_a_lease(settings, db_engine, fake_twilio,
                                                                                log_lines, monkeypatch):
    """It stayed `sending` for good, with no line, and its sid was never recorded (the review's repro B)."""
    app = fallback_app(settings, fake_twilio, hold_on_reroute=True)
    client = app.test_client()
    stuck_release(app, client, db_engine, fake_twilio, monkeypatch, sid_suffix="4")
    [create] = [r for r in fake_twilio.creates if dict(r.form).get("Body") == "held"]
    [sid] = [m["sid"] for m in fake_twilio.messages.values() if m["body"] == "held"]
    run_worker(app, utcnow() + timedelta(seconds=settings.outbox_lease_seconds - 5))  # its worker may still be at it
    with db_engine.connect() as conn:
        assert conn.execute(select(held_messages.c.status)).scalar_one() == "sending"
    run_worker(app, utcnow() + timedelta(seconds=settings.outbox_lease_seconds + 1))
    with db_engine.connect() as conn:
        status, message_sid = conn.execute(select(held_messages.c.status, held_messages.c.message_sid)).one()
    assert (status, message_sid) == ("released", sid)
    [line] = [line for line in log_lines() if line["event"] == "release" and line.get("reason") == "abandoned"]
    assert (line["decision"], line["message_sid"], line["level"]) == ("released", sid, "INFO")
    assert [r for r in fake_twilio.creates if dict(r.form).get("Body") == "held"] == [create]  # never sent twice


def test_a_held_message_whose_worker_died_during_the_create_becomes_uncertain(settings, db_engine, fake_twilio,
                                                                                log_lines):
    app = fallback_app(settings, fake_twilio, hold_on_reroute=True)
    client = app.test_client()
    held_id = int(send(client, {"To": USER, "From": BUSINESS, "Body": "held"}).headers["X-Proxy-Held-Id"])
    with db_engine.begin() as conn:  # taken for sending by a worker that was then killed: no attempt row
        assert holds.take(conn, held_id, utcnow())
    signed_post(client, "/twilio/inbound", inbound_params("SM" + "4" * 31 + "5"))
    run_worker(app, utcnow() + timedelta(seconds=settings.outbox_lease_seconds + 1))
    with db_engine.connect() as conn:
        status, error = conn.execute(select(held_messages.c.status, held_messages.c.last_error)).one()
    assert status == "uncertain" and "Twilio may have taken it" in error
    [line] = [line for line in log_lines() if line["event"] == "release" and line.get("reason") == "abandoned"]
    assert (line["decision"], line["level"], line["held_id"]) == ("uncertain", "ERROR", held_id)
    assert not [r for r in fake_twilio.creates if dict(r.form).get("Body") == "held"]


def test_an_inline_forward_that_lost_its_lease_says_so_and_leaves_the_item_to_its_worker(
        forwarding, fake_app, db_engine, monkeypatch, log_lines):
    """Its write of `delivered` is skipped (the worker that claimed the item records the outcome): the line said
    `delivered` as if it had been recorded."""
    rt = forwarding.extensions["proxy"]
    real_post = rt.forwarder.post

    def post_while_a_worker_claims_it(url, pairs, kept, timeout=None):
        reply = real_post(url, pairs, kept, timeout=timeout)
        with db_engine.begin() as conn:  # the inline lease ran out meanwhile, and a worker claimed the item
            conn.execute(update(outbox).values(lease_until=utcnow() + timedelta(seconds=60)))
        return reply

    monkeypatch.setattr(rt.forwarder, "post", post_while_a_worker_claims_it)
    assert signed_post(forwarding.test_client(), "/twilio/inbound", inbound_params("SM" + "9" * 32)).status_code == 200
    [item] = items(db_engine)
    assert item["status"] == "pending"
    [line] = [line for line in log_lines() if line["event"] == "delivery"]
    assert (line["decision"], line["outcome"], line["level"]) == ("delivered", "lease_lost", "WARNING")


def test_a_held_message_whose_worker_died_after_twilio_refused_to_connect_is_released_again(
        settings, db_engine, fake_twilio, log_lines):
    """Settled back to `held` (Twilio never took it), it had no release coming: its own had gone on without it,
    and it waited for the user's next message although the window was open."""
    app = fallback_app(settings, fake_twilio, hold_on_reroute=True)
    client = app.test_client()
    held_id = int(send(client, {"To": USER, "From": BUSINESS, "Body": "held"}).headers["X-Proxy-Held-Id"])
    with db_engine.begin() as conn:  # a worker took it, Twilio was unreachable, and the worker died then
        assert holds.take(conn, held_id, utcnow())
        request_id = conn.execute(select(held_messages.c.request_id)).scalar_one()
        conn.execute(send_attempts.insert().values(
            request_id=request_id, created_at=utcnow(), account_sid=ACCOUNT_SID, decision=holds.RELEASE_DECISION,
            reason="window_open", sender=BUSINESS, user=USER, channel="whatsapp", outcome="upstream_unreachable",
            params="[]", duration_ms=1))
    signed_post(client, "/twilio/inbound", inbound_params("SM" + "4" * 31 + "6"))  # its window open
    run_worker(app)  # the release the user's message queued: it finds the message still `sending`
    assert not [r for r in fake_twilio.creates if dict(r.form).get("Body") == "held"]
    later = utcnow() + timedelta(seconds=settings.outbox_lease_seconds + 1)
    run_worker(app, later)  # settled `held`, and its release queued
    run_worker(app, later)
    with db_engine.connect() as conn:
        assert conn.execute(select(held_messages.c.status)).scalar_one() == "released"
    assert len([r for r in fake_twilio.creates if dict(r.form).get("Body") == "held"]) == 1


def test_a_late_failure_never_reopens_an_item_delivered_meanwhile(forwarding, fake_app, db_engine):
    """An inline attempt that overran its lease reports failure after the worker delivered the item."""
    from proxy import outbox as outbox_module

    fake_app.fail_status = 503
    signed_post(forwarding.test_client(), "/twilio/inbound", inbound_params("SM" + "7" * 32))
    [item] = items(db_engine)
    fake_app.reset()
    assert run_worker(forwarding, utcnow() + timedelta(seconds=6)) == 1
    with db_engine.begin() as conn:
        status = outbox_module.failed(conn, item["id"], "no answer", utcnow(), SCHEDULE)
    assert status == "delivered"
    assert [(i["status"], i["attempts"]) for i in items(db_engine)] == [("delivered", 2)]


def test_a_claim_takes_the_longest_due_first_one_per_conversation_in_the_indexs_order(db_engine):
    """After an outage thousands of items wait: a claim walks the (status, next_attempt_at, id) index, checks
    each candidate's conversation in one range of (ordering_key, status, id), leases by primary key, and
    stops at its limit. In id order it read and sorted every pending item (SQLite 47 ms a claim at 24,000)."""
    now = utcnow()
    with db_engine.begin() as conn:
        # Conversation a: two items, its second (a retry's new due time can be earlier) due first; b and c: one each.
        ids = [outbox_items.enqueue(conn, kind="inbound", ordering_key=key, target="http://127.0.0.1:9/app",
                                    headers={}, body=[], now=now, due=now - timedelta(seconds=due))
               for key, due in (("a", 30), ("b", 10), ("a", 40), ("c", 20))]
        claimed = outbox_items.claim(conn, now, LEASE_SECONDS, limit=2)
        assert [i.id for i in claimed] == [ids[0], ids[3]]  # a's second, due first of all, waits for its first
        assert [i.id for i in outbox_items.claim(conn, now, LEASE_SECONDS)] == [ids[1]]
        if conn.dialect.name == "sqlite":  # PostgreSQL's plan depends on its statistics of the table
            claim = outbox_items._statement(conn, "claim")
            values = claim._compiled.construct_params({"now": now, "limit": 10, "lease": now})
            for name, convert in claim._bind_conversions:
                values[name] = convert(values[name])
            plan = [row[-1] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + claim.sql,
                                                            tuple(values[name] for name in claim._positions))]
            assert "SEARCH outbox USING INTEGER PRIMARY KEY (rowid=?)" in plan, plan
            assert any("ix_outbox_status_next_attempt_at_id (status=? AND next_attempt_at<?)" in p for p in plan), plan
            assert any("ix_outbox_ordering_key_status_id (ordering_key=? AND status=? AND id<?)" in p for p in plan), plan
            assert not any("TEMP B-TREE" in p for p in plan), plan


@pytest.mark.parametrize("earlier, expected", [
    ([], None),                                           # the conversation's first
    ([("pending", 30)], "in_flight"),                     # one being delivered (leased) right now
    ([("pending", None)], "queued"),                      # one waiting for a retry
    ([("pending", -5)], "queued"),                        # one whose lease ran out: the worker's now
    ([("pending", 30), ("pending", None)], "queued"),     # any one waiting: the worker keeps the order
    ([("delivered", None)], None),
    ([("exhausted", None)], None),
])
def test_a_forwarded_webhooks_item_is_stored_with_whose_turn_it_is(db_engine, earlier, expected):
    """enqueue_in_turn answers as enqueue then earlier_pending would (on PostgreSQL in one statement): only
    earlier pending items of the same conversation count, and its id goes into the forward's headers."""
    now, key = utcnow(), f"inbound:{BUSINESS}|{USER}"
    with db_engine.begin() as conn:
        for status, lease_in in earlier:
            item_id = outbox_items.enqueue(conn, kind="inbound", ordering_key=key, target="http://127.0.0.1:9/app",
                                           headers={}, body=[], now=now)
            lease = now + timedelta(seconds=lease_in) if lease_in is not None else None
            conn.execute(update(outbox).where(outbox.c.id == item_id).values(status=status, lease_until=lease))
        # Another conversation's pending item, and a later one of this conversation, never count.
        outbox_items.enqueue(conn, kind="inbound", ordering_key=key + "0", target="x", headers={}, body=[], now=now)
        headers = {"X-Twilio-Signature": "s", outbox_items.OUTBOX_ID_HEADER: "stale"}
        lease = now + timedelta(seconds=20)
        item_id, turn = outbox_items.enqueue_in_turn(conn, kind="inbound", ordering_key=key,
                                                     target="http://127.0.0.1:9/app", headers=headers,
                                                     body=[["Body", "hi"]], now=now, lease_until=lease, checked_at=now)
        assert turn == expected
        assert headers[outbox_items.OUTBOX_ID_HEADER] == str(item_id)
        assert outbox_items.earlier_pending(conn, key, item_id, now) == expected
        row = conn.execute(select(outbox).where(outbox.c.id == item_id)).one()._mapping
        assert (row["status"], row["lease_until"], row["attempts"], json.loads(row["headers"]), json.loads(row["body"])) \
            == ("pending", lease, 0, {"X-Twilio-Signature": "s"}, [["Body", "hi"]])


def test_a_failure_reported_after_another_worker_claimed_the_item_leaves_it_to_that_worker(
        forwarding, fake_app, db_engine):
    """The inline attempt overran its lease and a worker claimed the item: the stale failure must not
    reschedule it (a third claimer would deliver it while the worker still does)."""
    from proxy import outbox as outbox_module

    fake_app.fail_status = 503
    signed_post(forwarding.test_client(), "/twilio/inbound", inbound_params("SM" + "8" * 32))
    [item] = items(db_engine)
    later = utcnow() + timedelta(seconds=6)
    with db_engine.begin() as conn:
        [claimed] = outbox_module.claim(conn, later, LEASE_SECONDS)
        stale_lease = utcnow() - timedelta(seconds=1)  # the lease the overrun attempt held
        assert outbox_module.failed(conn, item["id"], "no answer", later, SCHEDULE, lease=stale_lease) == "pending"
        # Still the worker's: nobody else can claim it until its lease ends.
        assert outbox_module.claim(conn, later + timedelta(seconds=1), LEASE_SECONDS) == []
        assert outbox_module.failed(conn, item["id"], "no answer", later, SCHEDULE,
                                    lease=claimed.lease_until) == "pending"
        assert outbox_module.claim(conn, later + timedelta(seconds=1), LEASE_SECONDS) == []  # not due yet
    [row] = items(db_engine)
    assert row["attempts"] == 2 and row["lease_until"] is None


def test_a_stale_failure_waiting_on_another_workers_claim_leaves_the_item_to_that_worker(db_engine):
    """PostgreSQL: the stale attempt read the row (its own lease still there) while another worker's claim was
    uncommitted, then its update waited on that claim's row lock and rechecked only the status: it wiped the new
    lease, so the item went to a third worker and the claimer's delivery was not recorded."""
    from proxy import outbox as outbox_module

    if db_engine.dialect.name != "postgresql":
        pytest.skip("SQLite writers take turns on the proxy's write lock: a claim and a failure never overlap")
    start = utcnow()
    with db_engine.begin() as conn:
        item_id = outbox_module.enqueue(conn, kind="inbound", ordering_key="inbound:a|b", target="http://x",
                                        headers={}, body=[], now=start)
    with db_engine.begin() as conn:
        [stale] = outbox_module.claim(conn, start, 120)  # its attempt then overruns the lease
    later = start + timedelta(seconds=200)
    claimer = db_engine.connect()
    claim = claimer.begin()
    [claimed] = outbox_module.claim(claimer, later, 120)
    result = []

    def stale_failure():
        with db_engine.begin() as conn:
            result.append(outbox_module.failed(conn, item_id, "app 503", later, SCHEDULE, lease=stale.lease_until))

    thread = threading.Thread(target=stale_failure)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        with db_engine.connect() as watcher:  # until the stale update waits on the claim's row lock
            while thread.is_alive() and time.monotonic() < deadline and not watcher.execute(
                    text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")).scalar():
                time.sleep(0.01)
        assert thread.is_alive(), "the stale failure did not wait on the claim"
    finally:
        claim.commit()
        claimer.close()
        thread.join(10)
    assert result == ["pending"]  # the claimer's, untouched
    with db_engine.begin() as conn:
        assert outbox_module.delivered(conn, item_id, later + timedelta(seconds=1), claimed.lease_until)
        assert conn.execute(select(outbox.c.status).where(outbox.c.id == item_id)).scalar_one() == "delivered"


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once it is closed: connection refused


def fallback_creates(app, fake_twilio):
    return [r for r in fake_twilio.creates if dict(r.form).get("ContentSid") == app.fallback_sid]


def test_a_fallback_twilio_may_have_taken_is_left_uncertain_and_never_sent_again(
        settings, db_engine, fake_twilio, log_lines):
    """Only a create Twilio never received goes back in line; one it may have taken (a 5xx, no answer) is
    left `uncertain` for an operator: the worker never sends it again, nor does `outbox replay --all`."""
    app = fallback_app(settings, fake_twilio)
    client = app.test_client()
    signed_post(client, "/twilio/inbound", inbound_params("SM" + "5" * 31 + "a"))
    sid = send(client, {"To": USER, "From": BUSINESS, "Body": "x"}).get_json()["sid"]
    signed_post(client, "/twilio/status", failed_callback(sid))
    unreachable = create_app(replace(app.extensions["proxy"].settings,
                                     twilio_api_base_url=f"http://127.0.0.1:{closed_port()}"))
    assert run_worker(unreachable) == 1
    [item] = [i for i in items(db_engine) if i["kind"] == "send"]
    assert (item["status"], item["attempts"]) == ("pending", 1)  # refused before sending: tried again
    fake_twilio.fail_with = (500, {"code": 20500, "message": "Internal Server Error",
                                   "more_info": "https://www.twilio.com/docs/errors/20500", "status": 500})
    assert run_worker(app, utcnow() + timedelta(seconds=6)) == 1
    assert len(fallback_creates(app, fake_twilio)) == 1
    [item] = [i for i in items(db_engine) if i["kind"] == "send"]
    assert item["status"] == "uncertain" and "500" in item["last_error"]
    [line] = [line for line in log_lines() if line["event"] == "delivery" and line.get("outcome") == "uncertain"]
    assert line["level"] == "ERROR" and line["outbox_id"] == item["id"]
    fake_twilio.fail_with = None
    runner = app.test_cli_runner()
    assert "0 item(s)" in runner.invoke(args=["outbox", "replay", "--all"]).output
    for later in (timedelta(days=1), timedelta(days=30)):
        run_worker(app, utcnow() + later)
    assert len(fallback_creates(app, fake_twilio)) == 1
    listed = runner.invoke(args=["outbox", "list", "--status", "uncertain"])
    assert listed.exit_code == 0 and json.loads(listed.stdout.splitlines()[0])["id"] == item["id"]
    # An operator who found it missing from Twilio's Messages list sends it again, by its id.
    assert "1 item(s)" in runner.invoke(args=["outbox", "replay", str(item["id"])]).output
    assert run_worker(app) == 1 and len(fallback_creates(app, fake_twilio)) == 2
    unreachable.extensions["proxy"].engine.dispose()


def behind(app, monkeypatch) -> list:
    """The process's attempt writer has not stored what it was given (a lock, a busy database): the rows
    it was handed, to store later with `store_attempts`."""
    rows = []
    monkeypatch.setattr(app.extensions["proxy"].attempts, "submit", rows.append)
    return rows


def store_attempts(engine, rows):
    with engine.begin() as conn:
        conn.execute(send_attempts.insert(), rows)


def late_lines(log_lines, sid=None):
    return [line for line in log_lines() if line["event"] == "late_window_failure"
            and (sid is None or line["message_sid"] == sid)]


def window_open(client, user=USER):
    return client.get(f"/v1/windows?sender={BUSINESS}&user={user}", headers=basic_auth()).get_json()["open"]


@pytest.mark.parametrize("user_wrote_since", [False, True])
def test_a_late_63016_handled_by_another_process_before_the_send_is_recorded_is_acted_on_later(
        settings, db_engine, fake_twilio, log_lines, monkeypatch, user_wrote_since):
    """Process A made the send; its attempt row is not stored yet when process B takes the callback."""
    a = fallback_app(settings, fake_twilio)
    b = create_app(a.extensions["proxy"].settings)
    unstored = behind(a, monkeypatch)
    signed_post(a.test_client(), "/twilio/inbound", inbound_params("SM" + "6" * 31 + "a"))
    sid = send(a.test_client(), {"To": USER, "From": BUSINESS, "Body": "x"}).get_json()["sid"]
    if user_wrote_since:  # a new window, opened after the send came in: the 63016 says nothing about it
        signed_post(a.test_client(), "/twilio/inbound", inbound_params("SM" + "6" * 31 + "b"))
    assert signed_post(b.test_client(), "/twilio/status", failed_callback(sid)).status_code == 200
    store_attempts(db_engine, unstored)
    assert run_worker(b, utcnow() + timedelta(seconds=6)) == 1
    assert window_open(b.test_client()) is user_wrote_since
    [late] = late_lines(log_lines)
    # It said `closed` when it had closed nothing.
    assert (late["decision"], late["message_sid"]) == (
        "kept_open_and_rerouted" if user_wrote_since else "closed_and_rerouted", sid)
    assert run_worker(b, utcnow() + timedelta(seconds=6)) == 1
    assert len(fallback_creates(a, fake_twilio)) == 1
    b.extensions["proxy"].engine.dispose()


def test_a_late_63016_is_acted_on_once_whichever_path_sees_its_send_first(
        settings, db_engine, fake_twilio, log_lines, monkeypatch):
    """Twilio may repeat a callback: the deferred check and a repeat handled at once act once per sid."""
    a = fallback_app(settings, fake_twilio)
    b = create_app(a.extensions["proxy"].settings)
    unstored = behind(a, monkeypatch)
    signed_post(a.test_client(), "/twilio/inbound", inbound_params("SM" + "6" * 31 + "c"))
    deferred_first, immediate_first = (send(a.test_client(), {"To": USER, "From": BUSINESS, "Body": body})
                                       .get_json()["sid"] for body in ("one", "two"))
    for sid in (deferred_first, immediate_first):
        signed_post(b.test_client(), "/twilio/status", failed_callback(sid))
    store_attempts(db_engine, unstored)
    signed_post(b.test_client(), "/twilio/status", failed_callback(immediate_first))  # the send is recorded now
    assert [line["message_sid"] for line in late_lines(log_lines)] == [immediate_first]
    while run_worker(b, utcnow() + timedelta(seconds=6)):
        pass
    acted = sorted([deferred_first, immediate_first])
    assert sorted(line["message_sid"] for line in late_lines(log_lines)) == acted
    signed_post(b.test_client(), "/twilio/status", failed_callback(deferred_first))  # Twilio repeats it
    run_worker(b, utcnow() + timedelta(seconds=6))
    assert sorted(line["message_sid"] for line in late_lines(log_lines)) == acted
    assert len(fallback_creates(a, fake_twilio)) == 2  # one per sid
    with db_engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(late_failures)).scalar_one() == 2
    b.extensions["proxy"].engine.dispose()


def test_a_late_63016_whose_send_is_never_recorded_is_logged_once_as_not_the_proxys(
        settings, db_engine, fake_twilio, log_lines):
    """Checked again a bounded number of times, then said once, at INFO, and finished."""
    app = fallback_app(settings, fake_twilio)
    client = app.test_client()
    signed_post(client, "/twilio/inbound", inbound_params("SM" + "6" * 31 + "d"))
    sid = "SM" + "6" * 31 + "e"  # sent by someone else on the account, straight to Twilio
    assert signed_post(client, "/twilio/status", failed_callback(sid)).status_code == 200
    checks = 0
    while run_worker(app, utcnow() + timedelta(hours=1)):
        checks += 1
        assert checks < 10
    assert checks > 1
    [late] = late_lines(log_lines)
    assert (late["level"], late["decision"], late["message_sid"]) == ("INFO", "not_a_proxy_send", sid)
    assert all(line["level"] == "INFO" for line in log_lines() if line["event"] == "delivery")
    assert window_open(client) is True and fake_twilio.creates == []
    assert [(i["kind"], i["status"]) for i in items(db_engine)] == [("late_failure", "delivered")]
    with db_engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(late_failures)).scalar_one() == 0


def test_a_late_63016_on_a_released_message_closes_the_window_like_any_send(
        settings, db_engine, fake_twilio, log_lines):
    app = fallback_app(settings, fake_twilio, hold_on_reroute=True)
    client = app.test_client()
    send(client, {"To": USER, "From": BUSINESS, "Body": "held then released"})
    signed_post(client, "/twilio/inbound", inbound_params("SM" + "7" * 31 + "c"))
    assert run_worker(app) == 1
    [released] = client.get("/v1/held?status=released", headers=basic_auth()).get_json()["held"]
    [attempt] = [a for a in attempts(db_engine) if a["message_sid"] == released["message_sid"]]
    assert (attempt["decision"], attempt["reason"], attempt["outcome"]) == ("released", "window_open", "sent")
    assert signed_post(client, "/twilio/status", failed_callback(released["message_sid"])).status_code == 200
    assert window_open(client) is False
    [late] = late_lines(log_lines)
    assert (late["decision"], late["message_sid"]) == ("closed_and_rerouted", released["message_sid"])
    assert run_worker(app) == 1
    assert len(fallback_creates(app, fake_twilio)) == 2  # the reroute's, then the late failure's
    # HOLD_ON_REROUTE: the message itself is held again, under the id its caller was given, for the user's next one.
    [again] = client.get("/v1/held", headers=basic_auth()).get_json()["held"]
    assert (again["id"], again["status"], again["message_sid"]) == (released["id"], "held", None)
    assert late["held_id"] == released["id"] and "63016 after its release" in again["last_error"]
    signed_post(client, "/twilio/inbound", inbound_params("SM" + "7" * 31 + "d"))
    assert run_worker(app) == 1
    assert [dict(r.form)["Body"] for r in fake_twilio.creates if "Body" in dict(r.form)] == ["held then released"] * 2


@pytest.mark.parametrize("user_wrote_since", [False, True])
def test_a_late_63016_on_an_allowed_send_holds_it_when_hold_on_reroute_is_on(
        settings, db_engine, fake_twilio, log_lines, user_wrote_since):
    """The fallback went out for it, as for a send rerouted at once; and, as for one, the message is kept."""
    app = fallback_app(settings, fake_twilio, hold_on_reroute=True)
    client = app.test_client()
    signed_post(client, "/twilio/inbound", inbound_params("SM" + "7" * 31 + "e"))
    sid = send(client, {"To": USER, "From": BUSINESS, "Body": "allowed then failed",
                        "StatusCallback": "https://app/cb"}).get_json()["sid"]
    if user_wrote_since:  # after WhatsApp's try: the window stays open, and the message goes out again at once
        signed_post(client, "/twilio/inbound", inbound_params("SM" + "7" * 31 + "f"))
    signed_post(client, "/twilio/status", failed_callback(sid))
    [late] = late_lines(log_lines)
    [held] = client.get("/v1/held?status=all", headers=basic_auth()).get_json()["held"]
    assert late["held_id"] == held["id"]
    run_worker(app)
    bodies = [dict(r.form) for r in fake_twilio.creates if dict(r.form).get("Body") == "allowed then failed"]
    assert len(bodies) == (2 if user_wrote_since else 1) and bodies[-1]["StatusCallback"] == "https://app/cb"
    [held] = client.get("/v1/held?status=all", headers=basic_auth()).get_json()["held"]
    assert held["status"] == ("released" if user_wrote_since else "held")


@pytest.mark.parametrize("sent_by", ["worker", "gateway"])
def test_a_late_63016_on_a_fallback_closes_the_window_and_sends_no_other_fallback(
        settings, db_engine, fake_twilio, log_lines, sent_by):
    """Each fallback has a new sid: another one for its failure could loop for ever."""
    app = fallback_app(settings, fake_twilio)
    client = app.test_client()
    signed_post(client, "/twilio/inbound", inbound_params("SM" + "7" * 31 + "d"))
    if sent_by == "worker":  # a late 63016 on a free-form send queued it
        sid = send(client, {"To": USER, "From": BUSINESS, "Body": "x"}).get_json()["sid"]
        signed_post(client, "/twilio/status", failed_callback(sid))
        signed_post(client, "/twilio/inbound", inbound_params("SM" + "7" * 31 + "e"))  # the window opens again
        assert run_worker(app) == 1
    else:  # rerouted in the window: a carousel needs an approval it lacks
        carousel = fake_twilio.add_content({"twilio/carousel": {"body": "c", "cards": []}}, "pending")
        assert send(client, {"To": USER, "From": BUSINESS, "ContentSid": carousel}).headers["X-Proxy-Decision"] \
            == "rerouted"
    assert len(fallback_creates(app, fake_twilio)) == 1
    fallback_sid = list(fake_twilio.messages)[-1]  # the fallback is the last create either way
    [attempt] = [a for a in attempts(db_engine) if a["message_sid"] == fallback_sid]
    assert attempt["decision"] == ("fallback" if sent_by == "worker" else "rerouted")
    assert window_open(client) is True
    before = len(items(db_engine))
    assert signed_post(client, "/twilio/status", failed_callback(fallback_sid)).status_code == 200
    assert window_open(client) is False
    late = late_lines(log_lines, fallback_sid)
    assert [(line["decision"], line["fallback_content_sid"]) for line in late] == [("closed", None)]
    assert len(items(db_engine)) == before and run_worker(app) == 0
    assert len(fallback_creates(app, fake_twilio)) == 1


def test_a_fallback_twilio_took_with_a_sid_that_is_not_text_is_delivered_not_uncertain(settings, db_engine,
                                                                                       fake_twilio):
    """The recorded attempt's sid went through storable(), whose TypeError replaced the create's success."""
    app = fallback_app(settings, fake_twilio)
    client = app.test_client()
    signed_post(client, "/twilio/inbound", inbound_params("SM" + "5" * 31 + "f"))
    sid = send(client, {"To": USER, "From": BUSINESS, "Body": "x"}).get_json()["sid"]
    signed_post(client, "/twilio/status", failed_callback(sid))
    fake_twilio.fail_with = (201, {"sid": 12345, "status": "queued"})
    assert run_worker(app) == 1
    assert len(fallback_creates(app, fake_twilio)) == 1
    [item] = [i for i in items(db_engine) if i["kind"] == "send"]
    assert item["status"] == "delivered", (item["status"], item["last_error"])


def test_a_release_twilio_took_with_a_sid_that_is_not_text_is_released_not_left_sending(settings, db_engine,
                                                                                        fake_twilio):
    app = fallback_app(settings, fake_twilio, hold_on_reroute=True)
    client = app.test_client()
    send(client, {"To": USER, "From": BUSINESS, "Body": "held"})
    signed_post(client, "/twilio/inbound", inbound_params("SM" + "7" * 31 + "f"))
    fake_twilio.fail_with = (201, {"sid": 12345, "status": "queued"})
    run_worker(app)
    held = client.get("/v1/held?status=all", headers=basic_auth()).get_json()["held"]
    assert [h["status"] for h in held] == ["released"]


def test_metrics_count_outbox_items_in_every_status_an_operator_must_see(settings, db_engine, fake_twilio):
    app = fallback_app(settings, fake_twilio)
    client = app.test_client()
    signed_post(client, "/twilio/inbound", inbound_params("SM" + "9" * 31 + "a"))
    sid = send(client, {"To": USER, "From": BUSINESS, "Body": "x"}).get_json()["sid"]
    signed_post(client, "/twilio/status", failed_callback(sid))
    fake_twilio.fail_with = (500, {"code": 20500, "message": "x", "more_info": "", "status": 500})
    run_worker(app)
    assert [i["status"] for i in items(db_engine)] == ["uncertain"]
    text = client.get("/metrics", headers=basic_auth()).get_data(as_text=True)
    assert 'proxy_outbox_items{status="uncertain"} 1.0' in text
    assert 'proxy_outbox_items{status="sending"} 0.0' in text


def send_with_request_id(client, fields, request_id):
    """A create whose request id the caller chose (twilio-python's idempotency token is taken as it)."""
    return client.post(MESSAGES, data=fields, headers={**basic_auth(), "I-Twilio-Idempotency-Token": request_id})


def held_rows(db_engine):
    with db_engine.connect() as conn:
        return conn.execute(select(held_messages).order_by(held_messages.c.id)).mappings().all()


def test_a_hold_taken_by_an_older_release_is_given_a_whole_lease_and_never_another_holds_sid(
        settings, db_engine, fake_twilio):
    """A release of before `take` said when (an upgrade under a running worker) left `released_at` empty: the
    sweep settled it at once, while that worker may still be sending it, and took any earlier attempt of the pair
    with its request id (one a caller reused) for its own: `released` with another message's sid."""
    app = fallback_app(settings, fake_twilio, hold_on_reroute=True)
    client = app.test_client()
    first = int(send_with_request_id(client, {"To": USER, "From": BUSINESS, "Body": "A"}, "reused").headers[
        "X-Proxy-Held-Id"])
    signed_post(client, "/twilio/inbound", inbound_params("SM" + "8" * 31 + "a"))
    run_worker(app)
    with db_engine.begin() as conn:
        conn.execute(update(windows).values(expires_at=utcnow() - timedelta(seconds=1)))
    second = int(send_with_request_id(client, {"To": USER, "From": BUSINESS, "Body": "B"}, "reused").headers[
        "X-Proxy-Held-Id"])
    with db_engine.begin() as conn:  # taken as the older release did: no released_at
        conn.execute(update(held_messages).where(held_messages.c.id == second).values(status="sending"))
    run_worker(app)
    rows = {row["id"]: row for row in held_rows(db_engine)}
    assert rows[second]["status"] == "sending"  # its lease starts now
    run_worker(app, utcnow() + timedelta(seconds=settings.outbox_lease_seconds + 1))
    rows = {row["id"]: row for row in held_rows(db_engine)}
    assert rows[first]["status"] == "released"
    assert (rows[second]["status"], rows[second]["message_sid"]) == ("uncertain", None)


def test_a_message_held_again_while_a_release_runs_is_released_again_in_an_open_window(
        settings, db_engine, fake_twilio, log_lines, monkeypatch):
    """The release under way counted as pending: none was queued, and the message held again waited in an open
    window for the user's next message."""
    app = fallback_app(settings, fake_twilio, hold_on_reroute=True)
    client = app.test_client()
    send(client, {"To": USER, "From": BUSINESS, "Body": "A"})
    send(client, {"To": USER, "From": BUSINESS, "Body": "B"})
    signed_post(client, "/twilio/inbound", inbound_params("SM" + "8" * 31 + "b"))
    real_create = Worker.create

    def create(self, account_sid, pairs, judgement, **kwargs):
        if dict(pairs).get("Body") == "B":  # A went out; while B goes, the user writes, then A's 63016 comes
            monkeypatch.setattr(Worker, "create", real_create)
            [a] = [row for row in held_rows(db_engine) if row["status"] == "released"]
            signed_post(client, "/twilio/inbound", inbound_params("SM" + "8" * 31 + "c"))
            signed_post(client, "/twilio/status", failed_callback(a["message_sid"]))
        return real_create(self, account_sid, pairs, judgement, **kwargs)

    monkeypatch.setattr(Worker, "create", create)
    run_worker(app)
    [late] = late_lines(log_lines)
    assert late["decision"] == "kept_open_and_rerouted"
    for _ in range(2):
        run_worker(app)
    assert [row["status"] for row in held_rows(db_engine)] == ["released", "released"]
    assert [dict(r.form).get("Body") for r in fake_twilio.creates if dict(r.form).get("Body")] == ["A", "B", "A"]


def test_a_late_63016_on_a_release_not_yet_marked_holds_that_same_message_again(
        settings, db_engine, fake_twilio, log_lines, monkeypatch):
    """The callback can come between the release's attempt and its `released` mark: a second hold was made, and
    the caller's id said `released`."""
    app = fallback_app(settings, fake_twilio, hold_on_reroute=True)
    client = app.test_client()
    held_id = int(send(client, {"To": USER, "From": BUSINESS, "Body": "A"}).headers["X-Proxy-Held-Id"])
    signed_post(client, "/twilio/inbound", inbound_params("SM" + "8" * 31 + "d"))
    real_mark = holds.mark

    def mark(conn, row_id, status, now, **kwargs):
        if status == holds.RELEASED:
            monkeypatch.setattr(holds, "mark", real_mark)
            signed_post(client, "/twilio/status", failed_callback(kwargs["message_sid"]))
        return real_mark(conn, row_id, status, now, **kwargs)

    monkeypatch.setattr(holds, "mark", mark)
    run_worker(app)
    [row] = held_rows(db_engine)
    assert (row["id"], row["status"], row["message_sid"]) == (held_id, "held", None)
    assert late_lines(log_lines)[0]["held_id"] == held_id
    [line] = [line for line in log_lines() if line["event"] == "release" and line["held_id"] == held_id]
    assert line["decision"] == "held_again_meanwhile"


def test_a_late_63016_takes_the_pairs_turn_before_reading_its_window(settings, db_engine, fake_twilio, monkeypatch):
    """PostgreSQL: the user's message committed between the callback's window read and its lock found nothing held
    and queued no release, and the callback saw the window closed: held in an open window until the next one."""
    if db_engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL only: SQLite's writers take turns on the proxy's write lock")
    from proxy import late_failures

    app = fallback_app(settings, fake_twilio, hold_on_reroute=True)
    client = app.test_client()
    send(client, {"To": USER, "From": BUSINESS, "Body": "A"})
    signed_post(client, "/twilio/inbound", inbound_params("SM" + "8" * 31 + "e"))
    run_worker(app)
    [released] = held_rows(db_engine)
    with db_engine.begin() as conn:  # the 24 hours have passed since
        conn.execute(update(windows).values(expires_at=utcnow() - timedelta(seconds=1)))
    real_load = late_failures.store.load_window

    def load_window(conn, sender, user):
        found = real_load(conn, sender, user)
        monkeypatch.setattr(late_failures.store, "load_window", real_load)
        writer = threading.Thread(target=signed_post, args=(client, "/twilio/inbound",
                                                            inbound_params("SM" + "8" * 31 + "f")))
        writer.start()
        writer.join(3)  # waits on the pair's lock now, so it commits after the hold: it releases it
        return found

    monkeypatch.setattr(late_failures.store, "load_window", load_window)
    signed_post(client, "/twilio/status", failed_callback(released["message_sid"]))
    for _ in range(2):
        run_worker(app)
    [row] = held_rows(db_engine)
    assert row["status"] == "released" and row["message_sid"] != released["message_sid"]


@pytest.mark.parametrize("second_outcome", ["sent", "not_taken"])
def test_a_release_outcome_stored_late_never_overwrites_a_later_take_of_the_same_message(
        settings, db_engine, fake_twilio, monkeypatch, second_outcome):
    """The message went out, its 63016 came before the release stored its outcome, and it was held again and
    taken by the next release: the first release's `released` then landed on the second take (`sending` again),
    recording the sid that failed, and the second release's own outcome was refused — a 429 left it `released`
    for good, never sent again."""
    from proxy.worker import Retry

    app = fallback_app(settings, fake_twilio, hold_on_reroute=True)
    client = app.test_client()
    send(client, {"To": USER, "From": BUSINESS, "Body": "A"})
    signed_post(client, "/twilio/inbound", inbound_params("SM" + "9" * 31 + "a"))
    real_mark, real_create = Worker._mark, Worker.create
    second = {}

    def first_mark(self, row, status, **kwargs):
        monkeypatch.setattr(Worker, "_mark", real_mark)
        signed_post(client, "/twilio/inbound", inbound_params("SM" + "9" * 31 + "b"))  # the user writes again
        signed_post(client, "/twilio/status", failed_callback(kwargs["message_sid"]))  # held again, released at once

        def second_create(worker, account_sid, pairs, judgement, **create_kwargs):
            if dict(pairs).get("Body") != "A":  # the fallback the 63016 queued goes out too
                return real_create(worker, account_sid, pairs, judgement, **create_kwargs)
            monkeypatch.setattr(Worker, "create", real_create)
            real_mark(self, row, status, **kwargs)  # the first release's outcome lands only now
            if second_outcome == "not_taken":
                raise Retry("Twilio answered 429")
            second["sid"] = real_create(worker, account_sid, pairs, judgement, **create_kwargs)
            return second["sid"]

        monkeypatch.setattr(Worker, "create", second_create)  # the release the 63016 queued, next in line

    monkeypatch.setattr(Worker, "_mark", first_mark)
    for _ in range(2):
        run_worker(app)
    [row] = held_rows(db_engine)
    if second_outcome == "sent":
        assert (row["status"], row["message_sid"]) == ("released", second["sid"])
    else:
        assert row["status"] == "held"  # Twilio never took the second: the user's next message sends it
        for _ in range(2):  # its release's retry, due after OUTBOX_RETRY_SCHEDULE's first wait
            run_worker(app, utcnow() + timedelta(hours=2))
        assert [dict(r.form).get("Body") for r in fake_twilio.creates].count("A") == 2
        assert held_rows(db_engine)[0]["status"] == "released"


DELIVERY = {"ValidityPeriod": "600", "ContentRetention": "discard", "AddressRetention": "obfuscate",
            "ApplicationSid": "AP" + "1" * 32, "RiskCheck": "disable", "ProvideFeedback": "true"}


def test_a_late_63016s_fallback_is_delivered_as_the_gateways_reroute_is(settings, db_engine, fake_twilio):
    """The fallback sent after a late 63016 kept only To, From, MessagingServiceSid and StatusCallback: Twilio kept
    the content and the address of a message its caller asked to discard (ContentRetention, AddressRetention)."""
    app = fallback_app(settings, fake_twilio)
    client = app.test_client()
    cold = send(client, {"To": USER, "From": BUSINESS, "Body": "cold", **DELIVERY})
    assert cold.headers["X-Proxy-Decision"] == "rerouted"
    rerouted = dict(fake_twilio.creates[-1].form)
    assert {k: rerouted.get(k) for k in DELIVERY} == DELIVERY
    signed_post(client, "/twilio/inbound", inbound_params("SM" + "b" * 32))
    later = (utcnow() + timedelta(hours=2)).isoformat()
    sid = send(client, {"To": USER, "From": BUSINESS, "Body": "in window", "MessagingServiceSid": "MG" + "1" * 32,
                        "SendAt": later, "ScheduleType": "fixed", **DELIVERY}).get_json()["sid"]
    app.extensions["proxy"].attempts.flush()
    assert signed_post(client, "/twilio/status", failed_callback(sid)).status_code == 200
    assert run_worker(app) == 1
    fallback = dict(fake_twilio.creates[-1].form)
    assert fallback["ContentSid"] == app.fallback_sid and fallback["MessagingServiceSid"] == "MG" + "1" * 32
    assert {k: fallback.get(k) for k in DELIVERY} == DELIVERY
    assert "SendAt" not in fallback and "ScheduleType" not in fallback  # its SendAt is what failed: sent now


MESSENGER_USER, MESSENGER_PAGE = "messenger:24680", "messenger:13579"


@pytest.mark.parametrize("wrote_again", [False, True])
def test_a_late_63016_on_messenger_closes_its_window_and_sends_no_whatsapp_template(
        settings, db_engine, fake_twilio, wrote_again):
    """63016 is also Messenger's 24 hours. The fallback configured for every sender is a WhatsApp template: it was
    sent to the Messenger user when they had written since (and, with the window closed, queued to fail, and the
    message held, which the gateway never does for Messenger)."""
    app = fallback_app(settings, fake_twilio, hold_on_reroute=True)
    client = app.test_client()
    pair = {"user": MESSENGER_USER, "business": MESSENGER_PAGE}
    signed_post(client, "/twilio/inbound", inbound_params("SM" + "9" * 31 + "1", **pair))
    sent = send(client, {"To": MESSENGER_USER, "From": MESSENGER_PAGE, "Body": "hi"})
    assert sent.headers["X-Proxy-Decision"] == "allowed"
    app.extensions["proxy"].attempts.flush()
    if wrote_again:
        with db_engine.begin() as conn:  # the send came in a minute ago; the user writes again now
            conn.execute(update(windows).values(last_inbound_at=utcnow() - timedelta(seconds=90)))
            conn.execute(update(send_attempts).values(created_at=utcnow() - timedelta(seconds=60)))
        signed_post(client, "/twilio/inbound", inbound_params("SM" + "9" * 31 + "2", **pair))
    callback = {**failed_callback(sent.get_json()["sid"]), "From": MESSENGER_PAGE, "To": MESSENGER_USER,
                "ChannelPrefix": "messenger"}
    assert signed_post(client, "/twilio/status", callback).status_code == 200
    while run_worker(app):
        pass
    assert len(fake_twilio.creates) == 1  # the send itself, nothing after it
    with db_engine.connect() as conn:
        assert conn.execute(select(late_failures.c.action)).scalar_one() == ("kept_open" if wrote_again else "closed")
        assert conn.execute(select(outbox.c.kind).where(outbox.c.kind == "send")).all() == []
        assert conn.execute(select(held_messages)).all() == []


SERVICE_OF_TWO = "MG" + "1a" * 16
NUMBER_1, NUMBER_2 = BUSINESS, "whatsapp:+14155550102"  # two WhatsApp senders of SERVICE_OF_TWO


def service_failed_callback(sid, sender):
    """Twilio's callback for a service send names the number it picked in From."""
    return {**failed_callback(sid), "From": sender, "MessagingServiceSid": SERVICE_OF_TWO}


def is_open(client, sender):
    return client.get("/v1/windows", query_string={"sender": sender, "user": USER},
                      headers=basic_auth()).get_json()["open"]


@pytest.mark.parametrize("reroute", [False, True])
def test_a_service_sends_63016_from_another_number_leaves_the_number_the_user_wrote_to_open(
        settings, db_engine, fake_twilio, reroute):
    """The user wrote to number 1 of a service; Twilio sent the service's message from number 2 (its sender pool,
    Sticky Sender) and it failed 63016. Number 1's window was closed too, so README's advice (send with its From)
    failed for a day: blocked, or, with reroute, a template sent and the message held."""
    app = fallback_app(settings, fake_twilio, hold_on_reroute=True) if reroute else create_app(settings)
    client = app.test_client()
    signed_post(client, "/twilio/inbound", inbound_params("SM" + "a" * 32, business=NUMBER_1,
                                                          MessagingServiceSid=SERVICE_OF_TWO))
    sid = send(client, {"To": USER, "MessagingServiceSid": SERVICE_OF_TWO, "Body": "via the service"}
               ).get_json()["sid"]
    assert signed_post(client, "/twilio/status", service_failed_callback(sid, NUMBER_2)).status_code == 200
    assert is_open(client, SERVICE_OF_TWO) is False  # the window the send was judged by
    assert is_open(client, NUMBER_1) is True
    assert send(client, {"To": USER, "From": NUMBER_1, "Body": "from 1"}).headers["X-Proxy-Decision"] == "allowed"


def test_a_service_sends_63016_from_one_number_leaves_a_window_opened_at_another_open(settings, db_engine,
                                                                                        fake_twilio):
    client = create_app(settings).test_client()
    for n, number in enumerate((NUMBER_1, NUMBER_2)):  # the user wrote to both, number 2 last
        signed_post(client, "/twilio/inbound", inbound_params("SM" + "c" * 31 + str(n), business=number,
                                                              MessagingServiceSid=SERVICE_OF_TWO))
    sid = send(client, {"To": USER, "MessagingServiceSid": SERVICE_OF_TWO, "Body": "via the service"}
               ).get_json()["sid"]
    assert signed_post(client, "/twilio/status", service_failed_callback(sid, NUMBER_1)).status_code == 200
    assert (is_open(client, NUMBER_1), is_open(client, SERVICE_OF_TWO)) == (False, False)
    assert is_open(client, NUMBER_2) is True  # WhatsApp has that one open: the user's latest message


def service_callback(sid, sender, status="sent"):
    """A callback of a service send: From is the number Twilio picked (Sticky Sender keeps it for the user)."""
    return {"MessageSid": sid, "MessageStatus": status, "From": sender, "To": USER, "AccountSid": ACCOUNT_SID,
            "MessagingServiceSid": SERVICE_OF_TWO, "ChannelPrefix": "whatsapp"}


def wrote_to(client, number, n, user=USER):
    assert signed_post(client, "/twilio/inbound", inbound_params("SM" + "d" * 30 + f"{n:02d}", user=user,
                                                                 business=number, MessagingServiceSid=SERVICE_OF_TWO)
                       ).status_code == 200


def test_a_service_send_is_judged_by_the_window_of_the_number_twilio_sends_it_from(settings, db_engine, fake_twilio,
                                                                                     log_lines):
    """Twilio's Sticky Sender sends a service's messages to a user from the number it used before, whatever number
    the user wrote to. The service's window (open when the user wrote to any of its numbers) let such a send through,
    and Twilio failed it later with 63016. The number is learnt from the callbacks of the proxy's service sends."""
    app = create_app(settings)
    client = app.test_client()
    wrote_to(client, NUMBER_2, 0)
    via_service = {"To": USER, "MessagingServiceSid": SERVICE_OF_TWO, "Body": "via the service"}
    first = send(client, via_service)
    assert first.headers["X-Proxy-Decision"] == "allowed"
    app.extensions["proxy"].attempts.flush()
    assert signed_post(client, "/twilio/status", service_callback(first.get_json()["sid"], NUMBER_2)).status_code == 200
    # A day on, the user writes to number 1: the service's own window is open again, number 2's is not.
    with db_engine.begin() as conn:
        conn.execute(update(windows).values(expires_at=utcnow() - timedelta(hours=1)))
    wrote_to(client, NUMBER_1, 1)
    blocked = send(client, via_service)
    assert blocked.status_code == 400 and blocked.get_json()["code"] == 63016
    assert f"from {NUMBER_2} (Sticky Sender" in blocked.get_json()["message"]
    assert len(fake_twilio.creates) == 1
    shown = client.get("/v1/windows", query_string={"sender": SERVICE_OF_TWO, "user": USER},
                       headers=basic_auth()).get_json()
    assert (shown["open"], shown["sticky_sender"]) == (False, NUMBER_2)
    [line] = [line for line in log_lines() if line["event"] == "send" and line["decision"] == "blocked"]
    assert line["window_sender"] == "whatsapp:+1415*****02" and line["sender"].startswith("MG1a1")
    # Number 1 itself is open: sending with its From goes out.
    assert send(client, {**via_service, "From": NUMBER_1}).headers["X-Proxy-Decision"] == "allowed"
    wrote_to(client, NUMBER_2, 2)
    assert send(client, via_service).headers["X-Proxy-Decision"] == "allowed"


def test_the_sticky_number_is_learnt_only_from_the_proxys_own_whatsapp_service_sends(settings, db_engine,
                                                                                      fake_twilio):
    app = create_app(settings)
    client = app.test_client()
    wrote_to(client, NUMBER_1, 0)
    by_number = send(client, {"To": USER, "From": NUMBER_1, "Body": "from number 1"}).get_json()["sid"]
    app.extensions["proxy"].attempts.flush()
    for sid in (by_number, "SM" + "e" * 32):  # a send with From, and one the proxy never saw
        assert signed_post(client, "/twilio/status", service_callback(sid, NUMBER_2)).status_code == 200
    with db_engine.connect() as conn:
        assert conn.execute(select(sticky_senders)).all() == []
    assert send(client, {"To": USER, "MessagingServiceSid": SERVICE_OF_TWO, "Body": "x"}
                ).headers["X-Proxy-Decision"] == "allowed"


def test_a_changed_sticky_number_is_learnt_and_a_repeated_one_written_once(settings, db_engine, fake_twilio):
    app = create_app(settings)
    client = app.test_client()
    wrote_to(client, NUMBER_1, 0)
    sids = [send(client, {"To": USER, "MessagingServiceSid": SERVICE_OF_TWO, "Body": str(n)}).get_json()["sid"]
            for n in range(2)]
    app.extensions["proxy"].attempts.flush()
    for status in ("sent", "delivered", "read"):
        assert signed_post(client, "/twilio/status", service_callback(sids[0], NUMBER_2, status)).status_code == 200
    with db_engine.connect() as conn:
        first = conn.execute(select(sticky_senders.c.sender, sticky_senders.c.updated_at)).one()
    assert first.sender == NUMBER_2
    # Number 2 left the service (Twilio deletes its mappings): the next send went from number 1.
    assert signed_post(client, "/twilio/status", service_callback(sids[1], NUMBER_1)).status_code == 200
    with db_engine.connect() as conn:
        [now] = conn.execute(select(sticky_senders.c.sender, sticky_senders.c.updated_at)).all()
    assert now.sender == NUMBER_1 and now.updated_at > first.updated_at


def test_with_holds_a_service_message_waits_for_the_number_it_goes_from_instead_of_failing_at_each_message(
        settings, db_engine, fake_twilio):
    """The user wrote to number 1; Twilio sent the service's message from number 2 and it failed 63016: fallback
    sent, message held. The user's next message to number 1 released it through the service, from number 2 again:
    another 63016, another fallback, at each of the user's messages until they answered at number 2."""
    app = fallback_app(settings, fake_twilio, hold_on_reroute=True)
    client = app.test_client()
    wrote_to(client, NUMBER_1, 0)
    sid = send(client, {"To": USER, "MessagingServiceSid": SERVICE_OF_TWO, "Body": "via the service"}
               ).get_json()["sid"]
    app.extensions["proxy"].attempts.flush()
    assert signed_post(client, "/twilio/status", {**service_callback(sid, NUMBER_2, "failed"), "ErrorCode": "63016"}
                       ).status_code == 200
    while run_worker(app):
        pass
    assert [dict(r.form).get("ContentSid") for r in fake_twilio.creates] == [None, app.fallback_sid]
    wrote_to(client, NUMBER_1, 1)
    while run_worker(app):
        pass
    assert len(fake_twilio.creates) == 2  # still held: number 2's window is closed
    with db_engine.connect() as conn:
        assert conn.execute(select(held_messages.c.status)).scalars().all() == ["held"]
    wrote_to(client, NUMBER_2, 2)  # the user answers the fallback, which came from number 2
    while run_worker(app):
        pass
    released = dict(fake_twilio.creates[-1].form)
    assert len(fake_twilio.creates) == 3 and released["Body"] == "via the service"
    assert released["MessagingServiceSid"] == SERVICE_OF_TWO
    with db_engine.connect() as conn:
        assert conn.execute(select(held_messages.c.status)).scalars().all() == ["released"]

VIA_SERVICE = {"To": USER, "MessagingServiceSid": SERVICE_OF_TWO, "Body": "via the service"}


def sticky(db_engine):
    with db_engine.connect() as conn:
        return conn.execute(select(sticky_senders.c.sender, sticky_senders.c.updated_at)).all()


def service_send(app, client, fields=VIA_SERVICE):
    response = send(client, fields)
    app.extensions["proxy"].attempts.flush()
    return response


def test_a_late_callback_of_an_older_send_does_not_bring_back_the_number_twilio_no_longer_uses(
        settings, db_engine, fake_twilio):
    """README: "A number that left the service (Twilio deletes its mappings) is unlearnt by the callback of the
    next send, which names the new one". Callbacks come late and out of order (`read` when the user opens the
    chat, hours later): the callback of a send made before the change taught the old number again, and with
    number 2's window closed every service send was blocked, no send, no callback to correct it (the review)."""
    app = create_app(settings)
    client = app.test_client()
    wrote_to(client, NUMBER_1, 0)
    wrote_to(client, NUMBER_2, 1)
    old = service_send(app, client).get_json()["sid"]
    assert signed_post(client, "/twilio/status", service_callback(old, NUMBER_2, "delivered")).status_code == 200
    # Number 2 left the service: Twilio's next send goes from number 1, and its callback says so.
    new = service_send(app, client).get_json()["sid"]
    assert signed_post(client, "/twilio/status", service_callback(new, NUMBER_1, "delivered")).status_code == 200
    assert [row.sender for row in sticky(db_engine)] == [NUMBER_1]
    # The user now reads the older message: its `read` callback (From number 2) arrives last.
    assert signed_post(client, "/twilio/status", service_callback(old, NUMBER_2, "read")).status_code == 200
    assert [row.sender for row in sticky(db_engine)] == [NUMBER_1]
    # The user keeps writing to number 1, the number Twilio now sends from; number 2's window closes.
    with db_engine.begin() as conn:
        conn.execute(update(windows).values(expires_at=utcnow() - timedelta(hours=1)))
    wrote_to(client, NUMBER_1, 2)
    assert service_send(app, client).headers["X-Proxy-Decision"] == "allowed"


def test_a_callback_confirming_the_number_keeps_it_from_being_purged(settings, db_engine, fake_twilio):
    """updated_at changed only when the number did: a number every day's callbacks confirm was deleted by
    `purge --older-than 30d` a month after it was first learnt, and the next service send was judged by the
    service's own window again, let through, and failed 63016 later (the review)."""
    app = create_app(settings)
    client = app.test_client()
    wrote_to(client, NUMBER_2, 0)
    first = service_send(app, client).get_json()["sid"]
    assert signed_post(client, "/twilio/status", service_callback(first, NUMBER_2)).status_code == 200
    with db_engine.begin() as conn:  # as if that was 31 days ago
        conn.execute(update(sticky_senders).values(updated_at=utcnow() - timedelta(days=31)))
    # Today: the user wrote to number 2 again, the service sent again, from number 2, and Twilio said so.
    wrote_to(client, NUMBER_2, 1)
    today = service_send(app, client).get_json()["sid"]
    assert signed_post(client, "/twilio/status", service_callback(today, NUMBER_2, "delivered")).status_code == 200
    result = app.test_cli_runner().invoke(args=["purge", "--older-than", "30d"])
    assert result.exit_code == 0, result.output
    assert [row.sender for row in sticky(db_engine)] == [NUMBER_2]
    # What it costs: a day later the user writes to number 1 only; the service still sends from number 2.
    with db_engine.begin() as conn:
        conn.execute(update(windows).values(expires_at=utcnow() - timedelta(hours=1)))
    wrote_to(client, NUMBER_1, 2)
    assert service_send(app, client).headers["X-Proxy-Decision"] == "blocked"


def test_a_user_address_the_proxy_does_not_recognise_is_still_judged_by_the_sticky_number(settings, db_engine,
                                                                                          fake_twilio):
    """A user address kept as sent (webhooks._address) whose sticky number has no window row (the user never wrote
    to it) was refused as an invalid `To` (21211) instead of 63016 with the sticky note, and a reroute policy never
    sent its fallback (the review)."""
    app = create_app(settings)
    client = app.test_client()
    odd_user = "whatsapp:user_1234"  # not E.164, not a BSUID: kept as sent
    wrote_to(client, NUMBER_1, 0, user=odd_user)
    via = {**VIA_SERVICE, "To": odd_user}
    judged = client.post("/v1/preflight", data=via, headers=basic_auth()).get_json()
    assert judged["decision"] == "allowed"  # the service's own window, opened at number 1
    # What a callback of an earlier service send taught (the fake Twilio refuses to send to such an address,
    # so the row is written as remember_sticky_sender writes it).
    with db_engine.begin() as conn:
        conn.execute(sticky_senders.insert().values(service_sid=SERVICE_OF_TWO, user=odd_user, sender=NUMBER_2,
                                                    sent_at=utcnow(), updated_at=utcnow()))
    judged = client.post("/v1/preflight", data=via, headers=basic_auth())
    assert judged.status_code == 200 and judged.get_json()["code"] == 63016, judged.get_json()


def test_preflight_says_which_window_a_service_send_was_judged_by(settings, db_engine, fake_twilio):
    """The gateway's refusal names the sticky number; /v1/preflight ("the decision a Messages create would
    get") gave the same decision with no word of the number, as if the service's window were closed (the review)."""
    app = create_app(settings)
    client = app.test_client()
    wrote_to(client, NUMBER_2, 0)
    sid = service_send(app, client).get_json()["sid"]
    assert signed_post(client, "/twilio/status", service_callback(sid, NUMBER_2)).status_code == 200
    with db_engine.begin() as conn:
        conn.execute(update(windows).values(expires_at=utcnow() - timedelta(hours=1)))
    wrote_to(client, NUMBER_1, 1)
    blocked = send(client, VIA_SERVICE)
    preflight = client.post("/v1/preflight", data=VIA_SERVICE, headers=basic_auth()).get_json()
    assert (preflight["decision"], preflight["sticky_sender"]) == ("blocked", NUMBER_2)
    assert blocked.get_json()["message"] == preflight["message"]


def test_a_service_sends_fallback_still_greets_the_user_by_the_name_their_message_gave(settings, db_engine,
                                                                                       fake_twilio):
    """judge took profile_name from the row it judged by: for a service with a sticky number the user never
    wrote to (the very case that is rerouted) there was none, and the fallback template greeted them with the
    default instead of the ProfileName their message to the service gave (the service's row has it)."""
    app = fallback_app(settings, fake_twilio)
    client = app.test_client()
    wrote_to(client, NUMBER_1, 0)  # ProfileName "Ada"
    sid = service_send(app, client).get_json()["sid"]
    assert signed_post(client, "/twilio/status", service_callback(sid, NUMBER_2)).status_code == 200
    rerouted = service_send(app, client)
    assert rerouted.headers["X-Proxy-Decision"] == "rerouted"
    variables = dict(fake_twilio.creates[-1].form)["ContentVariables"]
    assert variables == '{"1": "Ada"}'


def test_a_status_stored_then_its_sticky_number_failing_to_be_stored_is_still_answered_200(
        settings, db_engine, fake_twilio, fake_app, monkeypatch, log_lines):
    """The number is stored after the status (and its forward): a database error then was answered 503 "nothing was
    sent or recorded" for a status recorded and forwarded, with no `status` line (the second review)."""
    app = create_app(replace(settings, forward_status_url=fake_app.url + "/app/status"))
    client = app.test_client()
    wrote_to(client, NUMBER_1, 0)
    sid = service_send(app, client).get_json()["sid"]

    def failing(conn, learnt):
        raise OperationalError("INSERT INTO sticky_senders ...", {}, Exception("database is locked"))

    monkeypatch.setattr(webhooks.store, "remember_sticky_sender", failing)
    response = signed_post(client, "/twilio/status", service_callback(sid, NUMBER_2, "delivered"))
    assert response.status_code == 200
    with db_engine.connect() as conn:
        assert conn.execute(select(outbox.c.kind).where(outbox.c.kind == "status")).scalars().all() == ["status"]
        assert conn.execute(select(sticky_senders)).all() == []
    lines = {line["event"]: line for line in log_lines()}
    assert lines["sticky_sender_not_stored"]["level"] == "WARNING" and lines["status"]["decision"] == "recorded"
    monkeypatch.undo()
    # The send's next callback teaches it.
    assert signed_post(client, "/twilio/status", service_callback(sid, NUMBER_2, "read")).status_code == 200
    assert [row.sender for row in sticky(db_engine)] == [NUMBER_2]


def test_a_learnt_number_is_written_after_every_other_write_of_its_batch(settings, db_engine):
    """Its row is locked last, whatever the other rows' keys (a status's sid, a conversation's addresses, one not
    ASCII, or one equal to an old "~sticky" marker, which made the sort compare an int with a str)."""
    from proxy.group_commit import _Job
    app = create_app(settings)
    orders = []
    with app.app_context():
        shared = app.extensions["proxy"].shared_writes
        real_run = shared.run
        shared.run = lambda work, order, several=False: orders.append(order)
        try:
            learnt = store_module.StickySender(SERVICE_OF_TWO, USER, NUMBER_2, utcnow(), utcnow())
            webhooks._remember(app.extensions["proxy"], learnt)
            webhooks._write_alone(app.extensions["proxy"], None, webhooks._pair_order("ñame", NUMBER_1, 1))
            webhooks._write_alone(app.extensions["proxy"], None, webhooks._pair_order("~sticky", NUMBER_1, 1))
            webhooks._write_alone(app.extensions["proxy"], None, ("SM" + "f" * 32,))
        finally:
            shared.run = real_run
    jobs = sorted((_Job(None, order) for order in orders), key=lambda job: job.order)
    assert jobs[-1].order == orders[0]
