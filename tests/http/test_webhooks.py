"""Inbound webhooks and status callbacks through the Flask test client, on the configured database."""

import json
from datetime import timedelta
from urllib.parse import unquote

import pytest
from sqlalchemy import func, select

from proxy.db import messages, utcnow, windows
from tests.conftest import ACCOUNT_SID, BUSINESS, USER, inbound_params, sign, signed_post

EMPTY_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response />'


def window_rows(engine):
    with engine.connect() as conn:
        return conn.execute(select(windows).order_by(windows.c.sender)).mappings().all()


def count(engine, table):
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar_one()


def test_inbound_opens_the_window_and_answers_empty_twiml(client, db_engine):
    before = utcnow()
    response = signed_post(client, "/twilio/inbound", inbound_params("SM" + "1" * 32))
    assert response.status_code == 200
    assert response.mimetype == "text/xml"
    assert response.get_data(as_text=True) == EMPTY_TWIML
    [row] = window_rows(db_engine)
    assert (row["sender"], row["user"]) == (BUSINESS, USER)
    assert before + timedelta(seconds=86400) <= row["expires_at"] <= utcnow() + timedelta(seconds=86400)
    assert row["last_inbound_sid"] == "SM" + "1" * 32 and row["profile_name"] == "Ada"
    with db_engine.connect() as conn:
        msg = conn.execute(select(messages)).mappings().one()
    assert (msg["direction"], msg["status"], msg["sender"], msg["user"]) == ("inbound", "received", BUSINESS, USER)


@pytest.mark.parametrize(
    "headers",
    [{}, {"X-Twilio-Signature": "bm90IGEgc2lnbmF0dXJl"}, {"X-Twilio-Signature": ""}],
    ids=["missing", "wrong", "empty"],
)
def test_bad_signature_is_403_and_records_nothing(client, db_engine, headers):
    response = client.post("/twilio/inbound", data=inbound_params("SM" + "2" * 32), headers=headers)
    assert response.status_code == 403
    body = response.get_json()
    assert set(body) == {"code", "message", "more_info", "status"} and body["status"] == 403
    assert count(db_engine, windows) == 0 and count(db_engine, messages) == 0


def test_signature_for_other_params_is_rejected(client, db_engine):
    params = inbound_params("SM" + "3" * 32)
    signature = sign("http://localhost/twilio/inbound", {**params, "Body": "something else"})
    response = client.post("/twilio/inbound", data=params, headers={"X-Twilio-Signature": signature})
    assert response.status_code == 403
    assert count(db_engine, windows) == 0


def test_signature_with_another_token_is_rejected(client, db_engine):
    response = signed_post(client, "/twilio/inbound", inbound_params("SM" + "3" * 32), token="other-token")
    assert response.status_code == 403
    assert count(db_engine, messages) == 0


def test_retried_webhook_changes_nothing(client, db_engine):
    params = inbound_params("SM" + "4" * 32)
    assert signed_post(client, "/twilio/inbound", params).status_code == 200
    [first] = window_rows(db_engine)
    assert signed_post(client, "/twilio/inbound", params).status_code == 200
    [again] = window_rows(db_engine)
    assert again == first
    assert count(db_engine, messages) == 1


def test_newer_inbound_extends_the_window(client, db_engine):
    signed_post(client, "/twilio/inbound", inbound_params("SM" + "5" * 32))
    [first] = window_rows(db_engine)
    signed_post(client, "/twilio/inbound", inbound_params("SM" + "6" * 32, ProfileName="Ada L."))
    [second] = window_rows(db_engine)
    assert second["expires_at"] > first["expires_at"]
    assert second["last_inbound_sid"] == "SM" + "6" * 32 and second["profile_name"] == "Ada L."


