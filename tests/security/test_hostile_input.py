"""Hostile input against the Messages endpoint and the webhooks: no 5xx, Twilio-shaped errors, nothing sent."""

import collections
import itertools

import pytest
from hypothesis import HealthCheck, example, given, settings as hsettings, strategies as st
from sqlalchemy import func, select

from proxy.db import messages
from tests.conftest import ACCOUNT_SID, BUSINESS, USER, basic_auth, inbound_params, signed_post
from tests.http.test_gateway import MESSAGES, SHAPE, open_window, send

RFC9457 = {"type", "title", "status", "code"}


def assert_twilio_error(response, status=None):
    assert response.status_code < 500 or response.status_code in (502, 503, 504)
    body = response.get_json()
    assert set(body) == SHAPE, body
    assert not RFC9457 <= set(body)  # twilio-python would raise TwilioServiceException
    assert isinstance(body["code"], int) and body["status"] == response.status_code
    if status is not None:
        assert response.status_code == status


def test_oversized_body_is_413(client, fake_twilio):
    response = send(client, {"To": USER, "From": BUSINESS, "Body": "x" * (300 * 1024)})
    assert_twilio_error(response, 413)
    assert fake_twilio.requests == []


def test_invalid_utf8_is_400(client, fake_twilio):
    open_window(client)
    raw = b"To=whatsapp%3A%2B14155550111&From=whatsapp%3A%2B14155550100&Body=%FF%FE%C3"
    response = client.post(MESSAGES, data=raw, content_type="application/x-www-form-urlencoded",
                           headers=basic_auth())
    assert_twilio_error(response, 400)
    assert fake_twilio.requests == []


@pytest.mark.parametrize("field", ["To", "From", "Body", "ContentSid", "MessagingServiceSid"])
def test_repeated_single_valued_fields_are_refused(client, fake_twilio, field):
    open_window(client)  # the first To has an open window; a second To must not ride on it
    pairs = [("To", USER), ("From", BUSINESS), ("Body", "x")]
    pairs += [(field, "whatsapp:+14155550199")] if field in ("To", "From", "Body") else [(field, "a"), (field, "b")]
    response = send(client, pairs)
    assert_twilio_error(response, 400)
    assert field in response.get_json()["message"]
    assert fake_twilio.requests == []


@pytest.mark.parametrize("pairs", [
    [("To", "+14155550111"), ("To", USER), ("MessagingServiceSid", "MG" + "a" * 32), ("Body", "x")],
    [("To", "+14155550111"), ("To", USER), ("From", "+14155550100"), ("From", BUSINESS), ("Body", "x")],
    [("To", "+14155550111"), ("From", "+14155550100"), ("From", BUSINESS), ("Body", "x")],
], ids=["to", "to-and-from", "from"])
def test_a_whatsapp_value_behind_an_sms_one_is_refused_not_passed_through(client, fake_twilio, pairs):
    """The first value decides SMS passthrough: a second, WhatsApp, value must not reach Twilio unjudged."""
    response = send(client, pairs)
    assert_twilio_error(response, 400)
    assert fake_twilio.requests == []


def test_more_than_ten_media_urls_is_21623(client, fake_twilio):
    open_window(client)
    pairs = [("To", USER), ("From", BUSINESS)] + [("MediaUrl", f"https://example.com/{i}.png") for i in range(11)]
    response = send(client, pairs)
    assert_twilio_error(response, 400)
    body = response.get_json()
    assert body["code"] == 21623 and body["more_info"] == "https://www.twilio.com/docs/errors/21623"
    assert body["message"].startswith("Number of media files exceeds allowed limit")
    assert fake_twilio.requests == []


def test_body_over_1600_characters_is_21658(client, fake_twilio):
    open_window(client)
    response = send(client, {"To": USER, "From": BUSINESS, "Body": "x" * 1601})
    assert_twilio_error(response, 400)
    assert response.get_json()["code"] == 21658


