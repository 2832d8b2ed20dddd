"""ContentSid sends judged against the whole table: Content API lookups, approval, buttons, reroute, preflight."""

import json
from dataclasses import replace
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from proxy import create_app
from proxy.attempts import flush_all
from proxy.db import content_cache, send_attempts, utcnow, windows
from proxy.policy import Policy
from proxy.policy_file import Fallback
from proxy.rules import TABLE, Cell
from tests.conftest import BUSINESS, USER, basic_auth
from tests.http.test_gateway import SHAPE, open_window, send

SAMPLE_BODIES = {
    "twilio/text": {"body": "Hi {{1}}"},
    "twilio/media": {"body": "See", "media": ["https://example.com/a.png"]},
    "twilio/location": {"latitude": 39.7, "longitude": 104.9, "label": "Shop"},
    "twilio/call-to-action": {"body": "Call", "actions": [{"type": "URL", "title": "Open", "url": "https://x"}]},
    "twilio/quick-reply": {"body": "Pick", "actions": [{"type": "QUICK_REPLY", "title": "Yes", "id": "y"}]},
    "twilio/list-picker": {"body": "List", "button": "Open", "items": [{"item": "a", "id": "a"}]},
    "twilio/card": {"title": "Card", "actions": [{"type": "QUICK_REPLY", "title": "Ok", "id": "ok"}]},
    "twilio/carousel": {"body": "Carousel", "cards": []},
    "twilio/catalog": {"body": "Catalog", "id": "1"},
    "twilio/flows": {"body": "Flow", "pages": []},
    "whatsapp/card": {"body": "WA card", "actions": [{"type": "URL", "title": "Go", "url": "https://x"}]},
    "whatsapp/authentication": {"add_security_recommendation": True,
                                "actions": [{"type": "COPY_CODE", "copy_code_text": "Copy"}]},
    "twilio/pay": {"body": "Pay"},
    "whatsapp/flows": {"body": "Flow", "button_text": "Start", "flow_id": "1"},
}


def template_send(client, sid, **extra):
    return send(client, {"To": USER, "From": BUSINESS, "ContentSid": sid, **extra})


def expected(content_type, in_window, approved):
    """What the seed says for one cell, for the sample bodies above (each with at most one allowed button)."""
    in_cell, out_cell = TABLE[content_type]
    if in_window:
        ok = approved or in_cell in (Cell.ALLOWED, Cell.DEPENDS_ON_BUTTONS)
        return (201, None) if ok else (400, 63005)
    if out_cell is Cell.NOT_SUPPORTED:
        return 400, 63016
    return (201, None) if approved else (400, 63016)


@pytest.mark.parametrize("approved", [True, False], ids=["approved", "unapproved"])
@pytest.mark.parametrize("in_window", [True, False], ids=["in-window", "out-of-window"])
@pytest.mark.parametrize("content_type", list(TABLE))
def test_every_cell_through_http(client, fake_twilio, content_type, in_window, approved):
    sid = fake_twilio.add_content({content_type: SAMPLE_BODIES[content_type]},
                                  "approved" if approved else "unsubmitted")
    if in_window:
        open_window(client)
    response = template_send(client, sid)
    status, code = expected(content_type, in_window, approved)
    assert response.status_code == status, response.get_json()
    if code:
        body = response.get_json()
        assert set(body) == SHAPE and body["code"] == code
        assert content_type in body["message"] or "window" in body["message"]
        assert response.headers["X-Proxy-Decision"] == "blocked"
        assert fake_twilio.creates == []
    else:
        assert response.headers["X-Proxy-Decision"] == "allowed"
        assert [dict(r.form)["ContentSid"] for r in fake_twilio.creates] == [sid]


def test_multi_type_content_is_judged_by_the_type_whatsapp_receives(client, fake_twilio):
    # text alone could go out in session; with a carousel beside it WhatsApp gets the carousel.
    sid = fake_twilio.add_content({"twilio/text": {"body": "x"}, "twilio/carousel": {"body": "c", "cards": []}},
                                  "pending")
    open_window(client)
    response = template_send(client, sid)
    assert response.status_code == 400 and response.get_json()["code"] == 63005
    assert "twilio/carousel" in response.get_json()["message"] and "'pending'" in response.get_json()["message"]


