"""Parsing Content API answers: the delivered type, buttons, approval status."""

import pytest

from proxy.content import approval_status, buttons_of, delivered_type


@pytest.mark.parametrize(
    "types, expected",
    [
        ({"twilio/text": {}}, "twilio/text"),
        ({"twilio/text": {}, "twilio/location": {}}, "twilio/location"),
        ({"twilio/media": {}, "twilio/card": {}, "twilio/quick-reply": {}}, "twilio/card"),
        ({"twilio/list-picker": {}, "twilio/call-to-action": {}}, "twilio/list-picker"),
        ({"twilio/catalog": {}, "twilio/pay": {}}, "twilio/pay"),
        ({"whatsapp/card": {}, "whatsapp/authentication": {}, "twilio/text": {}}, "whatsapp/authentication"),
        ({"twilio/schedule": {}, "twilio/text": {}}, "twilio/text"),  # schedule is not a WhatsApp type
        ({"twilio/schedule": {}}, None),
        ({"twilio/text": {}, "whatsapp/flows": {}}, "whatsapp/flows"),
        ({"twilio/flows": {}, "whatsapp/flows": {}, "whatsapp/card": {}}, "whatsapp/card"),
        # A type the table does not know wins, so it is judged (as needing approval), never skipped.
        ({"twilio/text": {}, "twilio/brand-new": {}}, "twilio/brand-new"),
        ({"twilio/schedule": {}, "twilio/brand-new": {}}, "twilio/brand-new"),
        ({}, None),
        # Every type in Twilio's schema is nullable: one given as null is not there.
        ({"twilio/text": {"body": "hi"}, "twilio/location": None, "twilio/brand-new": None}, "twilio/text"),
        ({"twilio/card": None}, None),
    ],
)
def test_delivered_type_is_the_most_complex_whatsapp_type(types, expected):
    assert delivered_type(types) == expected


def test_buttons_of():
    types = {"twilio/card": {"title": "t", "actions": [{"type": "url", "title": "a"}, {"type": "PHONE_NUMBER"}]}}
    assert buttons_of(types, "twilio/card") == ("URL", "PHONE_NUMBER")
    assert buttons_of({"twilio/card": {"title": "t"}}, "twilio/card") == ()
    assert buttons_of({"twilio/card": {"actions": None}}, "twilio/card") == ()
    # Not a list: unreadable buttons are never taken for none (an unapproved card would go out in session).
    for malformed in ("nope", {"type": "URL"}, 3):
        assert buttons_of({"twilio/card": {"actions": malformed}}, "twilio/card") == ("MALFORMED",)
    assert buttons_of({}, None) == ()
    # An action that is not an object is counted as a button no rule allows, never dropped.
    assert buttons_of({"twilio/card": {"actions": [{"type": "URL"}, None, "oops"]}}, "twilio/card") == (
        "URL", "MALFORMED", "MALFORMED")


@pytest.mark.parametrize(
    "body, expected",
    [
        ({"whatsapp": {"status": "approved"}}, "approved"),
        ({"whatsapp": {"status": "APPROVED"}}, "approved"),
        ({"status": "Rejected", "name": "x"}, "rejected"),  # flat, as in ContentAndApprovals examples
        ({"whatsapp": {}}, "unsubmitted"),
        ({"whatsapp": None}, "unsubmitted"),
        ({}, "unsubmitted"),
        (None, "unsubmitted"),
        # Twilio marks a channel's approval with its type ("type": "whatsapp" in the spec's getApproval
        # example); an approval that names another channel is no WhatsApp approval, flat or nested.
        ({"whatsapp": {"type": "whatsapp", "status": "approved"}}, "approved"),
        ({"type": "rcs", "status": "approved", "name": "x"}, "unsubmitted"),
        ({"whatsapp": {"type": "rcs", "status": "approved"}}, "unsubmitted"),
        ({"rcs": {"type": "rcs", "status": "approved"}}, "unsubmitted"),
    ],
)
def test_approval_status(body, expected):
    assert approval_status(body) == expected
