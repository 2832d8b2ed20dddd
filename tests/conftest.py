"""Shared fixtures: one migrated database per run (SQLite, or PostgreSQL via TEST_DATABASE_URL),
a fake Twilio on 127.0.0.1, and an app wired to both."""

from __future__ import annotations

import io
import json
import logging
import os
from urllib.parse import urlencode

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import create_engine, text
from twilio.request_validator import RequestValidator

from proxy import create_app
from proxy import logs as proxy_logs
from proxy.attempts import flush_all
from proxy.migrate import upgrade
from proxy.db import metadata
from proxy.settings import Settings, normalise_database_url
from proxy.sandbox import ServerThread, Simulator

ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
AUTH_TOKEN = "test-auth-token-0123456789abcdef"
BUSINESS = "whatsapp:+14155550100"
USER = "whatsapp:+14155550111"


class ServerLikeClient(FlaskClient):
    """Closes each response as soon as it is read whole, as a WSGI server closes it once written: the gateway logs
    and records a send then (proxy/gateway.py), and a test looks for them once its call has returned."""

    def open(self, *args, buffered: bool = True, **kwargs):
        return super().open(*args, buffered=buffered, **kwargs)


Flask.test_client_class = ServerLikeClient

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", None, ""}


@pytest.fixture(scope="session", autouse=True)
def loopback_only():
    """Tests talk to 127.0.0.1 only: any other host name or address fails the test at once."""
    import socket

    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def guarded_getaddrinfo(host, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else host
        if name not in LOOPBACK_HOSTS and not str(name).startswith("127."):
            raise OSError(f"test tried to resolve {name!r}: only loopback is allowed")
        return real_getaddrinfo(host, *args, **kwargs)

    def guarded_connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            host = address[0]
            if not (host.startswith("127.") or host in ("::1", "localhost")):
                raise OSError(f"test tried to connect to {host!r}: only loopback is allowed")
        return real_connect(sock, address)

    socket.getaddrinfo = guarded_getaddrinfo
    socket.socket.connect = guarded_connect
    yield
    socket.getaddrinfo, socket.socket.connect = real_getaddrinfo, real_connect


def pytest_report_header(config):
    return f"database: {_database_kind()}"


def _database_kind() -> str:
    return "postgresql" if os.environ.get("TEST_DATABASE_URL", "").startswith("postg") else "sqlite"


@pytest.fixture(scope="session")
def database_url(tmp_path_factory) -> str:
    raw = os.environ.get("TEST_DATABASE_URL", "").strip()
    url = normalise_database_url(raw) if raw else f"sqlite:///{tmp_path_factory.mktemp('db') / 'proxy.sqlite3'}"
    engine = create_engine(url)
    with engine.begin() as conn:  # start from nothing, so migrations alone make the schema
        for table in reversed(metadata.sorted_tables):
            conn.execute(text(f'DROP TABLE IF EXISTS "{table.name}"'))
        conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
    engine.dispose()
    upgrade(url)
    return url


@pytest.fixture
def db_engine(database_url):
    flush_all()  # an earlier test's attempt records must land before the tables are emptied
    engine = create_engine(database_url)
    with engine.begin() as conn:
        for table in reversed(metadata.sorted_tables):
            conn.execute(table.delete())
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def fake_twilio_server():
    fake = Simulator(ACCOUNT_SID, AUTH_TOKEN)  # the sandbox simulator is the one fake Twilio
    with ServerThread(fake.app()) as server:
        fake.url = server.url
        yield fake


@pytest.fixture
def fake_twilio(fake_twilio_server):
    fake_twilio_server.reset()
    yield fake_twilio_server
    fake_twilio_server.reset()


@pytest.fixture
def settings(database_url, fake_twilio) -> Settings:
    return Settings(
        account_sid=ACCOUNT_SID,
        auth_token=AUTH_TOKEN,
        database_url=database_url,
        twilio_api_base_url=fake_twilio.url,
        twilio_content_base_url=fake_twilio.url,
        twilio_timeout_seconds=2.0,
    )


@pytest.fixture
def app(settings, db_engine):
    app = create_app(settings)
    yield app
    app.extensions["proxy"].attempts.flush()
    app.extensions["proxy"].engine.dispose()


@pytest.fixture
def client(app):
    return app.test_client()


def sign(url: str, params, token: str = AUTH_TOKEN) -> str:
    return RequestValidator(token).compute_signature(url, params)


def signed_post(client, path: str, params: dict, *, base: str = "http://localhost", token: str = AUTH_TOKEN):
    """POST a webhook the way Twilio does: form-encoded, signed for the exact URL."""
    return client.post(path, data=urlencode(params), content_type="application/x-www-form-urlencoded",
                       headers={"X-Twilio-Signature": sign(base + path, params, token)})


def inbound_params(sid: str, user: str = USER, business: str = BUSINESS, **extra) -> dict:
    params = {"MessageSid": sid, "SmsSid": sid, "AccountSid": ACCOUNT_SID, "From": user, "To": business,
              "Body": "hello", "NumMedia": "0", "SmsStatus": "received", "ApiVersion": "2010-04-01",
              "ProfileName": "Ada"}
    if user.startswith("whatsapp:+"):  # WhatsApp's own id for the user: only WhatsApp webhooks carry one
        params["WaId"] = user.removeprefix("whatsapp:+")
    params.update(extra)
    return params


def basic_auth(user: str = ACCOUNT_SID, password: str = AUTH_TOKEN) -> dict:
    import base64
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture(scope="session")
def fake_app_server():
    from tests.fake_app import FakeApp
    fake = FakeApp(AUTH_TOKEN)
    with ServerThread(fake.app()) as server:
        fake.url = server.url
        yield fake


@pytest.fixture
def fake_app(fake_app_server):
    fake_app_server.reset()
    yield fake_app_server
    fake_app_server.reset()


@pytest.fixture
def log_lines():
    """The proxy's log records, formatted by its own JSON formatter."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(proxy_logs.make_formatter())
    proxy_logs.log.addHandler(handler)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    proxy_logs.log.removeHandler(handler)