def test_a_type_given_as_null_is_not_judged(client, fake_twilio):
    """Every type in the Content API's schema is nullable: an approved text template listing `"twilio/location":
    null` was judged as a location, which no template may carry outside the window (63016)."""
    sid = fake_twilio.add_content({"twilio/text": {"body": "x"}, "twilio/location": None}, "approved")
    response = template_send(client, sid)  # no window
    assert response.status_code == 201 and response.headers["X-Proxy-Decision"] == "allowed"


@pytest.mark.parametrize("flat", [False, True], ids=["nested", "flat"])
def test_approval_nested_or_flat(client, fake_twilio, flat):
    sid = fake_twilio.add_content({"twilio/text": {"body": "x"}}, "APPROVED", flat=flat)
    assert template_send(client, sid).status_code == 201


def test_phone_number_button_needs_approval_in_session(client, fake_twilio):
    sid = fake_twilio.add_content({"twilio/card": {"title": "t", "actions": [{"type": "PHONE_NUMBER", "phone": "+1"}]}},
                                  "unsubmitted")
    open_window(client)
    response = template_send(client, sid)
    assert response.status_code == 400 and response.get_json()["code"] == 63005
    assert "PHONE_NUMBER" in response.get_json()["message"]


def test_lenient_button_rule_allows_three_of_one_type(settings, db_engine, fake_twilio):
    actions = [{"type": "QUICK_REPLY", "title": str(i), "id": str(i)} for i in range(3)]
    sid = fake_twilio.add_content({"twilio/card": {"title": "t", "actions": actions}}, "unsubmitted")
    strict = create_app(settings).test_client()
    open_window(strict)
    assert template_send(strict, sid).status_code == 400
    lenient = create_app(replace(settings, policy=Policy(button_rule="lenient"))).test_client()
    assert template_send(lenient, sid).status_code == 201


@pytest.mark.parametrize("count", [3, 4])
def test_an_unapproved_quick_reply_with_more_than_three_buttons_is_refused_in_session(client, fake_twilio, count):
    actions = [{"type": "QUICK_REPLY", "title": f"Option {i}", "id": f"o{i}"} for i in range(count)]
    sid = fake_twilio.add_content({"twilio/quick-reply": {"body": "Pick one", "actions": actions}}, "unsubmitted")
    open_window(client)
    response = template_send(client, sid)
    if count == 3:
        assert response.status_code == 201 and response.headers["X-Proxy-Decision"] == "allowed"
    else:
        body = response.get_json()
        assert response.status_code == 400 and body["code"] == 63005 and "at most 3" in body["message"]
        assert fake_twilio.creates == []


def test_unknown_content_sid_is_21655(client, fake_twilio):
    response = template_send(client, "HX" + "0" * 32)
    assert response.status_code == 400 and response.get_json()["code"] == 21655
    assert template_send(client, "HXnot-a-sid").get_json()["code"] == 21655
    assert fake_twilio.creates == []


@pytest.mark.parametrize("variables", ["not json", "[1, 2]", '{"1": 5}', '{"1": null}', '"text"'])
def test_invalid_content_variables_is_21656(client, fake_twilio, variables):
    sid = fake_twilio.add_content({"twilio/text": {"body": "x"}})
    response = template_send(client, sid, ContentVariables=variables)
    assert response.status_code == 400 and response.get_json()["code"] == 21656
    assert fake_twilio.creates == []


def test_content_variables_without_content_sid_is_21654(client, fake_twilio):
    response = send(client, {"To": USER, "From": BUSINESS, "Body": "x", "ContentVariables": '{"1": "a"}'})
    assert response.status_code == 400 and response.get_json()["code"] == 21654


