"""Webhook signatures: forged, replayed, missing, port variants, JSON bodySHA256, SharedKey HMAC-SHA256."""

import hashlib
import json
from dataclasses import replace

import pytest
from sqlalchemy import func, select
from twilio.request_validator import RequestValidator

from proxy import create_app
from proxy.db import messages, windows
from tests.conftest import AUTH_TOKEN, inbound_params, sign

URL = "http://localhost/twilio/inbound"


def count(engine, table):
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar_one()


def test_forged_signature_with_a_guessed_token_is_rejected(client, db_engine):
    params = inbound_params("SM" + "1" * 32)
    for token in ("", "0" * 32, AUTH_TOKEN[:-1], AUTH_TOKEN.upper()):
        forged = RequestValidator(token or "x").compute_signature(URL, params)
        assert client.post("/twilio/inbound", data=params, headers={"X-Twilio-Signature": forged}).status_code == 403
    assert count(db_engine, messages) == 0


def test_signature_replayed_to_another_url_is_rejected(client, db_engine):
    params = inbound_params("SM" + "2" * 32)
    for signed_for in ("http://localhost/twilio/status", "http://localhost/twilio/inbound?x=1",
                       "https://localhost/twilio/inbound", "http://evil.example/twilio/inbound"):
        response = client.post("/twilio/inbound", data=params, headers={"X-Twilio-Signature": sign(signed_for, params)})
        assert response.status_code == 403, signed_for
    assert count(db_engine, windows) == 0


@pytest.mark.parametrize("header", [
    "é" * 28,  # not ASCII: the constant-time comparison must still answer, unequal
    "\x00" * 28,
    "A" * 27 + "=",  # base64-shaped, wrong
    "A" * 4096,
])
def test_a_garbled_signature_header_is_a_403_not_an_error(client, db_engine, header):
    params = inbound_params("SM" + "5" * 32)
    response = client.post("/twilio/inbound", data=params, headers={"X-Twilio-Signature": header})
    assert response.status_code == 403
    assert response.get_json()["code"] == 20403
    assert count(db_engine, messages) == 0


@pytest.mark.parametrize("signed_for, base", [
    ("https://proxy.example.com:443/twilio/inbound", "https://proxy.example.com"),  # Twilio added the default port
    ("https://proxy.example.com/twilio/inbound", "https://proxy.example.com:443"),  # configured with the port
])
def test_default_port_variants_are_accepted(settings, db_engine, signed_for, base):
    client = create_app(replace(settings, public_base_url=base)).test_client()
    params = inbound_params("SM" + "3" * 32)
    assert client.post("/twilio/inbound", data=params,
                       headers={"X-Twilio-Signature": sign(signed_for, params)}).status_code == 200


def test_another_port_is_another_url(settings, db_engine):
    client = create_app(replace(settings, public_base_url="https://proxy.example.com")).test_client()
    params = inbound_params("SM" + "4" * 32)
    signature = sign("https://proxy.example.com:8443/twilio/inbound", params)
    assert client.post("/twilio/inbound", data=params, headers={"X-Twilio-Signature": signature}).status_code == 403


def json_webhook(client, body: dict, *, tamper: bool = False, token: str = AUTH_TOKEN):
    raw = json.dumps(body)
    digest = hashlib.sha256(raw.encode()).hexdigest()
    path = f"/twilio/inbound?bodySHA256={digest}"
    signature = RequestValidator(token).compute_signature("http://localhost" + path, {})
    sent = raw.replace("hello", "HELLO") if tamper else raw
    return client.post(path, data=sent, content_type="application/json", headers={"X-Twilio-Signature": signature})


def test_json_webhooks_are_checked_by_body_hash(client, db_engine):
    body = inbound_params("SM" + "5" * 32)
    assert json_webhook(client, body, tamper=True).status_code == 403
    assert json_webhook(client, body, token="other").status_code == 403
    assert count(db_engine, messages) == 0
    assert json_webhook(client, body).status_code == 200
    assert count(db_engine, windows) == 1


