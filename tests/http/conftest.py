"""Fixtures shared by the HTTP tests."""

from dataclasses import replace

import pytest

from proxy import create_app

SCHEDULE = (0, 5, 300)  # the forwards' retry schedule: a first retry after 5 s, then 300 s


@pytest.fixture
def forwarding(settings, db_engine, fake_app, fake_twilio):
    """An app forwarding inbound to /app/inbound and statuses to /app/status of the fake app."""
    s = replace(settings, forward_inbound_url=fake_app.url + "/app/inbound",
                forward_status_url=fake_app.url + "/app/status", forward_timeout_seconds=1.0,
                retry_schedule=SCHEDULE)
    app = create_app(s)
    yield app
    app.extensions["proxy"].engine.dispose()
