"""A PostgreSQL restart between requests: connections idle past PING_AFTER_IDLE_SECONDS are pinged and
replaced before use; connections used moments ago skip that round trip (proxy.db.make_engine)."""

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

import proxy.db
from proxy.db import make_engine


def _backend_pid(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(text("SELECT pg_backend_pid()")).scalar_one()


def test_a_restart_costs_no_request_once_connections_were_idle(pg_cluster, monkeypatch):
    monkeypatch.setattr(proxy.db, "PING_AFTER_IDLE_SECONDS", 0.0)
    engine = make_engine(pg_cluster.url, pool_size=1)
    try:
        pid = _backend_pid(engine)
        pg_cluster.stop()
        pg_cluster.start()
        assert _backend_pid(engine) != pid  # answered at once, on a new connection
    finally:
        engine.dispose()


def test_a_connection_used_moments_ago_is_not_pinged(pg_cluster, monkeypatch):
    # The trade this makes, shown: inside the threshold there is no ping, so a connection closed under
    # it fails its request once (a real restart takes PostgreSQL far longer than the threshold).
    monkeypatch.setattr(proxy.db, "PING_AFTER_IDLE_SECONDS", 3600.0)
    engine = make_engine(pg_cluster.url, pool_size=1)
    try:
        pid = _backend_pid(engine)
        pg_cluster.stop()
        pg_cluster.start()
        with pytest.raises(OperationalError):
            _backend_pid(engine)
        assert _backend_pid(engine) != pid  # and the pool recovers by itself on the next checkout
    finally:
        engine.dispose()
