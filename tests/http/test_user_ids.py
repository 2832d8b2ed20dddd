"""WhatsApp users known by a business-scoped user id (BSUID) instead of a number, and user addresses of a form the
proxy does not recognise: their webhooks are stored and open windows, and replies to them are judged by those."""

import json

import pytest
from sqlalchemy import select

from proxy.addresses import normalise
from proxy.db import messages, utcnow, windows
from tests.conftest import BUSINESS, USER, basic_auth, inbound_params, signed_post
from tests.http.test_forwarding import failed_callback
from tests.http.test_gateway import attempts, open_window, send

BSUID = "whatsapp:US.13491208655302741918"
PARENT_BSUID = "whatsapp:US.ENT.11815799212886844830"


def rows(engine, table):
    with engine.connect() as conn:
        return conn.execute(select(table)).mappings().all()


def window_of(client, user, sender=BUSINESS):
    response = client.get("/v1/windows", query_string={"sender": sender, "user": user}, headers=basic_auth())
    assert response.status_code == 200, response.get_json()
    return response.get_json()


@pytest.mark.parametrize("user", [BSUID, PARENT_BSUID, "whatsapp:BR.1502576394655843abcXYZ"])
def test_a_user_known_by_a_bsuid_opens_a_window_and_a_reply_to_it_is_forwarded(client, fake_twilio, db_engine, user):
    open_window(client, user=user)  # no WaId: Meta's wa_id is the number, withheld from this user's webhooks
    [row] = rows(db_engine, windows)
    assert (row["sender"], row["user"]) == (BUSINESS, user)  # kept exactly as sent: BSUIDs are case-sensitive
    assert rows(db_engine, messages)[0]["user"] == user

    allowed = send(client, {"To": user, "From": BUSINESS, "Body": "Thanks for writing"})
    assert allowed.status_code == 201, allowed.get_json()
    assert allowed.headers["X-Proxy-Decision"] == "allowed"
    assert dict(fake_twilio.creates[-1].form)["To"] == user  # forwarded verbatim

    # Another BSUID, or the number the same person may also write from, is another window (the proxy cannot
    # tell they are one person): blocked as any closed window is.
    for other in ("whatsapp:US.13491208655302741919", USER):
        blocked = send(client, {"To": other, "From": BUSINESS, "Body": "x"})
        assert blocked.status_code == 400 and blocked.get_json()["code"] == 63016, other
    assert len(fake_twilio.creates) == 1
    assert [a["user"] for a in attempts(db_engine)] == [user, "whatsapp:US.13491208655302741919", USER]


def test_a_bsuid_spelt_with_another_prefix_case_or_spaces_is_the_same_window(client, fake_twilio, db_engine):
    open_window(client, user=BSUID)
    response = send(client, {"To": " WhatsApp: US.13491208655302741918 ", "From": BUSINESS, "Body": "x"})
    assert response.status_code == 201, response.get_json()
    assert window_of(client, "WHATSAPP:US.13491208655302741918")["open"] is True
    # Its letters are not folded: a BSUID differing in case is another user's.
    assert window_of(client, "whatsapp:US.13491208655302741918".replace("US", "us"))["open"] is False


@pytest.mark.parametrize("sender", [BSUID, PARENT_BSUID])
def test_a_bsuid_is_never_a_business_sender(client, fake_twilio, db_engine, sender):
    response = send(client, {"To": USER, "From": sender, "Body": "x"})
    assert response.status_code == 400 and response.get_json()["code"] == 21212
    assert fake_twilio.creates == []
    # Nor the business a webhook was sent to, nor a sender the admin API shows a window of.
    inbound = signed_post(client, "/twilio/inbound", inbound_params("SM" + "9" * 32, user=USER, business=sender))
    assert inbound.status_code == 400 and rows(db_engine, windows) == []
    shown = client.get("/v1/windows", query_string={"sender": sender, "user": USER}, headers=basic_auth())
    assert shown.status_code == 400 and shown.get_json()["code"] == 21211


@pytest.mark.parametrize("sender", ["whatsapp:+1415555010O", "whatsapp:14155550100x", "whatsapp:future_id-1"])
def test_a_sender_that_can_key_no_window_is_refused_by_the_admin_api_and_the_cli(app, client, sender):
    """A user's address of an unknown form is kept as sent; a business sender's is not (it is a number Twilio
    registered): a mistyped one must not answer "closed" as if it were real."""
    open_window(client)
    shown = client.get("/v1/windows", query_string={"sender": sender, "user": USER}, headers=basic_auth())
    assert shown.status_code == 400 and shown.get_json()["code"] == 21211
    assert app.test_cli_runner().invoke(args=["windows", "show", sender, USER]).exit_code != 0


def test_a_late_63016_to_a_bsuid_closes_that_users_window(client, fake_twilio, db_engine, log_lines):
    open_window(client, user=BSUID)
    sid = send(client, {"To": BSUID, "From": BUSINESS, "Body": "x"}).get_json()["sid"]
    assert window_of(client, BSUID)["open"] is True
    callback = {**failed_callback(sid), "To": BSUID}
    assert signed_post(client, "/twilio/status", callback).status_code == 200
    assert window_of(client, BSUID)["open"] is False
    [late] = [line for line in log_lines() if line["event"] == "late_window_failure"]
    assert late["decision"] == "closed" and "13491208655302741918" not in json.dumps(log_lines())