def test_messaging_service_makes_the_window_reachable_by_service(client, db_engine):
    service = "MG" + "a" * 32
    signed_post(client, "/twilio/inbound", inbound_params("SM" + "7" * 32, MessagingServiceSid=service))
    rows = window_rows(db_engine)
    assert {(r["sender"], r["user"]) for r in rows} == {(BUSINESS, USER), (service, USER)}
    assert rows[0]["expires_at"] == rows[1]["expires_at"]


def test_addresses_are_normalised(client, db_engine):
    signed_post(client, "/twilio/inbound", inbound_params("SM" + "8" * 32, From="WhatsApp:14155550111",
                                                          To="whatsapp:+1 415 555 0100"))
    [row] = window_rows(db_engine)
    assert (row["sender"], row["user"]) == (BUSINESS, USER)


def test_windows_never_leak_across_channels(client, db_engine):
    signed_post(client, "/twilio/inbound", inbound_params("SM" + "9" * 32, From="messenger:24680", To="messenger:13579"))
    [row] = window_rows(db_engine)
    assert (row["sender"], row["user"]) == ("messenger:13579", "messenger:24680")


def status_params(sid, status, **extra):
    params = {"MessageSid": sid, "SmsSid": sid, "AccountSid": ACCOUNT_SID, "From": BUSINESS, "To": USER,
              "MessageStatus": status, "SmsStatus": status, "ChannelPrefix": "whatsapp", "ApiVersion": "2010-04-01"}
    params.update(extra)
    return params


def message_row(engine, sid):
    with engine.connect() as conn:
        return conn.execute(select(messages).where(messages.c.sid == sid)).mappings().one()


@pytest.mark.parametrize("path", ["/twilio/status", "/twilio/inbound"])
def test_status_callback_records_status_and_never_opens_a_window(client, db_engine, path):
    sid = "SM" + "b" * 32
    response = signed_post(client, path, status_params(sid, "sent"))
    assert response.status_code == 200
    assert message_row(db_engine, sid)["status"] == "sent"
    assert count(db_engine, windows) == 0


def test_late_earlier_status_never_overwrites_a_later_one(client, db_engine):
    sid = "SM" + "c" * 32
    for status in ["delivered", "sent", "queued"]:
        signed_post(client, "/twilio/status", status_params(sid, status))
    assert message_row(db_engine, sid)["status"] == "delivered"
    signed_post(client, "/twilio/status", status_params(sid, "read"))
    assert message_row(db_engine, sid)["status"] == "read"