@pytest.mark.parametrize("to", ["whatsapp:", "whatsapp:+", "whatsapp:+1", "whatsapp:++14155550111",
                                "whatsapp:+1415555011a", "whatsapp:" + "9" * 40, "WHATSAPP:\x00+1415",
                                "whatsapp:+14155550111\r\nX-Injected: 1"])
def test_malformed_addresses(client, fake_twilio, to):
    assert_twilio_error(send(client, {"To": to, "From": BUSINESS, "Body": "x"}), 400)
    assert fake_twilio.requests == []


def test_crlf_in_values_never_becomes_a_header(client, fake_twilio):
    open_window(client)
    response = send(client, {"To": USER, "From": BUSINESS, "Body": "hi\r\nX-Injected: yes\r\n\r\n"})
    assert response.status_code == 201
    [received] = fake_twilio.creates
    assert "X-Injected" not in received.headers
    assert dict(received.form)["Body"] == "hi\r\nX-Injected: yes\r\n\r\n"


def test_request_fields_never_choose_where_the_proxy_connects(client, fake_twilio, fake_app):
    """No open relay: StatusCallback, Host and odd paths do not redirect the proxy's own requests."""
    open_window(client)
    send(client, {"To": USER, "From": BUSINESS, "Body": "x", "StatusCallback": fake_app.url + "/steal"},
         )
    client.post(MESSAGES, data={"To": USER, "From": BUSINESS, "Body": "x"},
                headers={**basic_auth(), "Host": "evil.example", "X-Forwarded-Host": "evil.example"})
    client.get(f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/..%2F..%2F@evil.example.json", headers=basic_auth())
    # The fake Twilio itself posts status callbacks to that StatusCallback, as Twilio would: every call
    # the app got must be one of those, none the proxy's own.
    fake_twilio.wait_for_callbacks()
    from_twilio = [url for url, _ in fake_twilio.callbacks if url.startswith(fake_app.url)]
    assert fake_app.started == len(from_twilio)
    assert all(r.path.startswith("/2010-04-01/") for r in fake_twilio.requests)


form_values = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=200)
# Hypothesis shrinks towards these; keep them in every run so PostgreSQL-only refusals show up on SQLite runs too.
EDGE_VALUES = ["\x00", "\x00whatsapp:+14155550111", "9" * 20, "-1", "whatsapp:" + "1" * 200]
field_names = st.sampled_from(["To", "From", "Body", "MediaUrl", "ContentSid", "ContentVariables",
                               "MessagingServiceSid", "SendAt", "StatusCallback", "Unknown", "To[]", ""])


@hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pairs=st.lists(st.tuples(field_names, form_values), max_size=8))
def test_property_any_form_gets_a_twilio_shaped_answer(client, fake_twilio, pairs):
    response = send(client, pairs)
    assert response.status_code < 500 or response.status_code == 503
    if response.status_code >= 400:
        assert_twilio_error(response)


webhook_fields = st.sampled_from(["From", "To", "MessageSid", "MessageStatus", "ErrorCode", "NumMedia",
                                  "MessagingServiceSid", "SmsStatus"])
MEDIA_BASE = f"https://api.twilio.com/2010-04-01/Accounts/{ACCOUNT_SID}"
# Mostly hostile text, sometimes a plausible small count (NumMedia, ErrorCode) or a known edge value.
webhook_values = st.one_of(form_values, st.integers(0, 12).map(str), st.sampled_from(EDGE_VALUES))