@pytest.mark.parametrize("path, field", [("/twilio/inbound", "ProfileName"), ("/twilio/inbound", "Body"),
                                         ("/twilio/status", "MessageStatus"), ("/twilio/status", "To")])
def test_a_json_webhook_spelling_a_lone_surrogate_is_bad_input_not_an_outage(client, db_engine, path, field):
    """JSON's \\u escapes can spell a lone surrogate, which no UTF-8 body holds: it reached the database driver
    and answered 503 "database unavailable" (on SQLite failing the other webhooks committed with it)."""
    body = inbound_params("SM" + "8" * 32) | {field: "\ud83d"}
    raw = json.dumps(body)  # ensure_ascii: the surrogate travels as the escape \ud83d
    signed = f"{path}?bodySHA256={hashlib.sha256(raw.encode()).hexdigest()}"
    signature = RequestValidator(AUTH_TOKEN).compute_signature("http://localhost" + signed, {})
    response = client.post(signed, data=raw, content_type="application/json", headers={"X-Twilio-Signature": signature})
    assert response.status_code == 400 and response.get_json()["code"] == 400, response.get_data(as_text=True)
    assert count(db_engine, messages) == 0 and count(db_engine, windows) == 0


def test_json_without_body_hash_is_rejected(client):
    body = json.dumps(inbound_params("SM" + "6" * 32))
    signature = RequestValidator(AUTH_TOKEN).compute_signature(URL, {})
    response = client.post("/twilio/inbound", data=body, content_type="application/json",
                           headers={"X-Twilio-Signature": signature})
    assert response.status_code == 403


SHARED = {"webhooks_sharedkey_1": "shared-secret-1"}


def test_shared_key_hmac_sha256_signatures(settings, db_engine):
    client = create_app(replace(settings, webhook_shared_keys=SHARED)).test_client()
    params = inbound_params("SM" + "7" * 32)
    good = RequestValidator("shared-secret-1").compute_signature(URL, params, "HMAC_SHA256")
    header = "key=webhooks_sharedkey_1,algorithm=HMAC_SHA256"
    ok = client.post("/twilio/inbound", data=params,
                     headers={"X-Twilio-Signature": good, "X-Twilio-Webhooks-Signature-Settings": header})
    assert ok.status_code == 200
    sha1 = RequestValidator("shared-secret-1").compute_signature(URL, params)  # right key, wrong algorithm
    unknown = "key=webhooks_sharedkey_2,algorithm=HMAC_SHA256"
    for signature, settings_header in ((sha1, header), (good, unknown),
                                       (sign(URL, params), header)):  # auth token where the key is expected
        response = client.post("/twilio/inbound", data=params, headers={
            "X-Twilio-Signature": signature, "X-Twilio-Webhooks-Signature-Settings": settings_header})
        assert response.status_code == 403
    assert count(db_engine, messages) == 1


def test_unsigned_webhooks_only_with_the_development_switch(settings, db_engine, log_lines):
    params = inbound_params("SM" + "8" * 32)
    assert create_app(settings).test_client().post("/twilio/inbound", data=params).status_code == 403
    dev = create_app(replace(settings, allow_unsigned_webhooks=True))
    assert [line["event"] for line in log_lines() if line["level"] == "CRITICAL"] == ["unsigned_webhooks_allowed"]
    assert dev.test_client().post("/twilio/inbound", data=params).status_code == 200
    assert any(line["event"] == "webhook_unsigned_accepted" for line in log_lines())


def test_a_replay_cannot_fold_the_next_field_into_the_message_sid(client, db_engine):
    """The signed string is name+value of each field with no separators: `MessageSid=SM…` followed by
    `MessageType=text` signs exactly like `MessageSid=SM…MessageTypetext` alone. That must not pass as a
    new message (a window extended, a webhook forwarded again) under the captured signature."""
    sid = "SM" + "a" * 32
    captured = inbound_params(sid, MessageType="text")
    signature = sign(URL, captured)
    assert client.post("/twilio/inbound", data=captured, headers={"X-Twilio-Signature": signature}).status_code == 200
    forged = {k: v for k, v in captured.items() if k != "MessageType"} | {"MessageSid": sid + "MessageTypetext"}
    assert sign(URL, forged) == signature  # the same signed string
    response = client.post("/twilio/inbound", data=forged, headers={"X-Twilio-Signature": signature})
    assert response.status_code == 400 and response.get_json()["code"] == 21211
    with db_engine.connect() as conn:
        assert conn.execute(select(windows.c.last_inbound_sid)).scalars().all() == [sid]
    assert count(db_engine, messages) == 1


