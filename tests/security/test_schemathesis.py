"""schemathesis, driven by Twilio's own OpenAPI for the Messages API, against the proxy on 127.0.0.1."""

import os
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings as hsettings

from tests.conftest import ACCOUNT_SID, basic_auth
from proxy.sandbox import ServerThread

# Twilio's OpenAPI (twilio/twilio-oai 2.6.7): the team's copy in shared/ beside the checkout when it is
# there, else the copy kept in tests/data so the suite runs anywhere.
SHARED = Path(__file__).resolve().parents[3] / "shared" / "twilio-oai" / "twilio_api_v2010_messages.json"
SPEC = Path(os.environ.get("TWILIO_OAI_SPEC") or
            (SHARED if SHARED.exists() else Path(__file__).resolve().parents[1] / "data" / SHARED.name))

schema = schemathesis.openapi.from_path(SPEC)
RFC9457 = {"type", "title", "status", "code"}


@pytest.fixture
def live_proxy(app, fake_twilio):
    with ServerThread(app) as server:
        yield server.url


@schema.parametrize()
@hsettings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_messages_api_never_fails_and_errors_are_twilio_shaped(case, live_proxy):
    if "AccountSid" in (case.path_parameters or {}):
        case.path_parameters["AccountSid"] = ACCOUNT_SID  # our account, so the requests reach the logic
    response = case.call(base_url=live_proxy, headers=basic_auth())
    assert response.status_code < 500 or response.status_code in (502, 503, 504), response.text
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"code", "message", "more_info", "status"}, body
        assert not RFC9457 <= set(body)