def test_concurrent_status_callbacks_end_at_each_messages_highest_status(app, db_engine):
    """Callbacks written together (SQLite: one write turn for many requests; PostgreSQL: autocommit)
    still apply the ranks one by one: whatever order 8 threads deliver them in, each message ends at
    its highest-ranked status."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    jobs = [("SM" + f"{n:032x}", status) for n in range(40) for status in ("queued", "sent", "delivered", "read")]
    random.Random(7).shuffle(jobs)

    def deliver(job):
        client = app.test_client()  # one per request: test clients are not shared across threads
        return signed_post(client, "/twilio/status", status_params(*job)).status_code

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(deliver, jobs))
    assert codes == [200] * len(codes)
    with db_engine.connect() as conn:
        final = dict(conn.execute(select(messages.c.sid, messages.c.status)).all())
    assert final == {sid: "read" for sid, _ in jobs}


def test_failure_is_final_and_keeps_its_error_code(client, db_engine):
    sid = "SM" + "d" * 32
    signed_post(client, "/twilio/status", status_params(sid, "failed", ErrorCode="63016"))
    signed_post(client, "/twilio/status", status_params(sid, "sent"))
    row = message_row(db_engine, sid)
    assert (row["status"], row["error_code"]) == ("failed", 63016)


def test_public_base_url_is_what_the_signature_covers(settings, db_engine):
    from dataclasses import replace

    from proxy import create_app
    app = create_app(replace(settings, public_base_url="https://proxy.example.com"))
    client = app.test_client()
    params = inbound_params("SM" + "e" * 32)
    # Signed for the public URL with a query string, received on an internal host name.
    path = "/twilio/inbound?tenant=acme"
    signature = sign("https://proxy.example.com" + path, params)
    assert client.post(path, data=params, headers={"X-Twilio-Signature": signature}).status_code == 200
    signature_for_internal = sign("http://localhost" + path, params)
    assert client.post(path, data=params, headers={"X-Twilio-Signature": signature_for_internal}).status_code == 403
    app.extensions["proxy"].engine.dispose()
    assert count(db_engine, windows) == 1


@pytest.mark.parametrize("target", ["/twilio/%69nbound", "/twilio/inbound?k=%7E", "/twilio/inbound?k=a%2Fb"])
def test_public_base_url_keeps_the_escapes_of_the_path_and_query_as_sent(settings, db_engine, target):
    from dataclasses import replace

    from proxy import create_app
    app = create_app(replace(settings, public_base_url="https://proxy.example.com"))
    params = inbound_params("SM" + "e" * 31 + "1")
    signature = sign("https://proxy.example.com" + target, params)
    response = app.test_client().post(target, data=params, headers={"X-Twilio-Signature": signature},
                                      environ_overrides={"RAW_URI": target})  # as gunicorn passes it
    app.extensions["proxy"].engine.dispose()
    assert response.status_code == 200
    assert count(db_engine, windows) == 1


def test_malformed_inbound_is_a_twilio_shaped_400(client, db_engine):
    response = signed_post(client, "/twilio/inbound", inbound_params("SM" + "f" * 32, From="whatsapp:<nobody>"))
    assert response.status_code == 400
    assert set(response.get_json()) == {"code", "message", "more_info", "status"}
    assert count(db_engine, windows) == 0


def test_the_url_as_received_is_remembered_per_host_and_path_not_across_them(client, db_engine):
    """signed_url() remembers request.url by the environ values it is built from: a request on another
    host, port, path or query is checked against its own URL, never a remembered one."""
    params = inbound_params("SM" + "a" * 32)
    for round_ in range(2):  # the second round is answered from what was remembered
        for base in ("http://localhost", "http://localhost:8080", "http://proxy.internal"):
            for path in ("/twilio/inbound", "/twilio/inbound?tenant=acme", "/twilio/inbound?tenant=other"):
                good = sign(base + path, params)
                bad = sign(("http://elsewhere" if base != "http://elsewhere" else "http://localhost") + path, params)
                assert client.post(path, base_url=base, data=params,
                                   headers={"X-Twilio-Signature": good}).status_code == 200, (round_, base, path)
                assert client.post(path, base_url=base, data=params,
                                   headers={"X-Twilio-Signature": bad}).status_code == 403, (round_, base, path)
    assert count(db_engine, windows) == 1


def test_remembered_urls_are_bounded(app):
    from proxy import webhooks

    for n in range(webhooks._MAX_RECEIVED_URLS + 50):
        with app.test_request_context("/twilio/inbound", base_url=f"http://host{n}.example"):
            assert webhooks.signed_url() == f"http://host{n}.example/twilio/inbound"
    assert len(webhooks._RECEIVED_URLS) <= webhooks._MAX_RECEIVED_URLS


HEX = "0123456789abcdef" * 2


@pytest.mark.parametrize("sid", ["SM" + HEX + "\n", "SM" + HEX[:31], "SM" + HEX + "0", "SM" + "g" * 32,
                                 "XX" + HEX, "MG" + HEX, "sm" + HEX, "SM" + HEX + "MessageTypetext"])
@pytest.mark.parametrize("path", ["/twilio/inbound", "/twilio/status"])
def test_only_a_real_message_sid_is_accepted(client, db_engine, log_lines, sid, path):
    params = status_params(sid, "sent") if path == "/twilio/status" else inbound_params(sid)
    response = signed_post(client, path, params)
    assert response.status_code == 400
    body = response.get_json()
    assert set(body) == {"code", "message", "more_info", "status"} and body["code"] == 21211
    assert count(db_engine, messages) == 0 and count(db_engine, windows) == 0
    [line] = [line for line in log_lines() if line.get("decision") == "rejected"]
    assert line["reason"] == "malformed_webhook"


def test_media_message_sids_are_message_sids(client, db_engine):
    assert signed_post(client, "/twilio/inbound", inbound_params("MM" + HEX)).status_code == 200
    assert window_rows(db_engine)[0]["last_inbound_sid"] == "MM" + HEX


@pytest.mark.parametrize("copies", [{"SmsSid": "SM" + "1" * 32}, {"SmsMessageSid": "SM" + "1" * 32},
                                    {"SmsSid": ""}, {"MessageSid": "", "SmsSid": "SM" + HEX}])
def test_every_copy_of_the_sid_must_be_the_same_sid(client, db_engine, copies):
    response = signed_post(client, "/twilio/inbound", {**inbound_params("SM" + HEX), **copies})
    assert response.status_code == 400 and response.get_json()["code"] == 21211
    assert count(db_engine, windows) == 0


def test_sms_message_sid_equal_to_the_message_sid_is_fine(client, db_engine):
    assert signed_post(client, "/twilio/inbound", inbound_params("SM" + HEX, SmsMessageSid="SM" + HEX)).status_code == 200
    assert count(db_engine, windows) == 1


@pytest.mark.parametrize("sms_status", ["delivered", "read", "failed", ""])
def test_sms_status_other_than_received_is_a_status_callback(client, db_engine, sms_status):
    """Twilio's SmsStatus is `received` only on an inbound message: without MessageStatus, anything
    else is still a status callback and never opens a window."""
    sid = "SM" + HEX
    params = {k: v for k, v in status_params(sid, "x", SmsStatus=sms_status).items() if k != "MessageStatus"}
    assert signed_post(client, "/twilio/inbound", params).status_code == 200
    assert count(db_engine, windows) == 0
    assert message_row(db_engine, sid)["status"] == (sms_status or "unknown")


def test_an_inbound_message_that_carries_message_status_received_is_an_inbound_message(client, db_engine):
    """`received` is only a status of a message Twilio received, never of a send: such a webhook (captured with
    MessageStatus=received beside SmsStatus=received) was taken for a callback, and its window never opened."""
    sid = "SM" + HEX
    assert signed_post(client, "/twilio/inbound", inbound_params(sid, MessageStatus="received")).status_code == 200
    assert {(r["sender"], r["user"]) for r in window_rows(db_engine)} == {(BUSINESS, USER)}
    assert message_row(db_engine, sid)["direction"] == "inbound"
    # A send's statuses beside SmsStatus=received are still a callback's.
    other = "SM" + "e" * 32
    assert signed_post(client, "/twilio/inbound", inbound_params(other, MessageStatus="delivered")).status_code == 200
    assert message_row(db_engine, other)["direction"] == "outbound" and count(db_engine, windows) == 1


def test_a_messaging_service_sid_with_a_trailing_newline_keys_no_window(client, db_engine):
    signed_post(client, "/twilio/inbound", inbound_params("SM" + HEX, MessagingServiceSid="MG" + HEX + "\n"))
    assert {(r["sender"], r["user"]) for r in window_rows(db_engine)} == {(BUSINESS, USER)}


# Twilio signs the URL it requested, %-escapes and all; werkzeug's request.url decodes them (uri_to_iri).
ESCAPED_TARGETS = ["/twilio/inbound?k=%7E", "/twilio/inbound?k=%41", "/twilio/inbound?k=%C3%A9",
                   "/twilio/inbound?k=%2F&j=%2B", "/twilio/inbound?k=%20&j=+", "/twilio/%69nbound",
                   "/twilio/inbound?tenant=acme"]


@pytest.mark.parametrize("target", ESCAPED_TARGETS)
def test_the_signature_covers_the_url_as_requested_escapes_included(client, db_engine, target):
    params = inbound_params("SM" + HEX)
    signature = sign("http://localhost" + target, params)
    response = client.post(target, data=params, headers={"X-Twilio-Signature": signature},
                           environ_overrides={"RAW_URI": target})  # as gunicorn passes the request line's target
    assert response.status_code == 200
    decoded = sign("http://localhost" + unquote(target), params)
    if decoded != signature:  # the decoded URL is not what Twilio signed
        assert client.post(target, data=params, headers={"X-Twilio-Signature": decoded},
                           environ_overrides={"RAW_URI": target}).status_code == 403
    assert count(db_engine, windows) == 1


@pytest.mark.parametrize("target", [t for t in ESCAPED_TARGETS if "?" in t])
def test_without_raw_uri_the_query_string_is_taken_as_received(settings, db_engine, target):
    """A server that passes neither RAW_URI nor REQUEST_URI: the path from PATH_INFO (quoted again),
    the query string exactly as received."""
    from proxy import create_app
    app = create_app(settings)
    inner = app.wsgi_app

    def without_raw_uri(environ, start_response):
        environ.pop("RAW_URI", None), environ.pop("REQUEST_URI", None)
        return inner(environ, start_response)

    app.wsgi_app = without_raw_uri
    params = inbound_params("SM" + HEX)
    response = app.test_client().post(target, data=params,
                                      headers={"X-Twilio-Signature": sign("http://localhost" + target, params)})
    app.extensions["proxy"].engine.dispose()
    assert response.status_code == 200
    assert count(db_engine, windows) == 1


def test_the_remembered_url_follows_the_raw_target(client, db_engine):
    """Two targets with the same decoded path and query are two URLs: neither is checked against the other's."""
    params = inbound_params("SM" + HEX)
    for target in ("/twilio/%69nbound", "/twilio/inbound", "/twilio/%69nbound"):
        signature = sign("http://localhost" + target, params)
        assert client.post(target, data=params, headers={"X-Twilio-Signature": signature},
                           environ_overrides={"RAW_URI": target}).status_code == 200, target


