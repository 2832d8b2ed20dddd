"""The send decision: a pure function of channel, window state at send time, resolved content,
approval status and policy settings (no clock, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Mapping

from .addresses import WINDOWED_CHANNELS
from .rules import (
    MAX_SESSION_BUTTONS,
    MAX_UNAPPROVED_SESSION_BUTTONS,
    NEEDS_TEMPLATE,
    OUTSIDE_WINDOW,
    SESSION_BUTTON_TYPES,
    TABLE,
    UNKNOWN_TYPE,
    UNSENDABLE_APPROVALS,
    Cell,
)
from .windows import WindowState

TEXT = "twilio/text"
MEDIA = "twilio/media"

# Twilio's own wording of the two codes a block answers with (reference/twilio-facts.md): every block's message
# starts with it, so a caller matching on Twilio's text matches the proxy's too; the proxy's reason follows.
TWILIO_TEXT = {
    63016: ("Failed to send freeform message because you are outside the allowed window. "
            "If you are using WhatsApp, please use a Message Template."),
    63005: "Channel did not accept given content. Please see Channel specific error message for more information",
}


class Action(str, Enum):
    ALLOWED = "allowed"
    BLOCKED = "blocked"
    REROUTED = "rerouted"
    PASSTHROUGH = "passthrough"


@dataclass(frozen=True)
class Send:
    """What one Messages create asks for, once its ContentSid (if any) is resolved."""

    channel: str | None
    content_type: str | None  # the type WhatsApp receives; None: no type WhatsApp supports
    template: bool = False  # sent by ContentSid (may be approved) rather than Body/MediaUrl
    approval: str | None = None  # WhatsApp approval status, lower case
    buttons: tuple[str, ...] = ()  # action types of the delivered type, upper case

    @property
    def approved(self) -> bool:
        return self.template and self.approval == "approved"


@dataclass(frozen=True)
class Policy:
    button_rule: str = "strict"
    default_action: str = "block"  # what happens to a send that may not go out: block | reroute
    actions: Mapping[str, str] = field(default_factory=dict)  # per content type

    def action_for(self, content_type: str | None) -> str:
        return self.actions.get(content_type or "", self.default_action)


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    code: int | None = None


def content_type_of(body: str | None, media_urls: list[str], content_sid: str | None) -> str | None:
    """The free-form type of a Body/MediaUrl send (None for ContentSid, resolved elsewhere)."""
    if content_sid:
        return None
    return MEDIA if media_urls else TEXT


def decide(send: Send, window: WindowState, policy: Policy) -> Decision:
    if send.channel not in WINDOWED_CHANNELS:
        return Decision(Action.PASSTHROUGH, "channel_not_windowed")
    if send.channel == "messenger":
        # Messenger has no templates: inside its 24-hour window anything goes, outside nothing.
        return Decision(Action.ALLOWED, "window_open") if window.open else _closed(window)
    if send.content_type is None:
        return Decision(Action.BLOCKED, "type_not_supported_on_whatsapp", NEEDS_TEMPLATE)
    in_session, out_of_session = TABLE.get(send.content_type, UNKNOWN_TYPE)
    if not send.template:
        # Free-form Body/MediaUrl can never be an approved template.
        return Decision(Action.ALLOWED, "window_open") if window.open else _closed(window)
    if window.open:
        if send.approval in UNSENDABLE_APPROVALS:
            return Decision(Action.BLOCKED, "template_unsendable", NEEDS_TEMPLATE)
        limit = MAX_UNAPPROVED_SESSION_BUTTONS.get(send.content_type)
        if in_session is Cell.ALLOWED and (limit is None or len(send.buttons) <= limit):
            return Decision(Action.ALLOWED, "allowed_in_session")
        if send.approved:
            return Decision(Action.ALLOWED, "approved_template")
        if in_session is Cell.ALLOWED:  # more buttons than WhatsApp takes unapproved (quick-reply: three)
            return Decision(Action.BLOCKED, "buttons_need_approval", NEEDS_TEMPLATE)
        if in_session is Cell.DEPENDS_ON_BUTTONS:
            if buttons_allowed_unapproved(send.content_type, send.buttons, policy.button_rule):
                return Decision(Action.ALLOWED, "buttons_allowed_in_session")
            return Decision(Action.BLOCKED, "buttons_need_approval", NEEDS_TEMPLATE)
        return Decision(Action.BLOCKED, "needs_approval", NEEDS_TEMPLATE)
    if out_of_session is Cell.NOT_SUPPORTED:
        return Decision(Action.BLOCKED, "not_supported_out_of_session", OUTSIDE_WINDOW)
    if send.approved:
        return Decision(Action.ALLOWED, "approved_template")
    return Decision(Action.BLOCKED, "template_not_approved", OUTSIDE_WINDOW)


def _closed(window: WindowState) -> Decision:
    reason = "no_window" if window.expires_at is None else "window_closed"
    return Decision(Action.BLOCKED, reason, OUTSIDE_WINDOW)


def buttons_allowed_unapproved(content_type: str, buttons: tuple[str, ...], button_rule: str) -> bool:
    """May an unapproved template of this type carry these buttons in session?"""
    if not buttons:
        return True
    allowed = SESSION_BUTTON_TYPES.get(content_type, frozenset())
    if len(buttons) > MAX_SESSION_BUTTONS[button_rule] or not set(buttons) <= allowed:
        return False
    # WhatsApp rejects mixed action types and more than one URL button.
    return len(set(buttons)) == 1 and buttons.count("URL") <= 1


# What a rerouted send keeps of the original request: where and how it is delivered. The content (Body, MediaUrl,
# ContentSid and ContentVariables, PersistentAction, SmartEncoded, SendAsMms) is replaced; a field not named here
# is dropped rather than guessed at.
KEPT_ON_REROUTE = ("To", "From", "MessagingServiceSid", "StatusCallback", "ApplicationSid", "ValidityPeriod",
                   "SendAt", "ScheduleType", "MessageIntent", "ContentRetention", "AddressRetention",
                   "ProvideFeedback", "Attempt", "ShortenUrls", "RiskCheck", "TrafficType", "FallbackFrom",
                   "ForceDelivery", "MaxPrice")
# A send's scheduling, dropped from what goes out now instead.
SCHEDULING = ("SendAt", "ScheduleType")


def rerouted_params(params, content_sid: str, variables: str | None, *, now: bool = False) -> list[tuple[str, str]]:
    """The fallback's create: the original's delivery fields (`now`: without its scheduling), the template's
    content."""
    pairs = [(k, v) for k, v in params if k in KEPT_ON_REROUTE and not (now and k in SCHEDULING)]
    pairs.append(("ContentSid", content_sid))
    if variables is not None:
        pairs.append(("ContentVariables", variables))
    return pairs


def reroute(blocked: Decision, send: Send, fallback: Send | None, window: WindowState, policy: Policy) -> Decision:
    """Turn a block into a reroute when the policy asks for it and the fallback may really go out."""
    if blocked.action is not Action.BLOCKED or policy.action_for(send.content_type) != "reroute":
        return blocked
    if send.channel != "whatsapp":
        return blocked  # Messenger has no templates to fall back to
    if fallback is None:  # configured, but the Content API has no such template (deleted, or a mistyped sid)
        return Decision(Action.BLOCKED, f"{blocked.reason}+fallback_missing", blocked.code)
    if not fallback.approved or decide(fallback, window, policy).action is not Action.ALLOWED:
        return Decision(Action.BLOCKED, f"{blocked.reason}+fallback_not_sendable", blocked.code)
    return Decision(Action.REROUTED, blocked.reason, blocked.code)


_FALLBACK_TEXTS = {
    "fallback_not_sendable": " The configured fallback template is not approved or cannot be sent now, so nothing "
                             "was sent.",
    "fallback_missing": " The configured fallback template does not exist (Twilio answers 21655 for its sid: deleted, "
                        "or mistyped in FALLBACK_CONTENT_SID or the policy file), so nothing was sent.",
}


def explain(decision: Decision, send: Send, window: WindowState, judged_at: datetime | None = None) -> str:
    """The message of a block: which rule, which type, so the caller can act on it."""
    kind = send.content_type or "this content"
    base = decision.reason.partition("+")[0]  # `window_closed+fallback_not_sendable` is still a closed window
    unsent = _FALLBACK_TEXTS.get(decision.reason.partition("+")[2], "")
    if base in ("no_window", "window_closed"):
        if base == "no_window":
            why = "this user has not messaged this sender, so no customer-service window is open"
        elif judged_at is not None and window.expires_at is not None and window.expires_at > judged_at:
            # Still open now, but not at the time the message would go out (SendAt), or inside the safety margin.
            why = (f"the customer-service window closes at {_z(window.expires_at)}, too soon for this message "
                   "(its SendAt, or the proxy's WINDOW_SAFETY_MARGIN_SECONDS before the end)")
        else:
            why = f"the customer-service window closed at {_z(window.expires_at)}"
        return f"{TWILIO_TEXT[63016]} (proxy: {why}.){unsent}"
    texts = {
        "template_not_approved": f"Outside the 24-hour window only an approved template may be sent; "
                                 f"this {kind} template's WhatsApp approval is '{send.approval}'.",
        "not_supported_out_of_session": f"{kind} cannot be sent outside the 24-hour window on WhatsApp, "
                                        "even as an approved template.",
        "template_unsendable": f"This {kind} template's WhatsApp approval is '{send.approval}': Twilio sends "
                               "templates with this status to no one, inside the 24-hour window too.",
        "needs_approval": f"{kind} needs an approved template even inside the 24-hour window; "
                          f"this template's WhatsApp approval is '{send.approval}'.",
        "buttons_need_approval": f"An unapproved {kind} may be sent in session only with buttons WhatsApp allows "
                                 f"without approval{_limit(send.content_type)} (buttons: "
                                 f"{', '.join(send.buttons) or 'none'}); submit it for approval.",
        "type_not_supported_on_whatsapp": "This content has no type WhatsApp can receive.",
    }
    twilio_text = TWILIO_TEXT.get(decision.code)
    if twilio_text is None:
        return f"{texts.get(base, base)}{unsent} (proxy: rule {base}, code {decision.code}.)"
    return f"{twilio_text} (proxy: {texts.get(base, base)}{unsent} Rule {base}.)"


def _limit(content_type: str | None) -> str:
    limit = MAX_UNAPPROVED_SESSION_BUTTONS.get(content_type or "")
    return f", at most {limit}" if limit else ""


def _z(value) -> str:
    return value.isoformat().replace("+00:00", "Z") if value else "?"
