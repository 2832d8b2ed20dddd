"""The same twilio-python calls straight at the fake Twilio and through the proxy (gunicorn, the Procfile
line) give the same answer: "change one line, nothing else"."""

import pytest
import requests
from twilio.rest import Client

from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, BUSINESS, USER, inbound_params, sign

pytestmark = pytest.mark.e2e

# Set by whichever server answers the client (gunicorn, werkzeug), not by Twilio; and the proxy's own.
_PER_HOP = {"date", "server", "content-length", "connection", "keep-alive", "transfer-encoding"}


def _clients(fake_twilio, proxy_server) -> tuple[Client, Client]:
    direct, proxied = Client(ACCOUNT_SID, AUTH_TOKEN), Client(ACCOUNT_SID, AUTH_TOKEN)
    direct.api.base_url, proxied.api.base_url = fake_twilio.url, proxy_server.url
    return direct, proxied


def _twilio_headers(api_response) -> dict:
    return {k.lower(): v for k, v in api_response.headers.items()
            if k.lower() not in _PER_HOP and not k.lower().startswith("x-proxy-") and k.lower() != "x-request-id"}


def test_with_http_info_shows_twilios_response_headers(proxy_server, fake_twilio):
    url = proxy_server.url + "/twilio/inbound"
    params = inbound_params("SM" + "1" * 32)
    assert requests.post(url, data=params, headers={"X-Twilio-Signature": sign(url, params)}, timeout=10).ok
    direct, proxied = _clients(fake_twilio, proxy_server)
    for client in (direct, proxied):
        created = client.messages.create_with_http_info(to=USER, from_=BUSINESS, body="hi")
        assert created.status_code == 201
        sid = created.data.sid
        calls = {"create": created,
                 "fetch": client.messages(sid).fetch_with_http_info(),
                 "list": client.messages.list_with_http_info(limit=5),
                 "update": client.messages(sid).update_with_http_info(body=""),
                 "delete": client.messages(sid).delete_with_http_info()}
        client.seen = {name: _twilio_headers(response) for name, response in calls.items()}
    for name, headers in direct.seen.items():
        assert {"x-home-region", "twilio-request-id", "content-type"} <= set(headers), name
        assert set(proxied.seen[name]) == set(headers), name
        assert proxied.seen[name]["x-home-region"] == headers["x-home-region"]