def test_content_api_down_fails_closed(client, fake_twilio, log_lines):
    sid = fake_twilio.add_content({"twilio/text": {"body": "x"}})
    fake_twilio.content_down = True
    open_window(client)
    response = template_send(client, sid)
    assert response.status_code == 503 and set(response.get_json()) == SHAPE
    assert response.headers["X-Proxy-Decision"] == "rejected"  # nothing was judged, nothing sent
    assert fake_twilio.creates == []
    # The refusal is said in a line of its own (it had none: no decision line, no attempt row).
    [line] = [line for line in log_lines() if line["event"] == "content_unavailable"]
    assert line["content_sid"] == sid and line["detail"] == "Content API answered 503"
    assert line["request_id"] == response.headers["X-Request-Id"]


def test_content_is_cached_in_the_database_with_a_ttl(settings, db_engine, fake_twilio):
    sid = fake_twilio.add_content({"twilio/text": {"body": "x"}})
    first = create_app(settings).test_client()
    for _ in range(3):
        assert template_send(first, sid).status_code == 201
    assert len(fake_twilio.content_requests(sid)) == 2  # content + approval, once
    # A second process (new app) reads the database cache instead of calling Twilio.
    second = create_app(settings).test_client()
    assert template_send(second, sid).status_code == 201
    assert len(fake_twilio.content_requests(sid)) == 2
    # Once the TTL has passed, the next send asks again and sees the new approval.
    fake_twilio.contents[sid]["approval"] = "paused"
    with db_engine.begin() as conn:
        conn.execute(update(content_cache).values(fetched_at=utcnow() - timedelta(seconds=301)))
    third = create_app(settings).test_client()
    response = template_send(third, sid)
    assert response.status_code == 400 and "'paused'" in response.get_json()["message"]
    assert len(fake_twilio.content_requests(sid)) == 4


@pytest.mark.parametrize("approval", ["paused", "disabled"])
def test_a_paused_template_is_blocked_inside_the_window_too(client, fake_twilio, approval):
    sid = fake_twilio.add_content({"twilio/text": {"body": "Hi"}}, approval)
    open_window(client)
    response = template_send(client, sid)
    assert response.status_code == 400 and response.headers["X-Proxy-Decision"] == "blocked"
    body = response.get_json()
    assert body["code"] == 63005 and f"'{approval}'" in body["message"] and "template_unsendable" in body["message"]
    assert fake_twilio.creates == []


def test_content_refresh_with_the_content_api_unreachable_names_the_url_it_tried(settings, db_engine):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed: connection refused
    app = create_app(replace(settings, twilio_content_base_url=f"http://user:secret@127.0.0.1:{port}"))
    result = app.test_cli_runner().invoke(args=["content", "refresh"])
    assert result.exit_code == 1
    assert f"Content API unreachable (ConnectionError) at http://…@127.0.0.1:{port} (TWILIO_CONTENT_BASE_URL)" \
        in result.output and "secret" not in result.output, result.output
    app.extensions["proxy"].engine.dispose()


def test_content_refresh_command_lists_content_and_approvals(settings, db_engine, fake_twilio):
    sids = [fake_twilio.add_content({"twilio/text": {"body": str(i)}}, "approved" if i % 2 else "rejected")
            for i in range(7)]
    app = create_app(settings)
    app.extensions["proxy"].content.list_page_size = 3  # forces three pages
    result = app.test_cli_runner().invoke(args=["content", "refresh"])
    assert result.exit_code == 0, result.output
    assert "7" in result.output
    with db_engine.connect() as conn:
        rows = {r.sid: r.approval_status for r in conn.execute(select(content_cache))}
    assert rows == {sid: ("approved" if i % 2 else "rejected") for i, sid in enumerate(sids)}
    pages = [r for r in fake_twilio.requests if r.path == "/v1/ContentAndApprovals"]
    assert len(pages) == 3
    # Sends now judge from the cache without asking Twilio per content.
    client = app.test_client()
    assert template_send(client, sids[1]).status_code == 201
    assert template_send(client, sids[0]).status_code == 400
    assert len(fake_twilio.content_requests(sids[1])) == 0