@pytest.mark.parametrize("field, value", [("From", "whatsapp:+14155550111;ext=9"), ("From", "whatsapp:+14155550111 (m)"),
                                          ("To", "whatsapp:+14155550111 x"), ("From", "+14155550111:"),
                                          ("From", "whatsapp:+14155550111\x00")])
def test_a_rejected_inbound_never_logs_the_number(client, db_engine, log_lines, field, value):
    response = signed_post(client, "/twilio/inbound", inbound_params("SM" + HEX, **{field: value}))
    assert response.status_code == 400 and response.get_json()["code"] == 21211
    [line] = [line for line in log_lines() if line["event"] == "inbound"]
    assert (line["decision"], line["reason"], line["field"]) == ("rejected", "malformed_webhook", field)
    assert "4155550111" not in json.dumps(log_lines())


def test_inbound_with_media_opens_the_window_and_stores_the_media_count(client, db_engine):
    """A WhatsApp image or document arrives as NumMedia with MediaUrl{N}/MediaContentType{N} (zero-based)."""
    sid = "MM" + HEX
    media_url = f"https://api.twilio.com/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/{sid}/Media/ME"
    params = inbound_params(sid, Body="", NumMedia="2",
                            MediaUrl0=media_url + "0" * 32, MediaContentType0="image/jpeg",
                            MediaUrl1=media_url + "1" * 32, MediaContentType1="application/pdf")
    response = signed_post(client, "/twilio/inbound", params)
    assert response.status_code == 200 and response.get_data(as_text=True) == EMPTY_TWIML
    [row] = window_rows(db_engine)
    assert (row["sender"], row["user"], row["last_inbound_sid"]) == (BUSINESS, USER, sid)
    assert row["expires_at"] > utcnow()
    msg = message_row(db_engine, sid)
    assert (msg["direction"], msg["status"], msg["num_media"]) == ("inbound", "received", 2)
