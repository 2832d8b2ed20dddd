"""The outbox worker as the Procfile runs it (`flask --app proxy worker`), killed mid-delivery and mid-create."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
import requests
from sqlalchemy import select

from proxy import create_app
from proxy.db import outbox, utcnow
from proxy.worker import Worker
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, BUSINESS, USER, inbound_params, sign, signed_post
from tests.e2e.conftest import ROOT, procfile_command
from tests.http.test_forwarding import failed_callback, fallback_app
from tests.http.test_gateway import send

pytestmark = pytest.mark.e2e


def start_worker(env: dict, log: Path) -> subprocess.Popen:
    command = procfile_command("worker")
    full_env = {**os.environ, **env, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=ROOT, env=full_env,
                            stdout=open(log, "a"), stderr=subprocess.STDOUT)


def wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_worker_killed_mid_delivery_redelivers_after_restart(settings, database_url, db_engine, fake_app,
                                                            fake_twilio, tmp_path):
    url = fake_app.url + "/app/inbound"
    app = create_app(replace(settings, forward_inbound_url=url, forward_timeout_seconds=1.0))
    fake_app.fail_status = 503  # the app is down when the message comes in: it goes to the outbox
    signed_post(app.test_client(), "/twilio/inbound", inbound_params("SM" + "9" * 32, Body="keep me"))
    app.extensions["proxy"].engine.dispose()
    fake_app.reset()
    fake_app.delay = 1.5  # slow enough to kill the worker while it waits for the app

    env = {"TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_AUTH_TOKEN": AUTH_TOKEN, "DATABASE_URL": database_url,
           "TWILIO_API_BASE_URL": fake_twilio.url, "TWILIO_CONTENT_BASE_URL": fake_twilio.url,
           "FORWARD_INBOUND_URL": url, "OUTBOX_RETRY_SCHEDULE": "0,0,0,0", "OUTBOX_LEASE_SECONDS": "7",
           "WORKER_POLL_SECONDS": "0.2", "FORWARD_TIMEOUT_SECONDS": "2",
           "TWILIO_TIMEOUT_SECONDS": "0.3"}  # the shortest lease allowed: 2 s + 5
    log = tmp_path / "worker.log"
    first = start_worker(env, log)
    try:
        assert wait_for(lambda: fake_app.started >= 1), log.read_text()
        first.send_signal(signal.SIGKILL)  # dies holding the lease, before it can mark the item delivered
        first.wait(10)
    finally:
        first.kill()
    with db_engine.connect() as conn:
        assert conn.execute(select(outbox.c.status)).scalar_one() == "pending"

    second = start_worker(env, log)
    try:
        def delivered():
            with db_engine.connect() as conn:
                return conn.execute(select(outbox.c.status)).scalar_one() == "delivered"
        assert wait_for(delivered), log.read_text()
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(15) == 0  # a clean stop on SIGTERM
    # At-least-once: the killed worker's copy may also have arrived; both carry the same MessageSid.
    assert fake_app.bodies("/app/inbound")[-1] == "keep me"
    assert 1 <= len(fake_app.received) <= 2
    assert {dict(form)["MessageSid"] for _, form, _ in fake_app.received} == {"SM" + "9" * 32}


def test_a_worker_stopped_mid_batch_ends_the_deliveries_under_way_and_hands_back_the_rest(
        settings, database_url, db_engine, fake_app, fake_twilio, tmp_path):
    """SIGTERM while a batch is at a slow app, WORKER_CONCURRENCY deliveries at once: those under way end
    (delivered: the app had them), no other starts, the rest are claimable again at once, and it exits 0."""
    url = fake_app.url + "/app/inbound"
    app = create_app(replace(settings, forward_inbound_url=url, forward_timeout_seconds=1.0, retry_schedule=(0, 0, 0)))
    fake_app.fail_status = 503  # the app is down when the messages come in: they go to the outbox, due at once
    for i in range(5):
        signed_post(app.test_client(), "/twilio/inbound",
                    inbound_params(f"SM{i:032x}", user=f"whatsapp:+1415555{i:04d}", Body=f"m{i}"))
    app.extensions["proxy"].engine.dispose()
    fake_app.reset()
    fake_app.delay = 1.5

    env = {"TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_AUTH_TOKEN": AUTH_TOKEN, "DATABASE_URL": database_url,
           "TWILIO_API_BASE_URL": fake_twilio.url, "TWILIO_CONTENT_BASE_URL": fake_twilio.url,
           "FORWARD_INBOUND_URL": url, "FORWARD_TIMEOUT_SECONDS": "5", "WORKER_CONCURRENCY": "2",
           "WORKER_POLL_SECONDS": "0.2"}
    log = tmp_path / "worker.log"
    worker = start_worker(env, log)
    try:
        assert wait_for(lambda: fake_app.started >= 2), log.read_text()
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(15) == 0, log.read_text()
    finally:
        worker.kill()
    assert fake_app.started == 2 and sorted(fake_app.bodies("/app/inbound")) == ["m0", "m1"]
    with db_engine.connect() as conn:
        rows = conn.execute(select(outbox.c.status, outbox.c.lease_until).order_by(outbox.c.id)).all()
    assert [tuple(row) for row in rows] == [("delivered", None)] * 2 + [("pending", None)] * 3
    events = [json.loads(line)["event"] for line in log.read_text().splitlines() if line.startswith("{")]
    assert events.count("delivery") == 2 and events[-1] == "worker_stopped"


class SilentTwilio:
    """Takes a Messages create and never answers: the worker stays inside its create until it is killed."""

    def __init__(self):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.received, self.connections = [], []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections.append(conn)
            request = b""
            while chunk := conn.recv(65536):  # until the body is in: the worker then waits for the answer
                request += chunk
                head, _, body = request.partition(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), None)
                if length is not None and len(body) >= length:
                    break
            self.received.append(request)

    def close(self):
        self.listener.close()
        for conn in self.connections:
            conn.close()


def test_a_worker_killed_during_a_fallback_create_never_sends_it_again(settings, database_url, db_engine,
                                                                      fake_twilio, tmp_path, log_lines):
    """The create is not idempotent: after the lease, the fallback is left `uncertain` for an operator."""
    app = fallback_app(settings, fake_twilio)
    client = app.test_client()
    signed_post(client, "/twilio/inbound", inbound_params("SM" + "8" * 32))
    sid = send(client, {"To": USER, "From": BUSINESS, "Body": "x"}).get_json()["sid"]
    assert signed_post(client, "/twilio/status", failed_callback(sid)).status_code == 200
    twilio = SilentTwilio()
    env = {"TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_AUTH_TOKEN": AUTH_TOKEN, "DATABASE_URL": database_url,
           "TWILIO_API_BASE_URL": twilio.url, "TWILIO_CONTENT_BASE_URL": fake_twilio.url,
           "TWILIO_TIMEOUT_SECONDS": "60", "OUTBOX_LEASE_SECONDS": "186", "WORKER_POLL_SECONDS": "0.2"}
    log = tmp_path / "worker.log"
    worker = start_worker(env, log)
    try:
        assert wait_for(lambda: twilio.received), log.read_text()
        worker.send_signal(signal.SIGKILL)  # dies inside the create: Twilio may have taken the fallback
        worker.wait(10)
    finally:
        worker.kill()
        twilio.close()
    assert b"ContentSid=" + app.fallback_sid.encode() in twilio.received[0]

    restarted = create_app(app.extensions["proxy"].settings)  # another worker, after the lease ran out
    for later in (timedelta(seconds=186), timedelta(days=1)):
        Worker(restarted.extensions["proxy"]).run_once(utcnow() + later)
    assert [r for r in fake_twilio.creates if dict(r.form).get("ContentSid") == app.fallback_sid] == []
    with db_engine.connect() as conn:
        [(item_id, status)] = conn.execute(select(outbox.c.id, outbox.c.status).where(outbox.c.kind == "send")).all()
    assert status == "uncertain"
    [line] = [line for line in log_lines() if line["event"] == "delivery" and line.get("outcome") == "uncertain"]
    assert line["level"] == "ERROR" and line["outbox_id"] == item_id
    listed = restarted.test_cli_runner().invoke(args=["outbox", "list", "--status", "uncertain"])
    assert json.loads(listed.stdout.splitlines()[0])["id"] == item_id
    restarted.extensions["proxy"].engine.dispose()
    app.extensions["proxy"].engine.dispose()


def test_a_late_63016_reaching_another_instance_gets_its_fallback_once(database_url, db_engine, fake_twilio,
                                                                      tmp_path):
    """Two gunicorn instances and the worker, as deployed: the send goes through one, Twilio's failed
    callback reaches the other at once (the sender's attempt row may not be stored yet). The user gets
    the fallback template, once."""
    from tests.e2e.conftest import Gunicorn

    fallback = fake_twilio.add_content({"twilio/text": {"body": "Hi {{1}}"}}, "approved")
    env = {"TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_AUTH_TOKEN": AUTH_TOKEN, "DATABASE_URL": database_url,
           "TWILIO_API_BASE_URL": fake_twilio.url, "TWILIO_CONTENT_BASE_URL": fake_twilio.url,
           "FALLBACK_CONTENT_SID": fallback, "FALLBACK_CONTENT_VARIABLES": '{"1": "{profile_name}"}',
           "WEB_CONCURRENCY": "1", "WORKER_POLL_SECONDS": "0.2"}
    sender, receiver = (Gunicorn(env, tmp_path / f"instance{i}.log") for i in range(2))
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        url = sender.url + "/twilio/inbound"
        params = inbound_params("SM" + "6" * 32)
        assert requests.post(url, data=params, headers={"X-Twilio-Signature": sign(url, params)},
                             timeout=10).status_code == 200
        sent = requests.post(sender.url + f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json",
                             data={"To": USER, "From": BUSINESS, "Body": "in window"}, auth=(ACCOUNT_SID, AUTH_TOKEN),
                             timeout=10)
        assert sent.status_code == 201 and sent.headers["X-Proxy-Decision"] == "allowed"
        url = receiver.url + "/twilio/status"
        callback = failed_callback(sent.json()["sid"])
        for _ in range(2):  # Twilio may repeat a callback
            assert requests.post(url, data=callback, headers={"X-Twilio-Signature": sign(url, callback)},
                                 timeout=10).status_code == 200

        def fallbacks():
            return [r for r in fake_twilio.creates if dict(r.form).get("ContentSid") == fallback]
        assert wait_for(lambda: fallbacks(), timeout=30), (tmp_path / "worker.log").read_text()[-3000:]
        time.sleep(1.0)  # a second copy would follow within the worker's next polls
        [create] = fallbacks()
        assert dict(create.form)["To"] == USER and "Body" not in dict(create.form)
        window = requests.get(sender.url + "/v1/windows", params={"sender": BUSINESS, "user": USER},
                              auth=(ACCOUNT_SID, AUTH_TOKEN), timeout=10).json()
        assert window["open"] is False  # the late 63016 proved it closed
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(15)
        sender.stop()
        receiver.stop()