def test_scheduled_send_is_judged_at_send_time(client, fake_twilio):
    open_window(client)  # open now, for 24 h
    soon = (utcnow() + timedelta(hours=1)).isoformat()
    later = (utcnow() + timedelta(days=2)).isoformat().replace("+00:00", "Z")
    # Twilio schedules only through a Messaging Service (35118 without one); From still names the sender.
    base = {"To": USER, "From": BUSINESS, "MessagingServiceSid": "MG" + "a" * 32, "Body": "x", "ScheduleType": "fixed"}
    assert send(client, {**base, "SendAt": soon}).status_code == 201
    blocked = send(client, {**base, "SendAt": later})
    assert blocked.status_code == 400 and blocked.get_json()["code"] == 63016
    assert "closes at" in blocked.get_json()["message"] and "SendAt" in blocked.get_json()["message"]
    assert send(client, {**base, "SendAt": "next tuesday"}).get_json()["code"] == 35115


@pytest.mark.parametrize("schedule_type", [None, "", "FIXED"])
def test_a_send_at_without_schedule_type_fixed_is_judged_now(client, fake_twilio, schedule_type):
    """Twilio schedules a create only with ScheduleType=fixed beside its SendAt ("This parameter/value combination
    indicates to Twilio that the message should be sent at a fixed time in the future"): judged at a SendAt past the
    window's end, a send the window allows now was refused with a 63016 Twilio would never give."""
    service = "MG" + "a" * 32
    open_window(client, MessagingServiceSid=service)
    later = (utcnow() + timedelta(days=2)).isoformat().replace("+00:00", "Z")
    form = {"To": USER, "MessagingServiceSid": service, "Body": "x", "SendAt": later}
    if schedule_type is not None:
        form["ScheduleType"] = schedule_type
    response = send(client, form)
    assert response.headers["X-Proxy-Decision"] == "allowed" and response.status_code == 201
    assert len(fake_twilio.creates) == 1
    scheduled = send(client, {**form, "ScheduleType": "fixed"})  # the same with it: past the window's end
    assert scheduled.status_code == 400 and scheduled.get_json()["code"] == 63016
    assert len(fake_twilio.creates) == 1


@pytest.mark.parametrize("sender", [{"From": BUSINESS}, {"MessagingServiceSid": "MG" + "a" * 32}])
def test_a_send_at_twilio_will_not_schedule_is_judged_now(client, fake_twilio, sender):
    """Without a Messaging Service Twilio schedules nothing (35118, or sent at once): judged at its SendAt, a send
    the open window allows was refused with a 63016 Twilio would never give."""
    service = "MessagingServiceSid" in sender
    open_window(client, **({"MessagingServiceSid": "MG" + "a" * 32} if service else {}))
    later = (utcnow() + timedelta(hours=30)).isoformat().replace("+00:00", "Z")
    response = send(client, {"To": USER, **sender, "Body": "x", "SendAt": later, "ScheduleType": "fixed"})
    if service:  # scheduled past the window's end: WhatsApp would fail it
        assert response.status_code == 400 and response.get_json()["code"] == 63016
        assert fake_twilio.creates == []
    else:  # forwarded as sent; Twilio's own answer (the simulator's, as its error page says) is relayed
        assert response.headers["X-Proxy-Decision"] == "allowed"
        assert response.status_code == 400 and response.get_json()["code"] == 35118
        assert len(fake_twilio.creates) == 1


FALLBACK_VARS = {"1": "{profile_name}", "2": "order"}


@pytest.fixture
def reroute_app(settings, db_engine, fake_twilio):
    fallback_sid = fake_twilio.add_content({"twilio/text": {"body": "Hi {{1}}, about your {{2}}"}}, "approved")
    app = create_app(replace(settings, policy=Policy(default_action="reroute"),
                             fallback=Fallback(fallback_sid, FALLBACK_VARS)))
    app.fallback_sid = fallback_sid
    return app


