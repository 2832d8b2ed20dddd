"""The same twilio-python calls straight at the fake Twilio and through the proxy (gunicorn, the Procfile
line) give the same answer: "change one line, nothing else"."""

import pytest
import requests
from twilio.rest import Client

from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, BUSINESS, USER, inbound_params, sign

pytestmark = pytest.mark.e2e

# Set by whichever server answers the client (gunicorn, werkzeug), not by Twilio; and the proxy's own.
_PER_HOP = {"date", "server", "content-length", "connection", "keep-alive", "transfer-encoding"}
_TWILIOS_HOST_ONLY = {"set-cookie", "strict-transport-security"}  # not the proxy host's to take


def _clients(fake_twilio, proxy_server) -> tuple[Client, Client]:
    direct, proxied = Client(ACCOUNT_SID, AUTH_TOKEN), Client(ACCOUNT_SID, AUTH_TOKEN)
    direct.api.base_url, proxied.api.base_url = fake_twilio.url, proxy_server.url
    return direct, proxied


def _twilio_headers(api_response) -> dict:
    return {k.lower(): v for k, v in api_response.headers.items()
            if k.lower() not in _PER_HOP | _TWILIOS_HOST_ONLY and not k.lower().startswith("x-proxy-") and k.lower() != "x-request-id"}


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


def test_paging_through_the_proxy_matches_twilio(proxy_server, fake_twilio):
    """page_size, next/previous pages and filters: the next_page_uri Twilio gives is followed through the proxy."""
    url = proxy_server.url + "/twilio/inbound"
    params = inbound_params("SM" + "2" * 32)
    assert requests.post(url, data=params, headers={"X-Twilio-Signature": sign(url, params)}, timeout=10).ok
    direct, proxied = _clients(fake_twilio, proxy_server)
    sent = [proxied.messages.create(to=USER, from_=BUSINESS, body=f"m{i}").sid for i in range(5)]
    direct.messages.create(to="+14155550122", from_="+14155550100", body="sms")  # filtered out below
    for client in (direct, proxied):
        before = len(fake_twilio.requests)
        listed = client.messages.list(to=USER, page_size=2)
        assert [m.sid for m in listed] == sent[::-1]
        gets = [r for r in fake_twilio.requests[before:] if r.method == "GET"]
        assert len(gets) == 3 and all("PageSize=2" in r.query and "To=" in r.query for r in gets)
        first = client.messages.page(to=USER, page_size=2)  # a Page is an iterator: read once
        assert [m.sid for m in first] == sent[4:2:-1] and first.next_page_url.startswith(client.api.base_url)
        second = first.next_page()
        assert [m.sid for m in second] == sent[2:0:-1]
        assert [m.sid for m in second.previous_page()] == sent[4:2:-1]
        assert [m.body for m in client.messages.stream(to=USER, page_size=4, limit=3)] == ["m4", "m3", "m2"]
