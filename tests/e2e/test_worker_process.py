"""The outbox worker as the Procfile runs it (`flask --app proxy worker`), killed mid-delivery."""

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import select

from proxy import create_app
from proxy.db import outbox
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, inbound_params, signed_post
from tests.e2e.conftest import ROOT, procfile_command

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
           "TWILIO_TIMEOUT_SECONDS": "0.5"}  # the shortest lease allowed: 2 s + 5
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
