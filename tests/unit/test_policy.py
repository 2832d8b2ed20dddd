"""The send decision: one case per seed cell, per button rule, per free-form/channel combination."""

from datetime import datetime, timedelta, timezone

import pytest

from proxy.policy import (MEDIA, TEXT, Action, Policy, Send, buttons_allowed_unapproved, content_type_of, decide,
                          TWILIO_TEXT, explain, reroute)
from proxy.rules import TABLE, UNKNOWN_TYPE, WHATSAPP_COMPLEXITY, Cell
from proxy.windows import CLOSED, window_state

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=timezone.utc)
OPEN = window_state(NOW + timedelta(hours=1), NOW - timedelta(hours=23), now=NOW, safety_margin_seconds=60)
EXPIRED = window_state(NOW - timedelta(hours=1), NOW - timedelta(hours=25), now=NOW, safety_margin_seconds=60)
STRICT, LENIENT = Policy(button_rule="strict"), Policy(button_rule="lenient")

# The seed table, re-typed from Twilio's Session Definitions page
# (https://www.twilio.com/docs/content/session-definitions; not imported from proxy.rules), so a transcription
# slip in the code fails here.
SEED = {
    "twilio/text": ("✅", "⚠️"),
    "twilio/media": ("✅", "⚠️"),
    "twilio/location": ("✅", "❌"),
    "twilio/call-to-action": ("⚠️ buttons", "⚠️"),
    "twilio/quick-reply": ("✅", "⚠️"),
    "twilio/list-picker": ("✅", "❌"),
    "twilio/card": ("⚠️ buttons", "⚠️"),
    "twilio/carousel": ("⚠️", "⚠️"),
    "twilio/catalog": ("✅", "⚠️"),
    "twilio/flows": ("⚠️", "⚠️"),
    "whatsapp/card": ("⚠️ buttons", "⚠️"),
    "whatsapp/authentication": ("⚠️", "⚠️"),
}
SYMBOL = {Cell.ALLOWED: "✅", Cell.NEEDS_APPROVAL: "⚠️", Cell.DEPENDS_ON_BUTTONS: "⚠️ buttons", Cell.NOT_SUPPORTED: "❌"}


def test_the_table_is_the_seed():
    assert {t: (SYMBOL[a], SYMBOL[b]) for t, (a, b) in TABLE.items() if t in SEED} == SEED
    assert set(TABLE) - set(SEED) == {"twilio/pay", "whatsapp/flows"}
    assert TABLE["twilio/pay"] == (Cell.ALLOWED, Cell.NOT_SUPPORTED)
    assert TABLE["whatsapp/flows"] == TABLE["twilio/flows"] == (Cell.NEEDS_APPROVAL, Cell.NEEDS_APPROVAL)
    assert set(WHATSAPP_COMPLEXITY) == set(TABLE)


def template(content_type, approval, buttons=()):
    return Send("whatsapp", content_type, template=True, approval=approval, buttons=tuple(buttons))


# One case per seed cell, unapproved (approval "unsubmitted") and with no buttons.
IN_SESSION = [
    ("twilio/text", Action.ALLOWED, "allowed_in_session", None),
    ("twilio/media", Action.ALLOWED, "allowed_in_session", None),
    ("twilio/location", Action.ALLOWED, "allowed_in_session", None),
    ("twilio/call-to-action", Action.ALLOWED, "buttons_allowed_in_session", None),
    ("twilio/quick-reply", Action.ALLOWED, "allowed_in_session", None),
    ("twilio/list-picker", Action.ALLOWED, "allowed_in_session", None),
    ("twilio/card", Action.ALLOWED, "buttons_allowed_in_session", None),
    ("twilio/carousel", Action.BLOCKED, "needs_approval", 63005),
    ("twilio/catalog", Action.ALLOWED, "allowed_in_session", None),
    ("twilio/flows", Action.BLOCKED, "needs_approval", 63005),
    ("whatsapp/card", Action.ALLOWED, "buttons_allowed_in_session", None),
    ("whatsapp/authentication", Action.BLOCKED, "needs_approval", 63005),
    ("twilio/pay", Action.ALLOWED, "allowed_in_session", None),
    ("whatsapp/flows", Action.BLOCKED, "needs_approval", 63005),
    ("twilio/some-new-type", Action.BLOCKED, "needs_approval", 63005),  # unknown: fail closed
]
OUT_OF_SESSION = [
    ("twilio/text", Action.BLOCKED, "template_not_approved", 63016),
    ("twilio/media", Action.BLOCKED, "template_not_approved", 63016),
    ("twilio/location", Action.BLOCKED, "not_supported_out_of_session", 63016),
    ("twilio/call-to-action", Action.BLOCKED, "template_not_approved", 63016),
    ("twilio/quick-reply", Action.BLOCKED, "template_not_approved", 63016),
    ("twilio/list-picker", Action.BLOCKED, "not_supported_out_of_session", 63016),
    ("twilio/card", Action.BLOCKED, "template_not_approved", 63016),
    ("twilio/carousel", Action.BLOCKED, "template_not_approved", 63016),
    ("twilio/catalog", Action.BLOCKED, "template_not_approved", 63016),
    ("twilio/flows", Action.BLOCKED, "template_not_approved", 63016),
    ("whatsapp/card", Action.BLOCKED, "template_not_approved", 63016),
    ("whatsapp/authentication", Action.BLOCKED, "template_not_approved", 63016),
    ("twilio/pay", Action.BLOCKED, "not_supported_out_of_session", 63016),
    ("whatsapp/flows", Action.BLOCKED, "template_not_approved", 63016),
    ("twilio/some-new-type", Action.BLOCKED, "template_not_approved", 63016),
]


