"""A PostgreSQL host that accepts the connection and never answers: the engine gives up within its connect
timeout (proxy.db.make_engine) instead of holding a request until gunicorn kills the worker. Runs on any
database under test: the silent host is a loopback socket, psycopg only has to be installed."""

from __future__ import annotations

import socket
import threading

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

import proxy.db
from proxy.db import make_engine

# How long a test waits for a connection attempt before calling it hung: far above any connect timeout
# under test, far below psycopg's own default (130 s) that left a request hanging.
HANG_SECONDS = 60


class SilentHost:
    """Accepts TCP connections on 127.0.0.1 and never reads or writes a byte, until closed."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:  # closed
                return
            self.accepted.append(conn)

    def url(self, query: str = "") -> str:
        return f"postgresql+psycopg://proxy@127.0.0.1:{self.port}/proxy" + (f"?{query}" if query else "")

    def close(self) -> None:
        self.listener.close()
        for conn in self.accepted:  # a client still waiting gets its end of file: no thread outlives the test
            conn.close()


@pytest.fixture
def silent_host():
    host = SilentHost()
    yield host
    host.close()


def connect_outcome(engine) -> BaseException | None:
    """What opening a connection and running one query ends in (None: success); fails the test if it hangs."""
    outcome: list = []

    def attempt():
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 — handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(HANG_SECONDS)
    assert outcome, f"no error within {HANG_SECONDS} s: the connection attempt hangs"
    return outcome[0]


def test_a_host_that_never_answers_fails_the_connection_instead_of_hanging(silent_host):
    engine = make_engine(silent_host.url(), pool_size=1)
    try:
        error = connect_outcome(engine)
    finally:
        engine.dispose()
    assert isinstance(error, OperationalError) and "timeout" in str(error.orig)
    assert silent_host.accepted  # it did reach the host: the connect, not the address, timed out


def test_the_database_urls_own_connect_timeout_wins(silent_host, monkeypatch):
    # The proxy's default is put out of reach: only the URL's 2 s can end the attempt within the test.
    monkeypatch.setattr(proxy.db, "CONNECT_TIMEOUT_SECONDS", 3600)
    engine = make_engine(silent_host.url("connect_timeout=2"), pool_size=1)
    try:
        error = connect_outcome(engine)
    finally:
        engine.dispose()
    assert isinstance(error, OperationalError) and "timeout" in str(error.orig)


def bounded(work):
    """`work()`'s result; fails the test if it has not returned within HANG_SECONDS."""
    result: list = []
    thread = threading.Thread(target=lambda: result.append(work()), daemon=True)
    thread.start()
    thread.join(HANG_SECONDS)
    assert result, f"no answer within {HANG_SECONDS} s: hung on the silent database host"
    return result[0]


def test_the_proxy_on_a_database_host_that_never_answers_fails_closed_as_for_any_outage(
        settings, fake_twilio, silent_host, log_lines, monkeypatch):
    """The gateway, the webhooks, /readyz and the CLI answer as for a database that is down: one 503 (or one
    `Error:` line) each, in bounded time, instead of a worker killed by gunicorn's --timeout."""
    import proxy.migrate
    from dataclasses import replace

    from proxy import create_app
    from tests.conftest import BUSINESS, USER, inbound_params, signed_post
    from tests.http.test_gateway import SHAPE, send

    monkeypatch.setattr(proxy.db, "CONNECT_TIMEOUT_SECONDS", 2)  # the default, shortened: the URL sets none
    monkeypatch.setattr(proxy.migrate, "START_CHECK_CONNECT_TIMEOUT_SECONDS", 2)
    app = bounded(lambda: create_app(replace(settings, database_url=silent_host.url())))
    client = app.test_client()
    try:
        tried = len(silent_host.accepted)
        response = bounded(lambda: send(client, {"To": USER, "From": BUSINESS, "Body": "x"}))
        assert response.status_code == 503 and set(response.json) == SHAPE
        # One connection attempt, one timeout: the migrations check and then the judge each waited out their own.
        assert len(silent_host.accepted) - tried == 1
        assert response.headers["X-Proxy-Decision"] == "rejected" and not fake_twilio.creates
        request_id = response.headers["X-Request-Id"]
        assert [(line["event"], line["level"]) for line in log_lines() if line.get("request_id") == request_id] == [
            ("database_unavailable", "ERROR")]

        inbound = bounded(lambda: signed_post(client, "/twilio/inbound", inbound_params("SM" + "7" * 32)))
        assert inbound.status_code == 503 and set(inbound.json) == SHAPE  # Twilio retries it

        ready = bounded(lambda: client.get("/readyz"))
        assert ready.status_code == 503 and ready.json["reason"] == "database_unreachable"

        result = bounded(lambda: app.test_cli_runner().invoke(args=["outbox", "list"]))
        assert result.exit_code == 1, result.output
        (line,) = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert "the database is unavailable" in line and "timeout" in line and "Traceback" not in result.output
    finally:
        app.extensions["proxy"].engine.dispose()


@pytest.mark.parametrize("query, expected", [
    ("", {"connect_timeout": proxy.db.CONNECT_TIMEOUT_SECONDS, "tcp_user_timeout": proxy.db.TCP_USER_TIMEOUT_MS}),
    ("tcp_user_timeout=2500&connect_timeout=3", {"connect_timeout": "3", "tcp_user_timeout": "2500"}),
])
def test_an_open_connection_to_a_host_that_stops_answering_is_given_up_on(silent_host, query, expected):
    """libpq's tcp_user_timeout bounds how long sent data may go unacknowledged; without it a query to a host
    that died mid-connection waited for the kernel's retransmissions (~15 minutes). A dropped packet cannot be
    staged on loopback, so this checks what reaches the driver: the default, or the URL's own values."""
    from sqlalchemy import event

    engine = make_engine(silent_host.url(query), pool_size=1)
    given: dict = {}

    @event.listens_for(engine, "do_connect")
    def capture(dialect, record, cargs, cparams):
        given.update(cparams)
        raise OperationalError("captured", {}, RuntimeError("not connecting"))

    try:
        with pytest.raises(OperationalError):
            engine.connect()
    finally:
        engine.dispose()
    assert {name: given.get(name) for name in expected} == expected


def test_a_sqlite_write_lock_that_could_not_be_opened_is_tried_again_once_the_folder_exists(tmp_path, monkeypatch):
    """A process started while its database's folder could not be made (a file in its place) wrote without the
    cross-process lock for good, even once an operator had made the folder and migrated the database."""
    blocker = tmp_path / "data"
    blocker.write_text("")  # a file where the folder should be
    engine = make_engine(f"sqlite:///{blocker / 'proxy.sqlite3'}")
    lock = proxy.db._WRITE_LOCKS[engine]
    monkeypatch.setattr(lock, "retry_seconds", 0.0)
    try:
        with pytest.raises(OperationalError):
            with proxy.db.writing(engine) as conn:
                conn.execute(text("CREATE TABLE t (x INTEGER)"))
        assert lock._fd is None
        blocker.unlink()
        blocker.mkdir()
        with proxy.db.writing(engine) as conn:
            conn.execute(text("CREATE TABLE t (x INTEGER)"))
        assert lock._fd is not None and (blocker / "proxy.sqlite3.write-lock").exists()
    finally:
        engine.dispose()