def test_reroute_sends_the_approved_fallback_instead(reroute_app, fake_twilio, db_engine):
    client = reroute_app.test_client()
    open_window(client)  # records ProfileName "Ada"
    with db_engine.begin() as conn:
        conn.execute(update(windows).values(expires_at=utcnow() - timedelta(hours=1)))
    response = send(client, {"To": USER, "From": BUSINESS, "Body": "free form", "StatusCallback": "https://app/cb",
                             "MediaUrl": "https://example.com/x.png"})
    assert response.status_code == 201
    assert response.headers["X-Proxy-Decision"] == "rerouted"
    assert response.headers["X-Proxy-Rerouted-To"] == reroute_app.fallback_sid
    [received] = fake_twilio.creates
    form = dict(received.form)
    assert form == {"To": USER, "From": BUSINESS, "StatusCallback": "https://app/cb",
                    "ContentSid": reroute_app.fallback_sid,
                    "ContentVariables": json.dumps({"1": "Ada", "2": "order"})}
    assert response.get_json()["sid"] in fake_twilio.messages
    assert flush_all()
    with db_engine.connect() as conn:
        attempt = conn.execute(select(send_attempts)).mappings().one()
    assert (attempt["decision"], attempt["reason"], attempt["message_sid"]) == \
        ("rerouted", "window_closed", response.get_json()["sid"])


def test_a_reroute_keeps_scheduling_validity_and_retention_fields(reroute_app, fake_twilio):
    """A rerouted scheduled send stays scheduled: only the content is replaced."""
    send_at = (utcnow() + timedelta(days=2)).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    kept = {"To": USER, "MessagingServiceSid": "MG" + "a" * 32, "StatusCallback": "https://app/cb",
            "SendAt": send_at, "ScheduleType": "fixed", "ValidityPeriod": "600", "MessageIntent": "marketing",
            "ContentRetention": "discard", "AddressRetention": "obfuscate", "ApplicationSid": "AP" + "b" * 32,
            # Delivery options, not content (they were dropped: a caller's ProvideFeedback lost on the fallback).
            "ProvideFeedback": "true", "Attempt": "2", "ShortenUrls": "true", "RiskCheck": "disable"}
    response = send(reroute_app.test_client(), {**kept, "Body": "free form, cold", "SmartEncoded": "true",
                                                "PersistentAction": "geo:37.7,-122.4"})
    assert response.status_code == 201 and response.headers["X-Proxy-Decision"] == "rerouted"
    [received] = fake_twilio.creates
    form = dict(received.form)
    assert {k: form.get(k) for k in kept} == kept
    assert form["ContentSid"] == reroute_app.fallback_sid and "Body" not in form
    assert "SmartEncoded" not in form and "PersistentAction" not in form  # the original's content, replaced


@pytest.mark.parametrize("profile_name", [None, "  "])
def test_a_cold_reroute_never_sends_an_empty_variable(reroute_app, fake_twilio, db_engine, profile_name):
    """The user never wrote (or has a blank profile name): Twilio refuses "" with 21656."""
    client = reroute_app.test_client()
    if profile_name is not None:
        open_window(client, ProfileName=profile_name)
        with db_engine.begin() as conn:
            conn.execute(update(windows).values(expires_at=utcnow() - timedelta(hours=1)))
    response = send(client, {"To": USER, "From": BUSINESS, "Body": "first contact"})
    assert response.status_code == 201 and response.headers["X-Proxy-Decision"] == "rerouted"
    [received] = fake_twilio.creates
    assert dict(received.form)["ContentVariables"] == json.dumps({"1": "there", "2": "order"})


@pytest.mark.parametrize("profile_name, rendered", [("Ada\tLovelace", "Ada Lovelace"), ("Ada      Lovelace", "Ada Lovelace"),
                                                    ("Ada\nLovelace ", "AdaLovelace"),  # stored without it
                                                    ("\t \t", "there")])
def test_a_profile_name_is_rendered_as_twilio_takes_a_variable(reroute_app, fake_twilio, db_engine, profile_name,
                                                               rendered):
    """Twilio refuses a variable holding a newline, a tab or more than four spaces in a row (21656): every
    reroute to a user whose WhatsApp name held one failed."""
    client = reroute_app.test_client()
    open_window(client, ProfileName=profile_name)
    with db_engine.begin() as conn:
        conn.execute(update(windows).values(expires_at=utcnow() - timedelta(hours=1)))
    response = send(client, {"To": USER, "From": BUSINESS, "Body": "x"})
    assert response.status_code == 201 and response.headers["X-Proxy-Decision"] == "rerouted"
    assert dict(fake_twilio.creates[0].form)["ContentVariables"] == json.dumps({"1": rendered, "2": "order"})