@pytest.mark.parametrize("content_type, action, reason, code", IN_SESSION, ids=[c[0] for c in IN_SESSION])
def test_in_session_unapproved(content_type, action, reason, code):
    d = decide(template(content_type, "unsubmitted"), OPEN, STRICT)
    assert (d.action, d.reason, d.code) == (action, reason, code)


@pytest.mark.parametrize("content_type, action, reason, code", OUT_OF_SESSION, ids=[c[0] for c in OUT_OF_SESSION])
def test_out_of_session_unapproved(content_type, action, reason, code):
    for window in (EXPIRED, CLOSED):
        d = decide(template(content_type, "unsubmitted"), window, STRICT)
        assert (d.action, d.reason, d.code) == (action, reason, code)


@pytest.mark.parametrize("content_type", [*TABLE, "twilio/some-new-type"])
def test_approved_templates(content_type):
    in_cell, out_cell = TABLE.get(content_type, UNKNOWN_TYPE)
    assert decide(template(content_type, "approved"), OPEN, STRICT).action is Action.ALLOWED
    out = decide(template(content_type, "approved"), EXPIRED, STRICT)
    if out_cell is Cell.NOT_SUPPORTED:  # approval cannot make location/list-picker/pay start a conversation
        assert (out.action, out.reason) == (Action.BLOCKED, "not_supported_out_of_session")
    else:
        assert (out.action, out.reason) == (Action.ALLOWED, "approved_template")


@pytest.mark.parametrize("approval", ["received", "pending", "rejected", "paused", "disabled", "unsubmitted", None])
def test_only_approved_counts(approval):
    assert decide(template("twilio/text", approval), EXPIRED, STRICT).action is Action.BLOCKED
    assert decide(template("twilio/carousel", approval), OPEN, STRICT).action is Action.BLOCKED


@pytest.mark.parametrize("approval", ["paused", "disabled"])
@pytest.mark.parametrize("content_type", [*TABLE, "twilio/some-new-type"])
def test_a_paused_or_disabled_template_is_sent_nowhere(content_type, approval):
    """Twilio: "Message templates with this status can't be sent to end users" — inside the window too,
    for the types that need no approval there."""
    inside = decide(template(content_type, approval), OPEN, STRICT)
    assert (inside.action, inside.reason, inside.code) == (Action.BLOCKED, "template_unsendable", 63005)
    outside = decide(template(content_type, approval), EXPIRED, STRICT)
    assert outside.action is Action.BLOCKED and outside.code == 63016
    assert f"'{approval}'" in explain(inside, template(content_type, approval), OPEN)


BUTTON_CASES = [
    # content type, buttons, strict allows, lenient allows
    ("twilio/card", [], True, True),
    ("twilio/card", ["QUICK_REPLY"], True, True),
    ("twilio/card", ["URL"], True, True),
    ("twilio/card", ["VOICE_CALL"], True, True),
    ("twilio/card", ["PHONE_NUMBER"], False, False),
    ("twilio/card", ["COPY_CODE"], False, False),
    ("twilio/card", ["VOICE_CALL_REQUEST"], False, False),  # only call-to-action may carry it
    ("twilio/card", ["QUICK_REPLY", "QUICK_REPLY"], False, True),
    ("twilio/card", ["QUICK_REPLY"] * 3, False, True),
    ("twilio/card", ["QUICK_REPLY"] * 4, False, False),
    ("twilio/card", ["QUICK_REPLY", "URL"], False, False),  # mixed types
    ("twilio/card", ["URL", "URL"], False, False),  # one URL button at most
    ("twilio/call-to-action", ["VOICE_CALL_REQUEST"], True, True),
    ("twilio/call-to-action", ["URL"], True, True),
    ("twilio/call-to-action", ["PHONE_NUMBER"], False, False),
    ("twilio/call-to-action", ["COPY_CODE"], False, False),
    ("twilio/call-to-action", ["VOICE_CALL", "VOICE_CALL"], False, True),
    ("whatsapp/card", ["QUICK_REPLY"], True, True),
    ("whatsapp/card", ["QUICK_REPLY", "QUICK_REPLY", "QUICK_REPLY"], False, True),
    ("whatsapp/card", ["PHONE_NUMBER"], False, False),
    ("whatsapp/card", ["VOICE_CALL_REQUEST"], False, False),
]


