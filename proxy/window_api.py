"""Window queries shared by the admin API and the CLI: one pair's state, and the windows closing soon."""

from __future__ import annotations

import base64
import re
from datetime import datetime, timedelta, timezone

from . import store
from .addresses import SERVICE_SID, WINDOWED_CHANNELS, InvalidAddress, as_sent, channel_of, is_bsuid, normalise
from .db import utcnow
from .errors import ApiError
from .runtime import Runtime
from .windows import CLOSED, window_state

_ROW_ID = re.compile(r"[0-9]{1,19}")
_MAX_ROW_ID = 2**63 - 1  # BIGINT; a larger id cannot even be bound as a parameter on SQLite


def address_key(value: str | None, *, sender: bool = False, windowed: bool = False) -> str | None:
    """An address as windows are keyed: normalised, or (a `sender` only) a Messaging Service SID; with `windowed`,
    one of a channel without windows (nothing is ever held for it) refused."""
    if not value or not value.strip():
        return None
    if sender and SERVICE_SID.fullmatch(value.strip()):  # not any "MG…": that passed unchecked, control bytes too
        return value.strip()
    try:
        key = normalise(value)
    except InvalidAddress as exc:
        # A user's window a webhook opened under an address the proxy does not recognise; a business sender is a
        # number (or a service): a mistyped one answered "closed" as if it were real.
        kept = None if sender else as_sent(value)
        if kept is None:
            raise ApiError(21211, 400, f"Invalid address: {exc}") from None
        return kept
    if sender and is_bsuid(key):
        raise ApiError(21211, 400, "Invalid address: a WhatsApp user's id (a BSUID) is never a business sender")
    return windowed_only(key) if windowed else key


def windowed_only(key: str) -> str:
    if not SERVICE_SID.fullmatch(key) and channel_of(key) not in WINDOWED_CHANNELS:
        # A bare +1415… is an SMS address, for which nothing is ever held: a filter by it found nothing, silently,
        # where the WhatsApp address it was meant for has held messages.
        raise ApiError(21211, 400, f"Invalid address: nothing is held for {key} (messages are held only for WhatsApp "
                                   "and Messenger): give the WhatsApp or Messenger address, e.g. whatsapp:+14155550111")
    return key


def window_key(sender: str | None, user: str | None) -> tuple[str, str]:
    sender_key, user_key = address_key(sender, sender=True), address_key(user)
    if not sender_key or not user_key:
        raise ApiError(400, 400, "Both sender and user are required, e.g. sender=whatsapp:+14155550100&"
                                 "user=whatsapp:+14155550111")
    channels = {channel_of(key) for key in (sender_key, user_key) if not SERVICE_SID.fullmatch(key)}
    if len(channels) > 1:
        # A window is one channel's: whatsapp:+1415… and +1415… are two conversations, and asking for the mixed
        # pair answered "closed" however open the WhatsApp one was.
        raise ApiError(400, 400, f"sender and user are on different channels ({sender_key} and {user_key}): "
                                 "give both with the same prefix, e.g. whatsapp:")
    return sender_key, user_key


def show(rt: Runtime, sender: str | None, user: str | None) -> dict:
    sender, user = window_key(sender, user)
    with rt.engine.connect() as conn:
        # As the gateway judges a send: a Messaging Service's by the number it sends to this user from, if known.
        found = store.window_for(conn, sender, user)
    row = found.row
    state = window_state(row.expires_at, row.last_inbound_at, now=utcnow(),
                         safety_margin_seconds=rt.settings.window_safety_margin_seconds) if row else CLOSED
    return {"sender": sender, "user": user, **state.as_json(), "profile_name": found.profile_name,
            "sticky_sender": found.sender if found.sender != sender else None}


def expiring(rt: Runtime, within_seconds: int, page_size: int, page_token: str | None) -> dict:
    now = utcnow()
    margin = rt.settings.window_safety_margin_seconds
    with rt.engine.connect() as conn:
        rows = store.expiring_windows(conn, usable_after=now, usable_before=now + timedelta(seconds=within_seconds),
                                      margin_seconds=margin, limit=page_size + 1, after=_decode(page_token))
    items = [{"sender": r.sender, "user": r.user, "profile_name": r.profile_name,
              **window_state(r.expires_at, r.last_inbound_at, now=now, safety_margin_seconds=margin).as_json()}
             for r in rows[:page_size]]
    more = len(rows) > page_size
    token = _encode(rows[page_size - 1].expires_at, rows[page_size - 1].id) if more else None
    return {"windows": items, "meta": {"page_size": page_size, "within": within_seconds, "next_page_token": token}}


def _encode(at: datetime, row_id: int) -> str:
    return base64.urlsafe_b64encode(f"{at.isoformat()}|{row_id}".encode()).decode()


def _decode(token: str | None) -> tuple[datetime, int] | None:
    if not token:
        return None
    try:
        at, row_id = base64.urlsafe_b64decode(token.encode()).decode().split("|")
        if not _ROW_ID.fullmatch(row_id) or not 0 < int(row_id) <= _MAX_ROW_ID:
            raise ValueError("token id out of range")
        when = datetime.fromisoformat(at)
        if when.tzinfo is None:
            raise ValueError("token time without a zone")
        # Converted here: year 1 or 9999 shifted out of range by its offset fails now, not in the database.
        return when.astimezone(timezone.utc), int(row_id)
    except (ValueError, UnicodeDecodeError, OverflowError):
        raise ApiError(400, 400, "PageToken is not one this API handed out.") from None
