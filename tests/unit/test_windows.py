"""The window rules with an injected clock."""

from datetime import datetime, timedelta, timezone

import pytest

from proxy.windows import extended_expiry, window_state

T0 = datetime(2026, 11, 25, 12, 0, tzinfo=timezone.utc)
DAY = 86400


@pytest.mark.parametrize(
    "current, received, expected",
    [
        (None, T0, T0 + timedelta(days=1)),  # first message opens the window
        (T0 + timedelta(hours=2), T0 + timedelta(hours=3), T0 + timedelta(hours=3, days=1)),  # restarts it
        (T0 + timedelta(days=2), T0, T0 + timedelta(days=2)),  # a late, older message never shortens it
    ],
)
def test_extended_expiry(current, received, expected):
    assert extended_expiry(current, received, DAY) == expected


@pytest.mark.parametrize(
    "now, margin, is_open, seconds_left",
    [
        (T0, 60, True, DAY - 60),
        (T0 + timedelta(seconds=DAY - 61), 60, True, 1),  # 1 s of usable window left
        (T0 + timedelta(seconds=DAY - 60), 60, False, 0),  # inside the safety margin: closed
        (T0 + timedelta(seconds=DAY - 1), 0, True, 1),
        (T0 + timedelta(seconds=DAY), 0, False, 0),  # expiry instant itself is closed
        (T0 + timedelta(days=3), 60, False, 0),
    ],
)
def test_window_state(now, margin, is_open, seconds_left):
    state = window_state(T0 + timedelta(days=1), T0, now=now, safety_margin_seconds=margin)
    assert state.open is is_open
    assert state.seconds_left == seconds_left
    assert state.expires_at == T0 + timedelta(days=1)


def test_no_window_is_closed():
    state = window_state(None, None, now=T0, safety_margin_seconds=60)
    assert not state.open and state.expires_at is None and state.seconds_left == 0
    assert state.as_json() == {"open": False, "expires_at": None, "last_inbound_at": None, "seconds_left": 0}


def test_as_json_uses_utc_z():
    state = window_state(T0 + timedelta(days=1), T0, now=T0, safety_margin_seconds=0)
    assert state.as_json()["expires_at"] == "2026-11-26T12:00:00Z"
    assert state.as_json()["last_inbound_at"] == "2026-11-25T12:00:00Z"
