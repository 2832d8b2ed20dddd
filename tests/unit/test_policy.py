"""The send decision, one case per (channel, content, window) combination this slice judges."""

from datetime import datetime, timedelta, timezone

import pytest

from proxy.policy import MEDIA, TEXT, Action, content_type_of, decide
from proxy.windows import CLOSED, window_state

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=timezone.utc)
OPEN = window_state(NOW + timedelta(hours=1), NOW - timedelta(hours=23), now=NOW, safety_margin_seconds=60)
EXPIRED = window_state(NOW - timedelta(hours=1), NOW - timedelta(hours=25), now=NOW, safety_margin_seconds=60)


@pytest.mark.parametrize(
    "channel, content, window, action, reason, code",
    [
        ("whatsapp", TEXT, OPEN, Action.ALLOWED, "window_open", None),
        ("whatsapp", MEDIA, OPEN, Action.ALLOWED, "window_open", None),
        ("whatsapp", TEXT, EXPIRED, Action.BLOCKED, "window_closed", 63016),
        ("whatsapp", MEDIA, EXPIRED, Action.BLOCKED, "window_closed", 63016),
        ("whatsapp", TEXT, CLOSED, Action.BLOCKED, "no_window", 63016),
        ("messenger", TEXT, OPEN, Action.ALLOWED, "window_open", None),
        ("messenger", TEXT, EXPIRED, Action.BLOCKED, "window_closed", 63016),
        ("whatsapp", None, CLOSED, Action.PASSTHROUGH, "content_sid_not_judged", None),
        (None, TEXT, CLOSED, Action.PASSTHROUGH, "channel_not_windowed", None),
        ("rcs", MEDIA, CLOSED, Action.PASSTHROUGH, "channel_not_windowed", None),
    ],
)
def test_decide(channel, content, window, action, reason, code):
    decision = decide(channel, content, window)
    assert (decision.action, decision.reason, decision.code) == (action, reason, code)


def test_content_type_of():
    assert content_type_of("hi", [], None) == TEXT
    assert content_type_of("hi", ["https://x/y.png"], None) == MEDIA
    assert content_type_of(None, ["https://x/y.png"], None) == MEDIA
    assert content_type_of("hi", [], "HX" + "0" * 32) is None
