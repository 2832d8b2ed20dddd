"""The 24-hour customer-service window rules, as pure functions of times (no clock, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True)
class WindowState:
    open: bool
    expires_at: datetime | None
    last_inbound_at: datetime | None
    seconds_left: int

    def as_json(self) -> dict:
        return {
            "open": self.open,
            "expires_at": _iso(self.expires_at),
            "last_inbound_at": _iso(self.last_inbound_at),
            "seconds_left": self.seconds_left,
        }


CLOSED = WindowState(open=False, expires_at=None, last_inbound_at=None, seconds_left=0)


def extended_expiry(current: datetime | None, received_at: datetime, window_seconds: int) -> datetime:
    """An inbound message restarts the window; an older one arriving late never shortens it."""
    candidate = received_at + timedelta(seconds=window_seconds)
    return candidate if current is None or candidate > current else current


def window_state(
    expires_at: datetime | None,
    last_inbound_at: datetime | None,
    now: datetime,
    safety_margin_seconds: int,
) -> WindowState:
    """Open only while `now` is more than the safety margin before expiry.

    The margin covers clock skew and the time Twilio takes to hand the message to
    WhatsApp: a send accepted one second before expiry would still fail with 63016.
    """
    if expires_at is None:
        return CLOSED
    usable_until = expires_at - timedelta(seconds=safety_margin_seconds)
    left = int((usable_until - now).total_seconds())
    return WindowState(
        open=now < usable_until,
        expires_at=expires_at,
        last_inbound_at=last_inbound_at,
        seconds_left=max(left, 0),
    )


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None