def test_property_signed_webhooks_never_500(client, db_engine):
    """Every example has a sid of its own, so an accepted one stores its message and window (and a
    status callback its row) instead of being a duplicate of the first: the storing path is what is
    exercised, media included."""
    serial = itertools.count(1)
    answers = collections.Counter()

    @hsettings(max_examples=80, deadline=None)
    @example(extra={}, media=0, prefix="SM")
    @example(extra={}, media=2, prefix="MM")
    @given(extra=st.dictionaries(webhook_fields, webhook_values), media=st.integers(0, 3),
           prefix=st.sampled_from(["SM", "MM"]))
    def check(extra, media, prefix):
        sid = f"{prefix}{next(serial):032x}"
        media_fields = {}
        for i in range(media):  # as Twilio sends them: MediaUrl{N} and MediaContentType{N}, zero-based
            media_fields[f"MediaUrl{i}"] = f"{MEDIA_BASE}/Messages/{sid}/Media/ME{i:032x}"
            media_fields[f"MediaContentType{i}"] = "image/jpeg"
        params = {**inbound_params(sid, NumMedia=str(media), **media_fields), **extra}
        response = signed_post(client, "/twilio/inbound", params)
        assert response.status_code < 500
        if response.status_code >= 400:
            assert_twilio_error(response)
        answers[response.status_code] += 1

    check()
    # The property means little if nearly every example was refused before anything was stored.
    with db_engine.connect() as conn:
        stored = conn.execute(select(func.count()).select_from(messages)).scalar_one()
        with_media = conn.execute(select(func.count()).select_from(messages)
                                  .where(messages.c.num_media > 0)).scalar_one()
    assert stored >= 5 and with_media >= 1, (stored, with_media, answers)


@pytest.mark.parametrize("field", ["From", "To", "MessageSid", "MessageStatus", "ErrorCode", "NumMedia",
                                   "MessagingServiceSid", "ProfileName"])
@pytest.mark.parametrize("value", EDGE_VALUES)
def test_edge_values_in_signed_webhooks(client, field, value):
    response = signed_post(client, "/twilio/inbound", {**inbound_params("SM" + "b" * 32), field: value})
    assert response.status_code < 500
    if response.status_code >= 400:
        assert_twilio_error(response)


@pytest.mark.parametrize("value", EDGE_VALUES)
def test_edge_values_in_sends(client, fake_twilio, value):
    for pairs in ([("To", value), ("From", "+14155550100"), ("Body", "x")],
                  [("To", "+14155550111"), ("From", value), ("Body", value)]):
        response = send(client, pairs)
        assert response.status_code < 500
        if response.status_code >= 400:
            assert_twilio_error(response)


def test_a_webhook_of_too_many_fields_is_refused_before_its_signature_is_checked(client, log_lines):
    """Unsigned, 40,000 empty fields cost ~0.5 s of CPU to refuse: parsed, then the signature's string built
    over every field for each URL and token tried. Counted before parsing now: a Twilio-shaped 413."""
    body = "&".join(f"k{i}=" for i in range(40000))
    response = client.post("/twilio/inbound", data=body, content_type="application/x-www-form-urlencoded",
                           headers={"X-Twilio-Signature": "forged"})
    assert response.status_code == 413 and set(response.get_json()) == {"code", "message", "more_info", "status"}
    assert log_lines() == [] or all(line.get("event") != "webhook_rejected" for line in log_lines())  # never parsed
    create = client.post(f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json", data=body,
                         content_type="application/x-www-form-urlencoded", headers=basic_auth())
    assert create.status_code == 413


@pytest.mark.parametrize("charset", ["utf-7", "latin-1", "utf-16"])
def test_a_create_declaring_another_charset_is_refused_not_forwarded(client, fake_twilio, charset):
    """Judged as UTF-8, these bytes are an SMS send; under UTF-7, which the Content-Type forwarded with them
    declares, they read To=whatsapp:+1415…: it must not reach Twilio unjudged."""
    body = "To=whatsapp%2BADo-%2B-14155550177&From=whatsapp%2BADo-%2B-14155550100&Body=hi"
    response = client.post(f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json", data=body, headers=basic_auth(),
                           content_type=f"application/x-www-form-urlencoded; charset={charset}")
    assert_twilio_error(response, 400)
    assert fake_twilio.requests == []
    ok = client.post(f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json", headers=basic_auth(),
                     data="To=%2B14155550177&From=%2B14155550100&Body=hi",
                     content_type="application/x-www-form-urlencoded; charset=UTF-8")
    assert ok.status_code == 201


