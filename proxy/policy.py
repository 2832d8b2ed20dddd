"""The send decision: a pure function of channel, content and window state (no clock, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .addresses import WINDOWED_CHANNELS
from .windows import WindowState

TEXT = "twilio/text"
MEDIA = "twilio/media"

OUTSIDE_WINDOW = 63016


class Action(str, Enum):
    ALLOWED = "allowed"
    BLOCKED = "blocked"
    PASSTHROUGH = "passthrough"


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    code: int | None = None


def content_type_of(body: str | None, media_urls: list[str], content_sid: str | None) -> str | None:
    """What a Messages create asks to send: free-form text or media, or None for a ContentSid."""
    if content_sid:
        return None
    return MEDIA if media_urls else TEXT


def decide(channel: str | None, content_type: str | None, window: WindowState) -> Decision:
    """Judge one send. `content_type` None means a Content template (judged elsewhere for now)."""
    if channel not in WINDOWED_CHANNELS:
        return Decision(Action.PASSTHROUGH, "channel_not_windowed")
    if content_type is None:
        return Decision(Action.PASSTHROUGH, "content_sid_not_judged")
    if window.open:
        return Decision(Action.ALLOWED, "window_open")
    if window.expires_at is None:
        return Decision(Action.BLOCKED, "no_window", OUTSIDE_WINDOW)
    return Decision(Action.BLOCKED, "window_closed", OUTSIDE_WINDOW)
