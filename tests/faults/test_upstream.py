"""Twilio misbehaving: stalled, refusing, 5xx, 429. The caller gets 504/502 or Twilio's own answer,
the attempt is stored with its outcome, and a create is never sent twice."""

import re

import pytest
from sqlalchemy import select

from proxy.attempts import flush_all
from proxy.db import send_attempts
from tests.conftest import BUSINESS, USER
from tests.http.test_gateway import open_window, send


@pytest.mark.parametrize("status, code", [(500, 20500), (503, 20503), (429, 20429)])
def test_twilio_errors_are_relayed_and_never_retried(client, fake_twilio, db_engine, status, code):
    open_window(client)
    body = {"code": code, "message": "Twilio is having a moment", "more_info": "https://www.twilio.com/docs/errors/x",
            "status": status}
    fake_twilio.fail_with = (status, body)
    response = send(client, {"To": USER, "From": BUSINESS, "Body": "x"})
    assert response.status_code == status and response.get_json() == body
    assert len(fake_twilio.creates) == 1
    assert flush_all()
    with db_engine.connect() as conn:
        attempt = conn.execute(select(send_attempts)).mappings().one()
    assert (attempt["outcome"], attempt["upstream_status"], attempt["decision"]) == ("upstream_error", status, "allowed")


@pytest.mark.parametrize("sid", [["SM" + "1" * 32], 12345, {"x": 1}, None])
def test_a_created_message_whose_sid_is_not_text_is_relayed_and_recorded_without_it(client, fake_twilio, db_engine,
                                                                                      sid):
    """Twilio took the message: the caller must get its 201 (a 500 invites a retry, so a second message), and
    the attempt writer must not be handed a value it cannot store (it took that for an outage, retried forever
    and stopped recording the worker's sends)."""
    open_window(client)
    body = {"sid": sid, "status": "queued"}
    fake_twilio.fail_with = (201, body)
    response = send(client, {"To": USER, "From": BUSINESS, "Body": "x"})
    assert response.status_code == 201 and response.get_json() == body
    fake_twilio.fail_with = None
    assert send(client, {"To": USER, "From": BUSINESS, "Body": "y"}).status_code == 201
    assert flush_all(5)
    with db_engine.connect() as conn:
        attempts = conn.execute(select(send_attempts).order_by(send_attempts.c.id)).mappings().all()
    assert [(a["outcome"], a["message_sid"]) for a in attempts][0] == ("sent", None)
    assert len(attempts) == 2 and attempts[1]["message_sid"].startswith("SM")


@pytest.fixture
def odd_twilio():
    """A Twilio (or a box in front of it) answering a create with 201 and headers of its own choosing."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    state = {"headers": b""}

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                length = int(re.search(rb"(?i)content-length: *(\d+)", data).group(1)) if b"ength:" in data else 0
                while len(data.partition(b"\r\n\r\n")[2]) < length:
                    data += conn.recv(65536)
                body = b'{"sid": "SM' + b"7" * 32 + b'", "status": "queued"}'
                conn.sendall(b"HTTP/1.1 201 Created\r\nContent-Type: application/json; charset=utf-8\r\n"
                             + state["headers"] + b"Content-Length: " + str(len(body)).encode()
                             + b"\r\nConnection: close\r\n\r\n" + body)

    threading.Thread(target=serve, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}", state
    listener.close()


def test_upstream_headers_the_proxy_cannot_or_must_not_relay_never_spoil_a_sent_message(settings, db_engine,
                                                                                         odd_twilio):
    """Twilio took the message: its 201 must reach the caller (a 500 invites a retry, so a second message).
    A header name that is no token or a value with a control character makes gunicorn answer a bare 500
    instead; the proxy's own headers (X-Proxy-*, X-Request-Id) are the proxy's to say, not upstream's; and
    one body has one Content-Type."""
    from dataclasses import replace

    from gunicorn.http.wsgi import HEADER_VALUE_RE, TOKEN_RE

    from proxy import create_app

    url, state = odd_twilio
    state["headers"] = (b"X-Home-Region: us1\r\nX(Odd): 1\r\nX-Control: a\x01b\r\nX-Proxy-Rerouted-To: HX"
                        + b"1" * 32 + b"\r\nX-Proxy-Held-Id: 7\r\nX-Request-Id: upstream\r\n"
                        + b"Content-Type: text/html\r\nSet-Cookie: twilio=1; Secure\r\n"
                        + b"Strict-Transport-Security: max-age=31536000\r\nConnection: X-Hop\r\nX-Hop: 1\r\n")
    app = create_app(replace(settings, twilio_api_base_url=url))
    client = app.test_client()
    open_window(client)
    response = send(client, {"To": USER, "From": BUSINESS, "Body": "x"})
    assert response.status_code == 201 and response.get_json()["sid"] == "SM" + "7" * 32
    for name, value in response.headers.items():
        assert TOKEN_RE.fullmatch(name) and HEADER_VALUE_RE.fullmatch(value), (name, value)  # gunicorn's checks
    assert response.headers.getlist("Content-Type") == ["application/json; charset=utf-8"]
    assert response.headers["X-Home-Region"] == "us1"  # Twilio's headers are still relayed
    assert response.headers["X-Proxy-Decision"] == "allowed"
    assert "X-Proxy-Rerouted-To" not in response.headers and "X-Proxy-Held-Id" not in response.headers
    # What the proxy's own host would take as its own: Twilio's cookie, a year-long HSTS pin on the proxy.
    assert "Set-Cookie" not in response.headers and "Strict-Transport-Security" not in response.headers
    assert "X-Hop" not in response.headers  # named in Connection: that hop's only (RFC 9110 7.6.1)
    [request_id] = response.headers.getlist("X-Request-Id")
    assert request_id != "upstream"
    app.extensions["proxy"].attempts.flush()
    app.extensions["proxy"].engine.dispose()
