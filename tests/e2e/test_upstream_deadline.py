"""TWILIO_TIMEOUT_SECONDS bounds a whole call to Twilio through gunicorn's gevent workers, not each read: an answer
trickling in a byte at a time held a send (and a template lookup) for as long as it lasted, past the timeout
the README tells callers to set theirs by (review, session 15)."""

import os
import socket
import threading
import time

import pytest
import requests

from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, BUSINESS, USER
from tests.e2e.conftest import Gunicorn

BODY = b'{"sid": "SM00000000000000000000000000000000", "status": "queued"}'


class Trickle:
    """An HTTP server on 127.0.0.1 that answers every request with its headers at once, then its body a byte every
    `pause` seconds: each read is quick, the whole answer is not."""

    def __init__(self, pause: float = 0.25):
        self.pause, self.stopped = pause, threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while not self.stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn):
        with conn:
            try:
                received = b""
                while b"\r\n\r\n" not in received:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    received += chunk
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n" % len(BODY))
                for byte in BODY:
                    if self.stopped.wait(self.pause):
                        return
                    conn.sendall(bytes([byte]))
            except OSError:
                return  # the proxy hung up: what is being tested

    def close(self):
        self.stopped.set()
        self.listener.close()


@pytest.fixture
def trickling_proxy(database_url, db_engine, tmp_path):
    if os.environ.get("WEB_WORKER_CLASS", "gevent") != "gevent":
        pytest.skip("under threads a read in progress cannot be given up on from outside; each read has its timeout")
    upstream = Trickle()
    server = Gunicorn({"TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_AUTH_TOKEN": AUTH_TOKEN, "DATABASE_URL": database_url,
                       "TWILIO_API_BASE_URL": upstream.url, "TWILIO_CONTENT_BASE_URL": upstream.url,
                       "TWILIO_TIMEOUT_SECONDS": "1", "WEB_CONCURRENCY": "1",
                       "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics")}, tmp_path / "gunicorn.log")
    yield server
    server.stop()
    upstream.close()


def test_a_twilio_answer_that_trickles_in_is_a_504_at_the_timeout(trickling_proxy):
    """It took 16 s (one byte every 0.25 s) and came back 200; the caller had been told 1 s."""
    url = f"{trickling_proxy.url}/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/SM{'1' * 32}.json"
    started = time.monotonic()
    response = requests.get(url, auth=(ACCOUNT_SID, AUTH_TOKEN), timeout=60)
    assert response.status_code == 504, (response.status_code, time.monotonic() - started)
    assert response.json()["message"].startswith("Twilio did not answer within 1s")
    # The worker's greenlet was freed, and the next call is answered (504 again, not queued behind the first).
    assert requests.get(url, auth=(ACCOUNT_SID, AUTH_TOKEN), timeout=60).status_code == 504


def test_a_template_lookup_that_trickles_in_is_refused_at_the_timeout(trickling_proxy):
    """The Content API's answer, trickling in, held a send for as long as it lasted."""
    url = f"{trickling_proxy.url}/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"
    response = requests.post(url, data={"To": USER, "From": BUSINESS, "ContentSid": "HX" + "a" * 32},
                             auth=(ACCOUNT_SID, AUTH_TOKEN), timeout=60)
    assert response.status_code == 503, response.text
    assert "did not answer within 1s" in response.json()["message"]
