"""No endpoint but the health ones answers without credentials or a signature."""

import pytest

from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, basic_auth

OPEN = {"/healthz", "/readyz"}


def concrete(rule: str) -> str:
    return (rule.replace("<account_sid>", ACCOUNT_SID).replace("<path:rest>", "Accounts/" + ACCOUNT_SID + "/Calls.json")
            .replace("<sid>", "SM" + "0" * 32).replace("<held_id>", "1"))


def test_every_route_needs_auth_or_a_signature(app, fake_twilio):
    client = app.test_client()
    checked = 0
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = concrete(rule.rule)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            response = client.open(path, method=method, data={"To": "whatsapp:+14155550111", "Body": "x"})
            if rule.rule in OPEN:
                assert response.status_code in (200, 503), path
            else:
                assert response.status_code in (401, 403), (method, path, response.status_code)
                assert set(response.get_json()) == {"code", "message", "more_info", "status"}
            checked += 1
    assert checked >= 10
    assert fake_twilio.requests == []  # nothing unauthenticated ever reached Twilio


@pytest.mark.parametrize("auth", [
    basic_auth(ACCOUNT_SID, AUTH_TOKEN + "x"),
    basic_auth(ACCOUNT_SID, ""),
    basic_auth("", ""),
    basic_auth(ACCOUNT_SID.lower(), AUTH_TOKEN),
    basic_auth(" " + ACCOUNT_SID, AUTH_TOKEN),
    {"Authorization": "Basic " + "A" * 5000},
    {"Authorization": "Digest username=x"},
])
def test_near_miss_credentials_are_rejected(client, fake_twilio, auth):
    response = client.get("/v1/windows?sender=whatsapp:+14155550100&user=whatsapp:+14155550111", headers=auth)
    assert response.status_code == 401


def test_comparisons_are_constant_time():
    """The credential checks go through hmac.compare_digest (asserted on the code, not on timings)."""
    import inspect

    from proxy import auth, ops
    source = inspect.getsource(auth) + inspect.getsource(ops)
    assert source.count("hmac.compare_digest") >= 4
    assert "==" not in inspect.getsource(auth.credentials_match)
