"""WhatsApp approval requirements per Twilio content type, transcribed cell by cell from
Twilio's "Session Definitions" page (https://www.twilio.com/docs/content/session-definitions)."""

from __future__ import annotations

from enum import Enum


class Cell(str, Enum):
    ALLOWED = "allowed"                        # ✅ Can reply to inbound messages
    NEEDS_APPROVAL = "needs_approval"          # ⚠️ Template approval required
    DEPENDS_ON_BUTTONS = "depends_on_buttons"  # ⚠️ Template approval may be required ... based on buttons types present
    NOT_SUPPORTED = "not_supported"            # ❌ Not supported


A, T, B, X = Cell.ALLOWED, Cell.NEEDS_APPROVAL, Cell.DEPENDS_ON_BUTTONS, Cell.NOT_SUPPORTED

# content type:              (User Initiated: 24 hour window, Business Initiated: out of session)
TABLE: dict[str, tuple[Cell, Cell]] = {
    "twilio/text":             (A, T),
    "twilio/media":            (A, T),
    "twilio/location":         (A, X),
    "twilio/call-to-action":   (B, T),
    "twilio/quick-reply":      (A, T),
    "twilio/list-picker":      (A, X),
    "twilio/card":             (B, T),
    "twilio/carousel":         (T, T),
    "twilio/catalog":          (A, T),
    "twilio/flows":            (T, T),
    "whatsapp/card":           (B, T),
    "whatsapp/authentication": (T, T),
    # Not in the seed; placed where Twilio's content-types overview table puts it.
    "twilio/pay":              (A, X),
    # Not in the seed: a Flow built in WhatsApp's own tools (the Content API's `whatsapp/flows`, by
    # flow_id), the same kind of message as twilio/flows, which needs approval both ways.
    "whatsapp/flows":          (T, T),
}

# A type this table does not know (Twilio adds types): fail closed, as if it needed approval both
# ways; an approved template still goes out, an unapproved one is never guessed to be allowed.
UNKNOWN_TYPE: tuple[Cell, Cell] = (T, T)

# Content types WhatsApp cannot receive at all (twilio/schedule is for other channels).
NOT_ON_WHATSAPP = frozenset({"twilio/schedule"})

# "Twilio sends the most complex translation that the chosen channel supports", WhatsApp's order,
# least to most complex (Twilio's content-types overview).
WHATSAPP_COMPLEXITY: tuple[str, ...] = (
    "twilio/text",
    "twilio/media",
    "twilio/location",
    "twilio/quick-reply",
    "twilio/call-to-action",
    "twilio/list-picker",
    "twilio/card",
    "twilio/carousel",
    "twilio/catalog",
    "twilio/pay",
    "twilio/flows",
    "whatsapp/flows",
    "whatsapp/card",
    "whatsapp/authentication",
)

# Button types an *unapproved* template may carry in session (Twilio's per-type pages).
# A PHONE_NUMBER or COPY_CODE button, or any other type, needs approval.
SESSION_BUTTON_TYPES: dict[str, frozenset[str]] = {
    "twilio/card": frozenset({"QUICK_REPLY", "URL", "VOICE_CALL"}),
    "twilio/call-to-action": frozenset({"QUICK_REPLY", "URL", "VOICE_CALL", "VOICE_CALL_REQUEST"}),
    "whatsapp/card": frozenset({"QUICK_REPLY", "URL", "VOICE_CALL"}),
}

# A ✅ cell still has WhatsApp's limit on an unapproved interactive message in session: twilio/quick-reply
# carries up to ten buttons, "When you send an in-session WhatsApp message that does not require template
# approval, only three buttons are allowed" (https://www.twilio.com/docs/content/twilio-quick-reply). More
# need an approved template, in or out of the window.
MAX_UNAPPROVED_SESSION_BUTTONS: dict[str, int] = {"twilio/quick-reply": 3}

# BUTTON_RULE: the docs say both "approval is required when a card contains multiple buttons"
# (strict: at most one) and "a maximum of three buttons" in session (lenient, all of one type,
# at most one URL).
MAX_SESSION_BUTTONS = {"strict": 1, "lenient": 3}

# Approval statuses of which Twilio says "Message templates with this status can't be sent to end users":
# not even inside the window, where the type alone would need no approval.
UNSENDABLE_APPROVALS = frozenset({"paused", "disabled"})

# Out-of-session types that cannot start a conversation get the same error as a closed window.
OUTSIDE_WINDOW = 63016
# In session, content that needs an approval it does not have: "Channel did not accept given content".
NEEDS_TEMPLATE = 63005