@pytest.mark.parametrize("content_down", [False, True])
def test_a_blocked_messenger_send_is_63016_without_asking_about_the_fallback(reroute_app, fake_twilio, content_down):
    """Only WhatsApp has templates to fall back to: no Content API lookup for a Messenger send, so its outage
    cannot turn the 63016 into a 503 about a template the caller never named."""
    fake_twilio.content_down = content_down
    response = send(reroute_app.test_client(), {"To": "messenger:1234567", "From": "messenger:999", "Body": "hi"})
    assert response.status_code == 400 and response.get_json()["code"] == 63016
    assert fake_twilio.content_requests() == [] and fake_twilio.creates == []


def test_a_fallback_names_its_own_default_for_an_unknown_profile_name(settings, db_engine, fake_twilio):
    sid = fake_twilio.add_content({"twilio/text": {"body": "Hola {{1}}"}}, "approved")
    app = create_app(replace(settings, policy=Policy(default_action="reroute"),
                             fallback=Fallback(sid, {"1": "{profile_name}"}, profile_name_default="cliente")))
    assert send(app.test_client(), {"To": USER, "From": BUSINESS, "Body": "x"}).status_code == 201
    assert dict(fake_twilio.creates[0].form)["ContentVariables"] == json.dumps({"1": "cliente"})


@pytest.mark.parametrize("content_type", list(TABLE))
def test_reroute_for_every_type_that_may_not_go_out(reroute_app, fake_twilio, content_type):
    """Out of the window, an unapproved template of any type is replaced by the approved fallback."""
    sid = fake_twilio.add_content({content_type: SAMPLE_BODIES[content_type]}, "unsubmitted")
    response = template_send(reroute_app.test_client(), sid)
    assert response.status_code == 201 and response.headers["X-Proxy-Decision"] == "rerouted"
    assert [dict(r.form)["ContentSid"] for r in fake_twilio.creates] == [reroute_app.fallback_sid]


@pytest.mark.parametrize("content_type", ["twilio/carousel", "twilio/flows", "whatsapp/authentication"])
def test_reroute_in_window_for_types_that_need_approval(reroute_app, fake_twilio, content_type):
    client = reroute_app.test_client()
    open_window(client)
    sid = fake_twilio.add_content({content_type: SAMPLE_BODIES[content_type]}, "pending")
    response = template_send(client, sid)
    assert response.headers["X-Proxy-Decision"] == "rerouted"
    assert [dict(r.form)["ContentSid"] for r in fake_twilio.creates] == [reroute_app.fallback_sid]


def test_reroute_of_types_not_supported_out_of_session(reroute_app, fake_twilio):
    sid = fake_twilio.add_content({"twilio/location": SAMPLE_BODIES["twilio/location"]}, "approved")
    response = template_send(reroute_app.test_client(), sid)
    assert response.status_code == 201 and response.headers["X-Proxy-Decision"] == "rerouted"
    assert dict(fake_twilio.creates[0].form)["ContentSid"] == reroute_app.fallback_sid


def test_reroute_blocks_when_the_fallback_is_not_approved(reroute_app, fake_twilio):
    fake_twilio.contents[reroute_app.fallback_sid]["approval"] = "rejected"
    response = send(reroute_app.test_client(), {"To": USER, "From": BUSINESS, "Body": "x"})
    assert response.status_code == 400 and response.get_json()["code"] == 63016
    assert "fallback" in response.get_json()["message"]
    assert fake_twilio.creates == []


def test_a_fallback_template_that_does_not_exist_is_named_in_the_block(settings, db_engine, fake_twilio, caplog):
    """A mistyped FALLBACK_CONTENT_SID blocked every send as a plain no_window: nothing said why no reroute."""
    missing = "HX" + "ab" * 16
    app = create_app(replace(settings, policy=Policy(default_action="reroute"), fallback=Fallback(missing, {})))
    response = send(app.test_client(), {"To": USER, "From": BUSINESS, "Body": "x"})
    body = response.get_json()
    assert response.status_code == 400 and body["code"] == 63016, body
    assert "fallback template does not exist" in body["message"] and "21655" in body["message"]
    assert response.headers["X-Proxy-Decision"] == "blocked" and fake_twilio.creates == []
    (line,) = [r for r in caplog.records if r.getMessage() == "send"]
    assert line.reason == "no_window+fallback_missing"