@pytest.mark.parametrize("content_type, buttons, strict, lenient", BUTTON_CASES)
def test_button_rule(content_type, buttons, strict, lenient):
    assert buttons_allowed_unapproved(content_type, tuple(buttons), "strict") is strict
    assert buttons_allowed_unapproved(content_type, tuple(buttons), "lenient") is lenient
    d = decide(template(content_type, "unsubmitted", buttons), OPEN, STRICT)
    assert (d.action, d.code) == ((Action.ALLOWED, None) if strict else (Action.BLOCKED, 63005))
    assert decide(template(content_type, "approved", buttons), OPEN, STRICT).action is Action.ALLOWED


@pytest.mark.parametrize("count, allowed", [(1, True), (3, True), (4, False), (10, False)])
@pytest.mark.parametrize("button_rule", [STRICT, LENIENT], ids=["strict", "lenient"])
def test_an_unapproved_quick_reply_takes_three_buttons_in_session(count, allowed, button_rule):
    """✅ in the seed, but "only three buttons are allowed" without approval (Twilio's twilio/quick-reply page)."""
    unapproved = template("twilio/quick-reply", "unsubmitted", ["QUICK_REPLY"] * count)
    d = decide(unapproved, OPEN, button_rule)
    if allowed:
        assert (d.action, d.reason, d.code) == (Action.ALLOWED, "allowed_in_session", None)
    else:
        assert (d.action, d.reason, d.code) == (Action.BLOCKED, "buttons_need_approval", 63005)
        assert "at most 3" in explain(d, unapproved, OPEN)
    approved = template("twilio/quick-reply", "approved", ["QUICK_REPLY"] * count)
    assert decide(approved, OPEN, button_rule).action is Action.ALLOWED
    assert decide(approved, EXPIRED, button_rule).action is Action.ALLOWED


@pytest.mark.parametrize(
    "send, window, action, reason, code",
    [
        (Send("whatsapp", TEXT), OPEN, Action.ALLOWED, "window_open", None),
        (Send("whatsapp", MEDIA), OPEN, Action.ALLOWED, "window_open", None),
        (Send("whatsapp", TEXT), EXPIRED, Action.BLOCKED, "window_closed", 63016),
        (Send("whatsapp", MEDIA), CLOSED, Action.BLOCKED, "no_window", 63016),
        (Send("messenger", TEXT), OPEN, Action.ALLOWED, "window_open", None),
        (Send("messenger", TEXT), EXPIRED, Action.BLOCKED, "window_closed", 63016),
        (Send("messenger", None, template=True, approval="approved"), EXPIRED, Action.BLOCKED, "window_closed", 63016),
        (Send("messenger", None, template=True), OPEN, Action.ALLOWED, "window_open", None),
        (Send(None, TEXT), CLOSED, Action.PASSTHROUGH, "channel_not_windowed", None),
        (Send("rcs", None, template=True), CLOSED, Action.PASSTHROUGH, "channel_not_windowed", None),
        (Send("whatsapp", None, template=True, approval="approved"), OPEN, Action.BLOCKED,
         "type_not_supported_on_whatsapp", 63005),
    ],
)
def test_free_form_and_channels(send, window, action, reason, code):
    d = decide(send, window, STRICT)
    assert (d.action, d.reason, d.code) == (action, reason, code)


def test_content_type_of():
    assert content_type_of("hi", [], None) == TEXT
    assert content_type_of("hi", ["https://x/y.png"], None) == MEDIA
    assert content_type_of(None, ["https://x/y.png"], None) == MEDIA
    assert content_type_of("hi", [], "HX" + "0" * 32) is None


APPROVED_TEXT = template("twilio/text", "approved")
REROUTE = Policy(default_action="reroute")


def test_reroute_when_asked_and_the_fallback_is_approved():
    blocked = decide(Send("whatsapp", TEXT), EXPIRED, REROUTE)
    d = reroute(blocked, Send("whatsapp", TEXT), APPROVED_TEXT, EXPIRED, REROUTE)
    assert (d.action, d.reason, d.code) == (Action.REROUTED, "window_closed", 63016)
    not_supported = template("twilio/list-picker", "approved")
    d = reroute(decide(not_supported, EXPIRED, REROUTE), not_supported, APPROVED_TEXT, EXPIRED, REROUTE)
    assert d.action is Action.REROUTED and d.reason == "not_supported_out_of_session"