def test_a_user_address_of_an_unknown_form_is_stored_and_opens_its_window_not_refused(client, fake_twilio, db_engine,
                                                                                        log_lines):
    """A signed webhook refused is a message lost (Twilio does not send it again): an address Twilio may use one day
    (another id form) is kept as sent, said at WARNING, and a reply to the same address finds its window."""
    user = "whatsapp:future_id-0042@meta"
    response = signed_post(client, "/twilio/inbound", inbound_params("SM" + "4" * 32, user=user))
    assert response.status_code == 200
    [row] = rows(db_engine, windows)
    assert row["user"] == user
    [warning] = [line for line in log_lines() if line["event"] == "address_not_recognised"]
    assert (warning["level"], warning["field"]) == ("WARNING", "From")
    assert warning["user"] != user and warning["user"].startswith("whatsapp:")  # masked as any address is
    assert [line["decision"] for line in log_lines() if line["event"] == "inbound"] == ["window_opened"]

    fake_twilio.windows[(BUSINESS, user)] = utcnow()  # Twilio knows the user it posted the webhook for
    replied = send(client, {"To": "WhatsApp:future_id-0042@meta", "From": BUSINESS, "Body": "x"})
    assert replied.status_code == 201, replied.get_json()
    assert dict(fake_twilio.creates[-1].form)["To"] == "WhatsApp:future_id-0042@meta"
    assert window_of(client, user)["open"] is True

    # Such an address with no window is refused as before: the proxy cannot tell it from a typo.
    refused = send(client, {"To": "whatsapp:future_id-0043@meta", "From": BUSINESS, "Body": "x"})
    assert refused.status_code == 400 and refused.get_json()["code"] == 21211
    assert len(fake_twilio.creates) == 1


@pytest.mark.parametrize("value", ["whatsapp:<nobody>", "whatsapp:no body", "whatsapp:+1415;ext=9", "whatsapp:",
                                   "whatsapp:" + "9" * 120])
def test_what_cannot_even_key_a_window_is_still_refused(client, db_engine, value):
    response = signed_post(client, "/twilio/inbound", inbound_params("SM" + "5" * 32, user=value))
    assert response.status_code == 400 and response.get_json()["code"] == 21211
    assert rows(db_engine, windows) == [] and rows(db_engine, messages) == []



@pytest.mark.parametrize("user", [BSUID, "whatsapp:future_id-0042@meta"])
def test_the_app_gets_the_webhook_and_its_reply_to_that_user_is_relayed_unwarned(forwarding, fake_app, log_lines, user):
    fake_app.reply = f'<?xml version="1.0" encoding="UTF-8"?><Response><Message to="{user}">Hi</Message></Response>'
    response = signed_post(forwarding.test_client(), "/twilio/inbound", inbound_params("SM" + "8" * 32, user=user))
    assert response.status_code == 200 and response.get_data(as_text=True) == fake_app.reply
    [(path, form, _)] = fake_app.received
    assert path == "/app/inbound" and dict(form)["From"] == user  # forwarded as Twilio sent it
    assert [line for line in log_lines() if line["event"] == "twiml_not_judged"] == []


def test_a_bsuid_as_long_as_meta_allows_keys_a_window_and_is_sent_to_as_it_was_written(client, fake_twilio, db_engine):
    user = "whatsapp:US.ENT." + "4" * 128  # longer than the 128 characters an address column holds
    open_window(client, user=user)
    [row] = rows(db_engine, windows)
    assert len(row["user"]) == 128 and row["user"] == normalise(user) != user
    assert rows(db_engine, messages)[0]["user"] == row["user"]
    allowed = send(client, {"To": user, "From": BUSINESS, "Body": "x"})
    assert allowed.status_code == 201, allowed.get_json()
    assert dict(fake_twilio.creates[-1].form)["To"] == user  # what Twilio gets is what the app wrote
    assert window_of(client, user)["open"] is True
    blocked = send(client, {"To": user[:-1] + "5", "From": BUSINESS, "Body": "x"})
    assert blocked.status_code == 400 and blocked.get_json()["code"] == 63016


def test_the_key_a_listing_shows_for_a_long_bsuid_looks_its_window_up_but_is_never_sent_to(client, fake_twilio):
    """The listing can show only the key; looking it up works, and a send to it is refused by the proxy rather
    than given to Twilio as an address no user has (review, session 17)."""
    user = "whatsapp:US.ENT." + "4" * 128
    open_window(client, user=user)
    [shown] = client.get("/v1/windows/expiring?within=86400", headers=basic_auth()).get_json()["windows"]
    key = shown["user"]
    assert key == normalise(user) == normalise(key) and "~" in key
    assert window_of(client, key)["open"] is True
    refused = send(client, {"To": key, "From": BUSINESS, "Body": "x"})
    assert refused.status_code == 400 and refused.get_json()["code"] == 21211
    assert "the whatsapp: address the user wrote from" in refused.get_json()["message"]
    assert send(client, {"To": user, "From": BUSINESS, "Body": "x"}).status_code == 201
    assert [dict(c.form)["To"] for c in fake_twilio.creates] == [user]