def test_in_window_allowed_sends_are_never_rerouted(reroute_app, fake_twilio):
    client = reroute_app.test_client()
    open_window(client)
    response = send(client, {"To": USER, "From": BUSINESS, "Body": "x"})
    assert response.headers["X-Proxy-Decision"] == "allowed"
    assert dict(fake_twilio.creates[0].form)["Body"] == "x"


def test_messenger_out_of_window_is_blocked_even_with_reroute(reroute_app, fake_twilio):
    response = send(reroute_app.test_client(), {"To": "messenger:1", "From": "messenger:2", "Body": "x"})
    assert response.status_code == 400 and response.headers["X-Proxy-Decision"] == "blocked"


PREFLIGHT = "/v1/preflight"


def test_preflight_answers_without_sending(client, fake_twilio):
    sid = fake_twilio.add_content({"twilio/card": SAMPLE_BODIES["twilio/card"]}, "pending")
    response = client.post(PREFLIGHT, data={"To": USER, "From": BUSINESS, "ContentSid": sid}, headers=basic_auth())
    assert response.status_code == 200
    body = response.get_json()
    assert body["decision"] == "blocked" and body["reason"] == "template_not_approved" and body["code"] == 63016
    assert body["content_type"] == "twilio/card" and body["approval_status"] == "pending"
    assert body["window"] == {"open": False, "expires_at": None, "last_inbound_at": None, "seconds_left": 0}
    open_window(client)
    body = client.post(PREFLIGHT, data={"To": USER, "From": BUSINESS, "ContentSid": sid}, headers=basic_auth()).get_json()
    assert body["decision"] == "allowed" and body["reason"] == "buttons_allowed_in_session"
    assert body["window"]["open"] is True and 86000 < body["window"]["seconds_left"] <= 86340
    assert fake_twilio.creates == []


def test_preflight_needs_auth_and_valid_fields(client):
    assert client.post(PREFLIGHT, data={"To": USER, "From": BUSINESS, "Body": "x"}).status_code == 401
    response = client.post(PREFLIGHT, data={"From": BUSINESS, "Body": "x"}, headers=basic_auth())
    assert response.status_code == 400 and response.get_json()["code"] == 21604


@pytest.mark.parametrize("approval, status", [("unsubmitted", 400), ("approved", 201)])
def test_a_type_the_table_does_not_know_is_judged_as_needing_approval(client, fake_twilio, approval, status):
    """Twilio adds content types; one the proxy does not know is never skipped in favour of a known one."""
    sid = fake_twilio.add_content({"twilio/text": {"body": "Hi"}, "twilio/brand-new": {"body": "?"}}, approval)
    open_window(client)
    response = template_send(client, sid)
    assert response.status_code == status
    if status == 400:
        assert response.get_json()["code"] == 63005 and "twilio/brand-new" in response.get_json()["message"]


def test_a_content_type_or_approval_status_longer_than_its_column_is_stored_cut_short(client, fake_twilio, db_engine):
    """The Content API names both; one this release does not know may be longer than the column, and
    PostgreSQL refused the whole attempt row: a send that went out left no record."""
    open_window(client)
    long_type = "twilio/" + "x" * 80
    sent = template_send(client, fake_twilio.add_content({long_type: {"body": "hi"}}, "approved"))
    unknown = template_send(client, fake_twilio.add_content({"twilio/text": {"body": "hi"}}, "a" * 40 + "_review"))
    assert sent.status_code == 201 and unknown.status_code == 201  # text in the window needs no approval
    assert flush_all()
    with db_engine.connect() as conn:
        rows = conn.execute(select(send_attempts.c.content_type, send_attempts.c.approval_status)
                            .order_by(send_attempts.c.id)).all()
    assert [(r.content_type, r.approval_status) for r in rows] == [(long_type[:64], "approved"),
                                                                    ("twilio/text", "a" * 32)]
