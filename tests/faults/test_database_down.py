"""The database stops mid-run: inbound answers 503, the gateway fails closed (or open, when asked),
and both recover without a restart. Real PostgreSQL, real gunicorn, fake Twilio on 127.0.0.1."""

import json
import time

import pytest
import requests
from sqlalchemy import create_engine, func, select

from proxy.db import messages, send_attempts
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, BUSINESS, USER, basic_auth, inbound_params, sign
from tests.e2e.conftest import Gunicorn

pytestmark = pytest.mark.e2e
MESSAGES = f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"
SHAPE = {"code", "message", "more_info", "status"}


def env(pg_cluster, fake_twilio, **extra):
    return {"TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_AUTH_TOKEN": AUTH_TOKEN, "DATABASE_URL": pg_cluster.url,
            "TWILIO_API_BASE_URL": fake_twilio.url, "TWILIO_CONTENT_BASE_URL": fake_twilio.url,
            "WEB_CONCURRENCY": "1", **extra}


def inbound(server, sid):
    url = server.url + "/twilio/inbound"
    params = inbound_params(sid)
    return requests.post(url, data=params, headers={"X-Twilio-Signature": sign(url, params)}, timeout=15)


def send(server, body="hi"):
    return requests.post(server.url + MESSAGES, data={"To": USER, "From": BUSINESS, "Body": body},
                         headers=basic_auth(), timeout=15)


def recorded(pg_cluster, sid) -> int:
    engine = create_engine(pg_cluster.url)
    with engine.connect() as conn:
        n = conn.execute(select(func.count()).select_from(messages).where(messages.c.sid == sid)).scalar_one()
    engine.dispose()
    return n


def test_outage_fails_closed_and_recovers_without_restart(pg_cluster, fake_twilio, tmp_path):
    server = Gunicorn(env(pg_cluster, fake_twilio), tmp_path / "closed.log")
    try:
        assert inbound(server, "SM" + "1" * 32).status_code == 200
        assert send(server).status_code == 201
        sent_before = len(fake_twilio.creates)

        pg_cluster.stop()
        down_inbound = inbound(server, "SM" + "2" * 32)
        assert down_inbound.status_code == 503 and set(down_inbound.json()) == SHAPE  # Twilio will retry it
        down_send = send(server)
        assert down_send.status_code == 503 and set(down_send.json()) == SHAPE
        assert len(fake_twilio.creates) == sent_before  # nothing went out unjudged
        assert requests.get(server.url + "/readyz", timeout=15).status_code == 503
        # Counted, and said: the outbox series are gone for the outage, proxy_database_up is not.
        down = metrics(server)
        assert down["proxy_database_up"] == 0.0 and "proxy_outbox_oldest_due_seconds" not in down
        assert down['proxy_send_decisions_total{action="rejected",content_type="none",reason="database_unavailable"}'] \
            == 1.0
        assert down['proxy_webhooks_total{kind="inbound",outcome="database_unavailable"}'] == 1.0
        assert requests.get(server.url + "/healthz", timeout=15).status_code == 200

        pg_cluster.start()
        assert recorded(pg_cluster, "SM" + "2" * 32) == 0  # nothing half-written during the outage
        assert inbound(server, "SM" + "2" * 32).status_code == 200  # Twilio's retry now lands
        assert send(server).status_code == 201
        assert recorded(pg_cluster, "SM" + "2" * 32) == 1
        assert requests.get(server.url + "/readyz", timeout=15).status_code == 200
        assert metrics(server)["proxy_database_up"] == 1.0
    finally:
        server.stop()
        if not _running(pg_cluster):
            pg_cluster.start()


def metrics(server) -> dict[str, float]:
    """/metrics as {series: value}, summed across the gunicorn workers."""
    text = requests.get(server.url + "/metrics", headers=basic_auth(), timeout=30).text
    return {series: float(value) for series, value in
            (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))}


def test_fail_open_forwards_unjudged_and_says_so_loudly(pg_cluster, fake_twilio, tmp_path):
    server = Gunicorn(env(pg_cluster, fake_twilio, FAIL_OPEN="true"), tmp_path / "open.log")
    try:
        pg_cluster.stop()
        response = send(server, "while the database is down")
        assert response.status_code == 201 and response.headers["X-Proxy-Decision"] == "allowed"
        assert len(fake_twilio.creates) == 1
        lines = [json.loads(line) for line in server.log_lines() if line.startswith("{")]
        critical = [line["event"] for line in lines if line["level"] == "CRITICAL"]
        assert "fail_open_enabled" in critical and "fail_open" in critical
        sends = [line for line in lines if line["event"] == "send"]
        assert sends[-1]["reason"] == "fail_open" and sends[-1]["outcome"] == "sent"
        # The attempt's record waits in the worker's writer and lands once the database is back.
        pg_cluster.start()
        deadline, stored = time.monotonic() + 30, []
        while time.monotonic() < deadline and not stored:
            time.sleep(0.5)
            engine = create_engine(pg_cluster.url)
            with engine.connect() as conn:
                stored = conn.execute(select(send_attempts.c.reason, send_attempts.c.outcome)
                                      .where(send_attempts.c.reason == "fail_open")).all()
            engine.dispose()
        assert stored == [("fail_open", "sent")]
    finally:
        server.stop()
        if not _running(pg_cluster):
            pg_cluster.start()


def _running(pg_cluster) -> bool:
    import socket
    try:
        with socket.create_connection(("127.0.0.1", pg_cluster.port), timeout=1):
            return True
    except OSError:
        return False


def test_a_refused_password_is_logged_as_the_drivers_reason_without_the_password(pg_cluster, settings, log_lines):
    """PostgreSQL refusing the password is the driver's reason in the 503's log line (as in the worker's and the
    CLI's), and the password is in none of the lines: libpq names the host, the port and the user, never it."""
    from dataclasses import replace

    from sqlalchemy import text

    from proxy import create_app
    from tests.http.test_gateway import send as send_in_process

    engine = create_engine(pg_cluster.url)
    with engine.begin() as conn:
        conn.execute(text("DROP ROLE IF EXISTS guarded"))
        conn.execute(text("CREATE ROLE guarded LOGIN PASSWORD 'the-right-one'"))
    engine.dispose()
    hba = pg_cluster.data / "pg_hba.conf"
    original = hba.read_text()
    hba.write_text(f"host all guarded 127.0.0.1/32 scram-sha-256\n{original}")  # before the cluster's trust lines
    pg_cluster._run("pg_ctl", "-D", str(pg_cluster.data), "reload")
    wrong = "wrong-password-marker-7d3a"
    try:
        app = create_app(replace(settings, database_url=f"postgresql+psycopg://guarded:{wrong}@127.0.0.1:"
                                                        f"{pg_cluster.port}/proxy"))
        response = send_in_process(app.test_client(), {"To": USER, "From": BUSINESS, "Body": "x"})
        app.extensions["proxy"].engine.dispose()
    finally:
        hba.write_text(original)
        pg_cluster._run("pg_ctl", "-D", str(pg_cluster.data), "reload")
    assert response.status_code == 503
    lines = [line for line in log_lines() if line["event"] == "database_unavailable"]
    assert [line["level"] for line in lines] == ["WARNING", "ERROR"]  # at start-up, then the request
    assert all('password authentication failed for user "guarded"' in line["detail"] for line in lines), lines
    assert wrong not in json.dumps(log_lines())
