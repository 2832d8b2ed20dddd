"""Failure paths log no secret, no message body and no unmasked number (README, Logs).

Each test searches everything the proxy logged during the request (every field, tracebacks included),
not one field, for distinctive markers: the auth token, a password, a Body text, the full numbers."""

import io
import json
import logging
from dataclasses import replace

import pytest

from proxy import create_app
from proxy import logs as proxy_logs
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, BUSINESS, USER, basic_auth, inbound_params, sign, signed_post
from tests.http.test_gateway import MESSAGES, open_window, send

BODY = "body-marker-5b2e9c-do-not-log"
# The digits of the two numbers: a masked address (whatsapp:+1415*****11) keeps neither run.
NUMBERS = ("4155550111", "4155550100")
API_KEY, API_SECRET = "SK" + "7" * 32, "api-key-secret-marker-91d0"


@pytest.fixture
def logged():
    """Everything logged while the test runs, as (raw text, parsed JSON lines): the proxy's logger and,
    for anything a library logs on the proxy's behalf, the root logger."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(proxy_logs.make_formatter())
    loggers = (proxy_logs.log, logging.getLogger())
    for logger in loggers:
        logger.addHandler(handler)

    def read():
        text = stream.getvalue()
        return text, [json.loads(line) for line in text.splitlines() if line.startswith("{")]

    yield read
    for logger in loggers:
        logger.removeHandler(handler)


def assert_leaks_nothing(text, *secrets):
    for secret in (AUTH_TOKEN, BODY, *NUMBERS, *secrets):
        assert secret not in text, f"{secret!r} was logged: {text}"


def only(lines, event, **fields):
    found = [line for line in lines if line["event"] == event
             and all(line.get(k) == v for k, v in fields.items())]
    assert len(found) == 1, lines
    return found[0]


# --- (a) the gateway and the admin API: wrong Basic credentials ----------------------------------------

WRONG_CREDENTIALS = {
    "token-plus-typo": (ACCOUNT_SID, AUTH_TOKEN + "x"),
    "wrong-user-token-plus-typo": ("AC" + "e" * 32, AUTH_TOKEN[:-1] + "F"),
    "right-token-wrong-user": ("ACwrong-user-marker", AUTH_TOKEN),
    "swapped": (AUTH_TOKEN, ACCOUNT_SID),  # the token in the user field must not be logged either
    "api-key-secret-plus-typo": (API_KEY, API_SECRET + "x"),
}


@pytest.mark.parametrize("path", [MESSAGES, f"/v1/windows?sender={BUSINESS}&user={USER}"], ids=["gateway", "admin"])
@pytest.mark.parametrize("user, password", WRONG_CREDENTIALS.values(), ids=WRONG_CREDENTIALS.keys())
def test_auth_failed_logs_neither_password_nor_token_nor_the_user_tried(settings, db_engine, fake_twilio, logged,
                                                                        path, user, password):
    app = create_app(replace(settings, api_keys={API_KEY: API_SECRET}))
    auth = basic_auth(user, password)
    if path == MESSAGES:
        response = send(app.test_client(), {"To": USER, "From": BUSINESS, "Body": BODY}, auth=auth)
    else:
        response = app.test_client().get(path, headers=auth)
    app.extensions["proxy"].engine.dispose()
    assert response.status_code == 401 and fake_twilio.creates == []
    text, lines = logged()
    line = only(lines, "auth_failed")
    # What is legitimately logged: the path (the account SID is in every API URL and is no secret) and
    # the request id. Never the password, the token, the user name tried, or the Authorization header.
    assert line["level"] == "WARNING" and line["path"] == path.split("?")[0]
    assert line["remote_addr"] == "127.0.0.1"  # who called (behind a load balancer: the balancer)
    header = auth["Authorization"].removeprefix("Basic ")
    assert_leaks_nothing(text, header, API_SECRET, *(s for s in (user, password) if s != ACCOUNT_SID))
    assert ACCOUNT_SID not in text.replace(line["path"], "")  # the SID only as part of the path


# --- (b) webhooks: a bad signature, a malformed webhook -----------------------------------------------

def _inbound(**extra):
    return inbound_params("SM" + "c" * 32, Body=BODY, **extra)


@pytest.mark.parametrize("path", ["/twilio/inbound", "/twilio/status"])
@pytest.mark.parametrize("signature", ["missing", "wrong-token", "other-params"])
def test_webhook_rejected_logs_no_body_number_or_token(client, db_engine, settings, logged, path, signature):
    assert settings.log_redact_numbers  # LOG_REDACT_NUMBERS defaults to true
    params = _inbound() if path == "/twilio/inbound" else _inbound(MessageStatus="failed", ErrorCode="63016")
    headers = {
        "missing": {},
        "wrong-token": {"X-Twilio-Signature": sign("http://localhost" + path, params, token=AUTH_TOKEN + "x")},
        "other-params": {"X-Twilio-Signature": sign("http://localhost" + path, {**params, "Body": "other"})},
    }[signature]
    response = client.post(path, data=params, headers=headers)
    assert response.status_code == 403
    text, lines = logged()
    line = only(lines, "webhook_rejected")
    assert line["level"] == "WARNING" and line["path"] == path and line["reason"]
    # Who called, and the URL the signature was checked against (a PUBLIC_BASE_URL mistake shows there).
    assert line["remote_addr"] == "127.0.0.1" and line["signed_url"] == "http://localhost" + path
    assert_leaks_nothing(text, headers.get("X-Twilio-Signature", AUTH_TOKEN))


def test_webhook_rejected_shows_the_url_checked_with_the_querys_names_only(settings, db_engine, logged):
    """A PUBLIC_BASE_URL that differs from the URL Twilio requested (here its host's case) was logged only as
    invalid_signature. The URL is shown as checked, but a query's values (a token, a number) are not."""
    app = create_app(replace(settings, public_base_url="https://Proxy.example.com"))
    query = f"?token={URL_TOKEN}&to=%2B14155550111&flag"
    params = _inbound()
    signature = sign("https://proxy.example.com/twilio/inbound" + query, params)
    response = app.test_client().post("/twilio/inbound" + query, data=params, headers={"X-Twilio-Signature": signature})
    app.extensions["proxy"].engine.dispose()
    assert response.status_code == 403
    text, lines = logged()
    line = only(lines, "webhook_rejected")
    assert line["reason"] == "invalid_signature"
    assert line["signed_url"] == "https://Proxy.example.com/twilio/inbound?token=…&to=…&…"
    assert_leaks_nothing(text, signature, URL_TOKEN, "%2B1415")


@pytest.mark.parametrize("url, logged_url", [
    ("https://h.example/a/+14155550111/twilio/inbound", "https://h.example/a/+1415*****11/twilio/inbound"),
    ("https://h.example/a/%2B14155550111/twilio/inbound", "https://h.example/a/+1415*****11/twilio/inbound"),
    ("https://user:pass@h.example:8443/twilio/inbound?bodySHA256=abc", "https://h.example:8443/twilio/inbound?bodySHA256=…"),
    ("http://127.0.0.1:8000/twilio/status", "http://127.0.0.1:8000/twilio/status"),
    ("https://h.example/twilio/inbound?%2B14155550111=1", "https://h.example/twilio/inbound?+1415*****11=…"),
    # A bare item may be the secret itself; an empty one (`&&`) stays empty.
    ("https://h.example/twilio/inbound?s3cr3t", "https://h.example/twilio/inbound?…"),
    ("https://h.example/twilio/inbound?a=1&&s3cr3t", "https://h.example/twilio/inbound?a=…&&…"),
])
def test_a_logged_url_keeps_no_number_credentials_or_query_value(url, logged_url):
    assert proxy_logs.masked_url(url) == logged_url


MALFORMED = {
    "inbound-bad-sid": ("/twilio/inbound", _inbound(MessageSid="SM-not-a-sid"), "MessageSid"),
    "inbound-bad-from": ("/twilio/inbound", _inbound(From="whatsapp:+14155550111;ext=" + BODY), "From"),
    "inbound-bad-to": ("/twilio/inbound", _inbound(To="whatsapp:+14155550100/x"), "To"),
    "status-bad-sid": ("/twilio/status",
                       _inbound(MessageSid="MM" + "c" * 31, MessageStatus="delivered", SmsStatus="delivered"),
                       "MessageSid"),
}


@pytest.mark.parametrize("path, params, field", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_webhook_logs_no_body_number_or_token(client, db_engine, logged, path, params, field):
    response = signed_post(client, path, params)
    assert response.status_code == 400 and response.get_json()["code"] == 21211
    text, lines = logged()
    line = only(lines, "inbound" if "inbound" in path else "status", reason="malformed_webhook")
    assert (line["decision"], line["field"]) == ("rejected", field)
    assert_leaks_nothing(text)


# --- (c) sends: blocked, and a Twilio error relayed ------------------------------------------------------

def test_blocked_send_logs_no_body_number_or_token(client, fake_twilio, db_engine, logged):
    response = send(client, {"To": USER, "From": BUSINESS, "Body": BODY})
    assert response.status_code == 400 and response.get_json()["code"] == 63016 and fake_twilio.creates == []
    text, lines = logged()
    line = only(lines, "send", decision="blocked")
    assert (line["user"], line["sender"]) == ("whatsapp:+1415*****11", "whatsapp:+1415*****00")
    assert_leaks_nothing(text)


@pytest.mark.parametrize("fields, code", [
    ({"To": USER, "From": BUSINESS, "ContentSid": "HX" + "0" * 31 + "1"}, 21655),  # no such template
    ({"To": "whatsapp:+1 415 555 0111 ext", "From": BUSINESS, "Body": BODY}, 21211),
    ({"To": USER, "From": BUSINESS, "Body": BODY, "SendAt": "next tuesday"}, 35115),
])
def test_a_rejected_send_is_logged_under_its_request_id_without_body_or_number(client, fake_twilio, db_engine,
                                                                                logged, fields, code):
    """The README's way to find why a send failed is its X-Request-Id in the logs: a request refused before any
    decision (a mistyped ContentSid, a number Twilio refuses) left no line to find."""
    def rejections():  # the counters are the process's: other tests' rejections are in them too
        series = f'proxy_send_decisions_total{{action="rejected",content_type="none",reason="{code}"}} '
        text = client.get("/metrics", headers=basic_auth()).get_data(as_text=True)
        return sum(float(line[len(series):]) for line in text.splitlines() if line.startswith(series))

    before = rejections()
    response = send(client, fields)
    assert response.status_code == 400 and response.get_json()["code"] == code and fake_twilio.creates == []
    text, lines = logged()
    line = only(lines, "send", decision="rejected")
    assert (line["code"], line["status"], line["request_id"]) == (code, 400, response.headers["X-Request-Id"])
    assert_leaks_nothing(text, "415 555 0111")
    assert rejections() == before + 1


def test_only_a_refused_create_is_a_rejected_send(client, fake_twilio, db_engine, logged):
    """Other API calls are no sends, and a refused caller is `auth_failed`'s line: a browser page of another
    site, without credentials, could otherwise grow the send-decision counter at will."""
    assert send(client, {"To": USER, "From": BUSINESS, "Body": BODY},
                auth={}).status_code == 401  # no credentials
    cross_site = client.post(f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json", data={"To": USER, "Body": BODY},
                             headers={"Sec-Fetch-Site": "cross-site"})
    assert cross_site.status_code == 403
    assert client.get("/2010-04-01/Accounts/AC" + "f" * 32 + "/Messages.json", headers=basic_auth()).status_code == 404
    refused = client.get(f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/SM{'a' * 32}.json;x", headers=basic_auth())
    assert refused.status_code == 400
    _, lines = logged()
    assert [line for line in lines if line["event"] == "send"] == []


def test_relayed_twilio_error_logs_no_body_number_or_token(client, fake_twilio, db_engine, logged):
    open_window(client)
    # Twilio's error text quotes the number it refused: the caller gets it unchanged, a log line only masked.
    error = {"code": 21211, "message": f"The 'To' number {USER} is not a valid phone number.",
             "more_info": "https://www.twilio.com/docs/errors/21211", "status": 400}
    fake_twilio.fail_with = (400, error)
    response = send(client, {"To": USER, "From": BUSINESS, "Body": BODY})
    assert response.status_code == 400 and response.get_json() == error
    text, lines = logged()
    line = only(lines, "send", decision="allowed")
    assert (line["outcome"], line["upstream_status"]) == ("upstream_error", 400)
    assert_leaks_nothing(text)


# --- (d) a phone number in a refused request's path; a non-SID ContentSid --------------------------------

@pytest.mark.parametrize("path", [
    f"/2010-04-01/Accounts/{ACCOUNT_SID}/IncomingPhoneNumbers/+14155550111.json",
    f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/+1 415 555 0100",
])
def test_auth_failed_masks_a_number_in_the_path(client, db_engine, fake_twilio, logged, path):
    response = client.get(path, headers=basic_auth(ACCOUNT_SID, AUTH_TOKEN + "x"))
    assert response.status_code == 401 and fake_twilio.creates == []
    text, lines = logged()
    line = only(lines, "auth_failed")
    assert line["path"].startswith(f"/2010-04-01/Accounts/{ACCOUNT_SID}/") and "*" in line["path"]
    assert_leaks_nothing(text, "415 555 0100")


def test_a_content_sid_that_is_no_sid_is_not_logged_verbatim(client, fake_twilio, db_engine, logged):
    # An SMS send passes through unjudged; a number or a text put in ContentSid by mistake is still no log value.
    response = send(client, {"To": "+14155550111", "From": "+14155550100", "ContentSid": f"HX {BODY} +14155550111"})
    assert response.status_code == 400 and response.get_json()["code"] == 21655  # Twilio's own refusal, relayed
    text, lines = logged()
    line = only(lines, "send", decision="passthrough")
    assert line["content_sid"] != f"HX {BODY} +14155550111"
    assert_leaks_nothing(text)


def test_a_content_sid_is_logged(client, fake_twilio, db_engine, logged):
    sid = "HX" + "0123456789abcdef" * 2
    assert send(client, {"To": "+14155550111", "From": "+14155550100", "ContentSid": sid}).status_code == 201
    assert only(logged()[1], "send", decision="passthrough")["content_sid"] == sid


# --- (e) configuration errors and the CLI: a URL's credentials, an API key's secret ---------------------

URL_PASSWORD, URL_TOKEN = "url-password-marker-3c1d", "url-query-token-marker-8e02"


@pytest.mark.parametrize("name", ["FORWARD_INBOUND_URL", "FORWARD_STATUS_URL", "TWILIO_API_BASE_URL", "PUBLIC_BASE_URL"])
@pytest.mark.parametrize("value", [
    f"https//app:{URL_PASSWORD}@app.example/hook?token={URL_TOKEN}",  # a colon missing
    f"ftp://app:{URL_PASSWORD}@app.example/hook?token={URL_TOKEN}",
    f"app:{URL_PASSWORD}@app.example/hook?token={URL_TOKEN}",
])
def test_an_invalid_url_setting_is_named_without_its_credentials(name, value):
    from proxy.settings import ConfigError, Settings

    with pytest.raises(ConfigError) as refused:
        Settings.from_env({"TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_AUTH_TOKEN": AUTH_TOKEN, name: value})
    message = str(refused.value)
    assert name in message and "app.example/hook" in message
    assert URL_PASSWORD not in message and URL_TOKEN not in message and AUTH_TOKEN not in message


@pytest.mark.parametrize("name", ["FORWARD_INBOUND_URL", "TWILIO_API_BASE_URL", "PUBLIC_BASE_URL"])
@pytest.mark.parametrize("value", [
    # An unescaped `#` or `?` in the password: the URL was cut there first, and the password's start shown.
    f"https://app:{URL_PASSWORD}#4@app.example/hook?token={URL_TOKEN}",
    f"https://app:{URL_PASSWORD}?4@app.example/hook",
    # An `@` in a query or fragment: cut at it, what followed (a signature, a token) was shown.
    f"https://app.example/hook?sig=a@{URL_TOKEN}",
    f"https://app.example/hook#t@{URL_TOKEN}",
])
def test_a_url_whose_secret_holds_a_character_it_should_have_escaped_is_shown_without_it(name, value):
    from proxy.settings import ConfigError, Settings

    if name == "FORWARD_INBOUND_URL" and "?sig=" in value:
        assert Settings.from_env({"TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_AUTH_TOKEN": AUTH_TOKEN, name: value})
        return  # a forward URL may have a query, `@` and all: nothing to refuse

    with pytest.raises(ConfigError) as refused:
        Settings.from_env({"TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_AUTH_TOKEN": AUTH_TOKEN, name: value})
    message = str(refused.value)
    assert name in message and "https://…" in message
    assert URL_PASSWORD not in message and URL_TOKEN not in message and "url-" not in message


@pytest.mark.parametrize("entry", [f"{API_SECRET}:{API_KEY}", API_SECRET, f"{API_KEY}{API_SECRET}"])
def test_an_invalid_api_key_entry_shows_no_part_of_a_secret(entry):
    from proxy.settings import ConfigError, Settings

    with pytest.raises(ConfigError) as refused:
        Settings.from_env({"TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_AUTH_TOKEN": AUTH_TOKEN, "TWILIO_API_KEYS": entry})
    message = str(refused.value)
    assert "TWILIO_API_KEYS" in message and API_SECRET[:4] not in message


def test_outbox_list_shows_no_credentials_of_the_forward_url(settings, db_engine):
    from proxy.db import utcnow, writing
    from proxy import outbox

    target = f"https://app:{URL_PASSWORD}@app.example/hook?token={URL_TOKEN}"
    app = create_app(replace(settings, forward_inbound_url=target))
    with writing(app.extensions["proxy"].engine) as conn:
        outbox.enqueue(conn, kind="inbound", ordering_key=f"inbound:{BUSINESS}|{USER}", target=target, headers={},
                       body=[("Body", BODY)], now=utcnow())
    result = app.test_cli_runner().invoke(args=["outbox", "list"])
    app.extensions["proxy"].engine.dispose()
    assert result.exit_code == 0 and "app.example/hook" in result.output
    assert URL_PASSWORD not in result.output and URL_TOKEN not in result.output and BODY not in result.output


def test_database_unavailable_names_the_drivers_reason_but_not_the_password(settings, fake_twilio, logged):
    """The web process's 503s said only `OperationalError`; the driver's reason (refused, timed out, password
    authentication failed) names the host, port, user and database, never the password."""
    from tests.e2e.conftest import free_port

    url = f"postgresql+psycopg://proxy:{URL_PASSWORD}@127.0.0.1:{free_port()}/proxy?password={URL_TOKEN}"
    app = create_app(replace(settings, database_url=url))  # nothing listens there
    client = app.test_client()
    assert send(client, {"To": USER, "From": BUSINESS, "Body": BODY}).status_code == 503
    assert signed_post(client, "/twilio/inbound", _inbound()).status_code == 503
    app.extensions["proxy"].engine.dispose()
    text, lines = logged()
    failures = [line for line in lines if line["event"] == "database_unavailable"]
    assert [line["level"] for line in failures] == ["WARNING", "ERROR", "ERROR"]  # at start-up, then each request
    assert all("refused" in line["detail"] for line in failures), failures
    assert_leaks_nothing(text, URL_PASSWORD, URL_TOKEN)
