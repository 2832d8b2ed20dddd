"""What arrives on the socket, through gunicorn (the Procfile's worker model, or gthread in CI's second pass):
bodies cut short, chunked wrongly, or never finished."""

import base64
import json
import socket
import time

import pytest
import requests
from sqlalchemy import func, select

from proxy.db import send_attempts
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, inbound_params
from tests.e2e.conftest import API_SECRET, BODY_READ_SECONDS, json_lines
from tests.e2e.test_end_to_end import post_inbound

pytestmark = pytest.mark.e2e

CREATE = f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"
AUTH = "Basic " + base64.b64encode(f"{ACCOUNT_SID}:{AUTH_TOKEN}".encode()).decode()
BODY = b"To=whatsapp%3A%2B14155550111&From=whatsapp%3A%2B14155550100&Body=Your+refund+was+NOT+approved"


def head(path: str, length: int | None, **extra) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Authorization: {AUTH}",
             "Content-Type: application/x-www-form-urlencoded",
             f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked",
             *(f"{k}: {v}" for k, v in extra.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def answer(sock: socket.socket, timeout: float = 10) -> tuple[int, dict, bytes]:
    """The status, headers and body of one HTTP response read off `sock` (Content-Length framed)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before an answer: {data!r}"
        data += chunk
    top, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = top.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    while len(rest) < int(headers.get("content-length", 0)):
        rest += sock.recv(65536)
    return int(status_line.split()[1]), headers, rest


def assert_closed_after(sock: socket.socket) -> None:
    """Nothing after the answer: the server closed the connection, the rest of the body read as no request."""
    sock.settimeout(5)
    assert sock.recv(65536) == b""


def assert_twilio_shaped(status: int, body: bytes, expected: int) -> dict:
    parsed = json.loads(body)
    assert status == expected and set(parsed) == {"code", "message", "more_info", "status"}
    assert parsed["status"] == expected
    return parsed


def attempts(db_engine) -> int:
    with db_engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(send_attempts)).scalar()


def test_a_create_cut_short_is_refused_not_sent_truncated(proxy_server, fake_twilio, db_engine):
    """The client stops after "Your refund was ": judged and sent, that is another message."""
    assert post_inbound(proxy_server, inbound_params("SM" + "7" * 32)).status_code == 200  # the window is open
    with socket.create_connection(("127.0.0.1", proxy_server.port)) as sock:
        sock.sendall(head(CREATE, len(BODY)) + BODY[:BODY.index(b"NOT")])
        sock.shutdown(socket.SHUT_WR)  # the client is done sending, short of its Content-Length
        status, headers, body = answer(sock)
        assert_closed_after(sock)
    error = assert_twilio_shaped(status, body, 400)
    assert "could not be read whole" in error["message"]
    time.sleep(0.3)
    assert fake_twilio.creates == [] and attempts(db_engine) == 0


@pytest.mark.parametrize("chunks", [BODY + b"\r\n0\r\n\r\n",  # the body sent as if it were a chunk's size
                                    b"zz\r\n" + BODY + b"\r\n0\r\n\r\n",
                                    b"%x\r\n" % len(BODY) + BODY + b"XX0\r\n\r\n"],  # no chunk terminator
                         ids=["body-as-size", "bad-size", "no-terminator"])
@pytest.mark.parametrize("path", ["/twilio/inbound", CREATE])
def test_a_malformed_chunked_body_is_a_400_and_never_logged(proxy_server, fake_twilio, path, chunks):
    with socket.create_connection(("127.0.0.1", proxy_server.port)) as sock:
        sock.sendall(head(path, None) + chunks)
        status, headers, body = answer(sock)
        assert_closed_after(sock)  # not a second answer (gunicorn's HTML 400) for the chunk's remains
    assert_twilio_shaped(status, body, 400)
    assert fake_twilio.creates == []
    text = "\n".join(proxy_server.log_lines())
    assert "refund" not in text and "14155550111" not in text and "unhandled_error" not in text


def test_a_body_that_never_comes_is_given_up_on_and_the_server_keeps_answering(proxy_server, fake_twilio):
    """Headers sent, then silence: without a deadline the connection was held for good (gevent's only timeout
    covers the headers); unauthenticated, two thousand of them left /healthz unanswered."""
    socks = []
    try:
        for path in ("/twilio/inbound", CREATE):
            sock = socket.create_connection(("127.0.0.1", proxy_server.port))
            sock.sendall(head(path, len(BODY)) + BODY[:10])
            socks.append(sock)
        started = time.monotonic()
        assert requests.get(proxy_server.url + "/healthz", timeout=5).status_code == 200
        for sock in socks:
            status, headers, body = answer(sock, timeout=BODY_READ_SECONDS + 10)
            assert_closed_after(sock)  # at once, not after the keep-alive's 75 s
            error = assert_twilio_shaped(status, body, 408)
            assert f"within {BODY_READ_SECONDS} s" in error["message"]
        # Not before the deadline, and not much after it.
        assert BODY_READ_SECONDS - 0.5 <= time.monotonic() - started
    finally:
        for sock in socks:
            sock.close()
    assert fake_twilio.creates == []


def test_a_body_sent_slowly_but_in_time_is_read_whole(proxy_server, fake_twilio):
    assert post_inbound(proxy_server, inbound_params("SM" + "8" * 32)).status_code == 200
    with socket.create_connection(("127.0.0.1", proxy_server.port)) as sock:
        sock.sendall(head(CREATE, len(BODY)))
        for start in range(0, len(BODY), 40):
            time.sleep(0.2)
            sock.sendall(BODY[start:start + 40])
        status, _, body = answer(sock)
    assert status == 201, body
    [create] = fake_twilio.creates
    assert dict(create.form)["Body"] == "Your refund was NOT approved"
    assert create.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert [json.loads(line)["decision"] for line in json_lines(proxy_server.log_lines())
            if json.loads(line).get("event") == "send"] == ["allowed"]


@pytest.mark.parametrize("request_bytes, expected", [
    # A request line over gunicorn's 4,094 bytes: a query string naming a user and a token, as a mistyped URL may.
    (f"GET {CREATE}?To=whatsapp:+14155550111&t={AUTH_TOKEN}{'x' * 5000} HTTP/1.1\r\nHost: a\r\n\r\n".encode(), 414),
    # A header over 8,190 bytes.
    (head(CREATE, len(BODY), **{"X-Big": "y" * 9000}) + BODY, 431),
    # Two Content-Lengths, a request line that is no HTTP.
    (head(CREATE, len(BODY), **{"Content-Length": "5"}) + BODY, 400),
    (f"POST {CREATE}?To=whatsapp:+14155550111 HTTP/1.1 junk\r\nHost: a\r\n\r\n".encode(), 400),
    (f"POST {CREATE}?To=whatsapp:+14155550111&t={AUTH_TOKEN}\r\nHost: a\r\n\r\n".encode(), 400),  # quoted whole
    ("POST /v1/windows/whatsapp:+14155550111 HTTP/1.1\r\nHost: a\r\nX-N\x01: 1\r\n\r\n".encode(), 400),
])
def test_a_request_gunicorn_cannot_read_is_answered_in_twilios_shape(proxy_server, fake_twilio, db_engine,
                                                                     request_bytes, expected):
    """gunicorn answers these itself, before the app: it was an HTML page a Twilio client cannot read. The answer
    never repeats the request line (a query string may hold a number or a token)."""
    with socket.create_connection(("127.0.0.1", proxy_server.port)) as sock:
        sock.sendall(request_bytes)
        status, headers, body = answer(sock)
        assert_closed_after(sock)
    error = assert_twilio_shaped(status, body, expected)
    assert headers["content-type"] == "application/json" and error["code"] == expected
    assert "nothing was judged or sent" in error["message"]
    assert "4155550111" not in body.decode() and AUTH_TOKEN not in body.decode()
    time.sleep(0.2)
    assert fake_twilio.creates == [] and attempts(db_engine) == 0
    # gunicorn's own warning names the kind of problem, not the request line it quoted.
    logged = "\n".join(proxy_server.log_lines())
    assert "Invalid request from ip=127.0.0.1" in logged
    assert "4155550111" not in logged and AUTH_TOKEN not in logged and "X-Big" not in logged, logged


@pytest.mark.parametrize("request_bytes, secrets", [
    # A `'` in the query: repr() quotes the line with `"`, and the filter's `\?[^'"]*` stops at the `'`.
    (f"POST {CREATE}?note=it's&To=whatsapp:+1-415-555-0111&secret={API_SECRET}\r\nHost: a\r\n\r\n".encode(),
     [API_SECRET, "415-555-0111"]),
    # A number written with dashes in the path: no run of five digits.
    ("POST /v1/windows/whatsapp:+1-415-555-0111\r\nHost: a\r\n\r\n".encode(), ["415-555-0111"]),
    # A header line without a colon is quoted whole (InvalidHeader(curr)): the credentials with it.
    (f"POST {CREATE} HTTP/1.1\r\nHost: a\r\nAuthorization {AUTH}\r\n\r\n".encode(), [AUTH.split()[1]]),
])
def test_gunicorns_warning_never_quotes_a_number_or_a_secret(proxy_server, request_bytes, secrets):
    with socket.create_connection(("127.0.0.1", proxy_server.port)) as sock:
        sock.sendall(request_bytes)
        status, _, body = answer(sock)
    assert status == 400
    logged = "\n".join(proxy_server.log_lines())
    assert "Invalid request from ip=127.0.0.1" in logged
    assert [s for s in secrets if s in logged] == [], logged