@pytest.mark.parametrize(
    "fallback, reason",
    [(template("twilio/text", "pending"), "window_closed+fallback_not_sendable"),
     (template("twilio/location", "approved"), "window_closed+fallback_not_sendable"),  # cannot go out of session
     (None, "window_closed+fallback_missing")],  # configured, but no such template (judge.py: 21655)
)
def test_reroute_only_to_a_sendable_approved_template(fallback, reason):
    blocked = decide(Send("whatsapp", TEXT), EXPIRED, REROUTE)
    d = reroute(blocked, Send("whatsapp", TEXT), fallback, EXPIRED, REROUTE)
    assert (d.action, d.reason, d.code) == (Action.BLOCKED, reason, 63016)


def test_per_type_action_and_messenger_never_reroute():
    policy = Policy(default_action="reroute", actions={"twilio/media": "block"})
    media = Send("whatsapp", MEDIA)
    assert reroute(decide(media, EXPIRED, policy), media, APPROVED_TEXT, EXPIRED, policy).action is Action.BLOCKED
    text = Send("whatsapp", TEXT)
    assert reroute(decide(text, EXPIRED, policy), text, APPROVED_TEXT, EXPIRED, policy).action is Action.REROUTED
    messenger = Send("messenger", TEXT)
    assert reroute(decide(messenger, EXPIRED, policy), messenger, APPROVED_TEXT, EXPIRED, policy).action \
        is Action.BLOCKED
    allowed = decide(text, OPEN, policy)
    assert reroute(allowed, text, APPROVED_TEXT, OPEN, policy) == allowed


def test_a_block_by_the_safety_margin_says_the_window_closes_later_not_that_it_closed():
    from proxy.policy import explain

    now = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)
    closing = window_state(now + timedelta(seconds=30), now - timedelta(hours=23), now, safety_margin_seconds=60)
    decision = decide(Send("whatsapp", TEXT), closing, Policy())
    assert decision.action is Action.BLOCKED and decision.code == 63016
    text = explain(decision, Send("whatsapp", TEXT), closing, now)
    assert "closes at 2026-01-01T12:00:30Z" in text and "closed at" not in text
    assert text.startswith("Failed to send freeform message because you are outside the allowed window.")
    closed = window_state(now - timedelta(seconds=1), now - timedelta(hours=25), now, safety_margin_seconds=60)
    assert "closed at 2026-01-01T11:59:59Z" in explain(decide(Send("whatsapp", TEXT), closed, Policy()),
                                                      Send("whatsapp", TEXT), closed, now)


def test_a_closed_window_whose_fallback_cannot_go_out_keeps_twilios_63016_wording():
    """Callers match on Twilio's message: a closed window is explained the same with or without a fallback
    that could not be sent, which only adds a sentence."""
    blocked = decide(Send("whatsapp", TEXT), EXPIRED, REROUTE)
    d = reroute(blocked, Send("whatsapp", TEXT), template("twilio/text", "pending"), EXPIRED, REROUTE)
    text = explain(d, Send("whatsapp", TEXT), EXPIRED, NOW)
    assert text.startswith("Failed to send freeform message because you are outside the allowed window.")
    assert "closed at" in text and "fallback template is not approved or cannot be sent now" in text


# Every way a send is blocked: the message starts with Twilio's own text for its code (callers match on it),
# the proxy's reason follows in parentheses.
BLOCKS = [
    (Send("whatsapp", TEXT), EXPIRED, 63016, "closed at"),
    (template("twilio/list-picker", "approved"), EXPIRED, 63016, "cannot be sent outside the 24-hour window"),
    (template("twilio/text", "pending"), EXPIRED, 63016, "approval is 'pending'"),
    (template("twilio/carousel", "pending"), OPEN, 63005, "needs an approved template even inside"),
    (template("twilio/text", "paused"), OPEN, 63005, "approval is 'paused'"),
    (template("twilio/card", "received", ["PHONE_NUMBER"]), OPEN, 63005, "buttons: PHONE_NUMBER"),
]


@pytest.mark.parametrize("send, window, code, reason", BLOCKS)
def test_every_block_starts_with_twilios_text_for_its_code(send, window, code, reason):
    decision = decide(send, window, STRICT)
    assert (decision.action, decision.code) == (Action.BLOCKED, code)
    text = explain(decision, send, window, NOW)
    assert text.startswith(TWILIO_TEXT[code] + " (proxy: ")
    assert reason in text and text.endswith(".)")