@pytest.mark.parametrize("headers", [{"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
                                     {"Origin": "https://evil.example"}])
def test_a_browser_request_another_site_made_is_refused_whatever_credentials_it_carries(client, fake_twilio,
                                                                                        headers):
    """An operator who once opened /metrics or /v1 in a browser has its Basic credentials cached there: any page
    could then have it POST a form to the gateway (no CORS preflight for a form), and it was forwarded."""
    path = f"/2010-04-01/Accounts/{ACCOUNT_SID}/IncomingPhoneNumbers/PN{'1' * 32}.json"
    response = client.post(path, data={"SmsUrl": "https://evil.example/hook"}, headers={**basic_auth(), **headers})
    assert_twilio_error(response, 403)
    assert response.get_json()["code"] == 20403
    assert client.get("/v1/windows/expiring", headers={**basic_auth(), **headers}).status_code == 403
    assert fake_twilio.requests == []
    # The proxy's own page (same origin) or no browser at all: as before.
    relayed = client.post(path, data={"SmsUrl": "https://app.example/hook"},
                          headers={**basic_auth(), "Sec-Fetch-Site": "same-origin"})
    assert relayed.headers["X-Proxy-Decision"] == "passthrough" and len(fake_twilio.requests) == 1
    assert client.get("/v1/windows/expiring", headers={**basic_auth(), "Origin": "http://localhost"}).status_code == 200


@pytest.mark.parametrize("content_type", ['application/x-www-form-urlencoded; charset="utf-7',
                                          "application/x-www-form-urlencoded; charset = utf-7",
                                          "application/x-www-form-urlencoded; charset=utf-7; charset=utf-8"])
def test_a_create_goes_to_twilio_as_the_plain_form_it_was_judged_as(client, fake_twilio, content_type):
    """werkzeug drops a charset it cannot parse (and takes the last of two): the create is judged as UTF-8, so
    it is forwarded as a plain form, never under the caller's parameters."""
    response = client.post(f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json", headers=basic_auth(),
                           data="To=%2B14155550177&From=%2B14155550100&Body=hi", content_type=content_type)
    if response.status_code == 400:  # refused as another charset: as good, nothing went out
        assert fake_twilio.requests == []
        return
    assert response.status_code == 201
    [create] = fake_twilio.creates
    assert create.headers["Content-Type"] == "application/x-www-form-urlencoded"


def test_an_authorization_header_that_is_not_ascii_is_a_401_not_a_500(client):
    for path in ("/metrics", "/v1/windows", f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"):
        response = client.get(path, headers={"Authorization": "Basic \xe9"})
        assert_twilio_error(response, 401)
        assert response.get_json()["code"] == 20003


def test_options_on_metrics_asks_for_credentials_too(client):
    """Flask's automatic OPTIONS answered 200 before the view checked any credentials."""
    response = client.open("/metrics", method="OPTIONS")
    assert_twilio_error(response, 405)


@pytest.mark.parametrize("path, method", [("/v1/preflight", "GET"), ("/v1/held", "OPTIONS"), ("/v1/windows", "POST"),
                                          ("/v1/windows/expiring", "PUT")])
def test_the_admin_api_says_which_methods_exist_only_to_a_caller_with_credentials(client, path, method):
    """A 405 with its Allow header went to anyone, and OPTIONS was Flask's empty HTML 200."""
    response = client.open(path, method=method)
    assert_twilio_error(response, 401)
    assert "Allow" not in response.headers
    response = client.open(path, method=method, headers=basic_auth())
    assert_twilio_error(response, 405)
    assert "OPTIONS" not in response.headers["Allow"]