def test_a_replayed_status_callback_cannot_become_an_inbound_message(client, db_engine):
    """`MessageSid=SM…MessageStatusdelivered` without MessageStatus signs like the status callback it was."""
    sid = "SM" + "b" * 32
    callback = {"MessageSid": sid, "SmsSid": sid, "AccountSid": "AC" + "0" * 32, "From": "whatsapp:+14155550100",
                "To": "whatsapp:+14155550111", "MessageStatus": "delivered", "SmsStatus": "delivered",
                "ApiVersion": "2010-04-01", "MessagingServiceSid": "MG" + "c" * 32}
    signature = sign(URL, callback)
    assert client.post("/twilio/inbound", data=callback, headers={"X-Twilio-Signature": signature}).status_code == 200
    forged = {k: v for k, v in callback.items() if k != "MessageStatus"} | {"MessageSid": sid + "MessageStatusdelivered"}
    assert sign(URL, forged) == signature
    assert client.post("/twilio/inbound", data=forged, headers={"X-Twilio-Signature": signature}).status_code == 400
    assert count(db_engine, windows) == 0


OLD_TOKEN = "0123456789abcdef" * 2


def test_during_a_token_rotation_the_previous_token_still_signs_and_authenticates(settings, db_engine, fake_twilio):
    """Twilio signs with whichever token is its primary when it calls: without TWILIO_AUTH_TOKEN_PREVIOUS every
    webhook was refused (403, and Twilio does not retry a 403) from the promotion until each process restarted."""
    from tests.http.test_gateway import open_window, send
    from tests.conftest import ACCOUNT_SID, BUSINESS, USER, basic_auth

    rotating = create_app(replace(settings, previous_auth_token=OLD_TOKEN)).test_client()
    for n, token in enumerate((AUTH_TOKEN, OLD_TOKEN)):
        params = inbound_params(f"SM{n:032x}")
        signed = RequestValidator(token).compute_signature(URL, params)
        assert rotating.post("/twilio/inbound", data=params, headers={"X-Twilio-Signature": signed}).status_code == 200
    assert count(db_engine, messages) == 2
    other = inbound_params("SM" + "e" * 32)  # any other token still fails
    forged = RequestValidator("f" * 32).compute_signature(URL, other)
    assert rotating.post("/twilio/inbound", data=other, headers={"X-Twilio-Signature": forged}).status_code == 403

    open_window(rotating)
    for token in (AUTH_TOKEN, OLD_TOKEN):  # judged and sent on (Twilio takes both until the new one is promoted)
        response = send(rotating, {"To": USER, "From": BUSINESS, "Body": "x"}, auth=basic_auth(ACCOUNT_SID, token))
        assert response.headers["X-Proxy-Decision"] == "allowed", response.get_json()
        assert fake_twilio.creates[-1].headers["Authorization"] == basic_auth(ACCOUNT_SID, token)["Authorization"]
    sent = len(fake_twilio.creates)
    assert send(rotating, {"To": USER, "From": BUSINESS, "Body": "x"},
                auth=basic_auth(ACCOUNT_SID, "f" * 32)).status_code == 401
    assert len(fake_twilio.creates) == sent

    plain = create_app(settings).test_client()  # without it, the old token is just wrong
    params = inbound_params("SM" + "d" * 32)
    signed = RequestValidator(OLD_TOKEN).compute_signature(URL, params)
    assert plain.post("/twilio/inbound", data=params, headers={"X-Twilio-Signature": signed}).status_code == 403
    assert send(plain, {"To": USER, "From": BUSINESS, "Body": "x"},
                auth=basic_auth(ACCOUNT_SID, OLD_TOKEN)).status_code == 401
