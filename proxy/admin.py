"""The proxy's own API under /v1 (same Basic auth as the gateway): preflight, windows, held messages."""

from __future__ import annotations

import re
from urllib.parse import urlencode

from flask import Blueprint, g, request

from . import holds, logs, window_api
from .auth import require_basic_auth
from .db import utcnow, writing
from .errors import ApiError
from .gateway import create_form
from .judge import judge, sticky_note
from .policy import Action, explain
from .runtime import runtime

bp = Blueprint("admin", __name__, url_prefix="/v1")
# No automatic OPTIONS on its routes: Flask answered it with an empty HTML 200; it is a Twilio-shaped 405 after the
# credentials (proxy/__init__.py), as on the gateway.
bp.before_request(require_basic_auth)

_DIGITS = re.compile(r"[0-9]{1,19}")  # PageToken's bound, 2**63 - 1, has 19; int() refuses past 4300


@bp.post("/preflight", provide_automatic_options=False)
def preflight():
    """Judge a Messages create form without sending anything; a block is an answer here, not an error."""
    rt = runtime()
    _, form = create_form()  # the body as the gateway reads it: what it would refuse is refused here too
    judgement = judge(rt, form)
    decision = judgement.decision
    logs.event("preflight", redact=rt.settings.log_redact_numbers, decision=decision.action.value,
               reason=decision.reason, code=decision.code, content_type=judgement.send.content_type,
               sender=judgement.sender, user=judgement.user,
               window_sender=judgement.window_sender if judgement.window_sender != judgement.sender else None,
               request_id=g.request_id)
    return {
        "decision": decision.action.value,
        "reason": decision.reason,
        "code": decision.code,
        "message": explain(decision, judgement.send, judgement.window, judgement.judged_at) + sticky_note(judgement)
        if decision.action in (Action.BLOCKED, Action.REROUTED) else None,
        "channel": judgement.channel,
        "sender": judgement.sender,
        "user": judgement.user,
        "content_sid": judgement.content_sid,
        "content_type": judgement.send.content_type,
        "approval_status": judgement.send.approval,
        "buttons": list(judgement.send.buttons),
        "fallback_content_sid": judgement.fallback.content_sid if judgement.fallback else None,
        "judged_at": judgement.judged_at.isoformat().replace("+00:00", "Z"),
        "window": judgement.window.as_json(),
        # A Messaging Service's window is the one of the number it sends to this user from, once known.
        "sticky_sender": judgement.window_sender if judgement.window_sender != judgement.sender else None,
    }


@bp.get("/windows", provide_automatic_options=False)
def window():
    """One pair's window: GET /v1/windows?sender=whatsapp:+1415…&user=whatsapp:+1415…"""
    return window_api.show(runtime(), request.args.get("sender"), request.args.get("user"))


@bp.get("/windows/expiring", provide_automatic_options=False)
def expiring():
    """Windows that close within `within` seconds, soonest first, so an app can nudge the user in time."""
    within = _int_arg("within", 3600, 1, 7 * 86400)
    page_size = _int_arg("PageSize", 50, 1, 1000)
    result = window_api.expiring(runtime(), within, page_size, request.args.get("PageToken"))
    token = result["meta"]["next_page_token"]
    result["meta"]["next_page_url"] = (
        f"{request.path}?within={within}&PageSize={page_size}&PageToken={token}" if token else None
    )
    return result


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name, "").strip()
    if not raw:
        return default
    # int() alone also reads `1_000`, `+5` and the digits of other scripts.
    value = int(raw) if _DIGITS.fullmatch(raw) else None
    if value is None or not low <= value <= high:
        raise ApiError(400, 400, f"{name} must be a whole number from {low} to {high}.")
    return value


@bp.get("/held", provide_automatic_options=False)
def held():
    """Held messages (default: still held), optionally for one sender and/or user."""
    status = request.args.get("status", holds.HELD)
    if status not in (*holds.STATUSES, "all"):
        raise ApiError(400, 400, f"status must be {', '.join(holds.STATUSES)} or all.")
    sender = window_api.address_key(request.args.get("sender"), sender=True, windowed=True)
    user = window_api.address_key(request.args.get("user"), windowed=True)
    page_size = _int_arg("PageSize", 100, 1, 1000)
    after = _int_arg("PageToken", 0, 0, 2**63 - 1)  # the last id of the page before: a keyset, not an offset
    with runtime().engine.connect() as conn:
        rows = holds.listing(conn, sender=sender, user=user, status=None if status == "all" else status,
                             limit=page_size + 1, after_id=after)
    # One more than the page asked to tell whether there is a next page: the list was cut off silently at 100.
    token = str(rows[page_size - 1]["id"]) if len(rows) > page_size else None
    query = {name: request.args[name] for name in ("status", "sender", "user") if request.args.get(name)}
    return {"held": [_held_json(r) for r in rows[:page_size]],
            "meta": {"page_size": page_size, "next_page_token": token,
                     "next_page_url": f"{request.path}?{urlencode({**query, 'PageSize': page_size, 'PageToken': token})}"
                     if token else None}}


def _held_id(raw: str) -> int:
    """The id in the path as X-Proxy-Held-Id gave it: ASCII digits, no leading zero, at most 2**63 - 1. Flask's
    int converter took other scripts' digits (`١` for 1) and leading zeros, and an id past the column's range
    was a 500."""
    if not (_DIGITS.fullmatch(raw) and raw[0] != "0" and int(raw) <= 2**63 - 1):
        raise ApiError(20404, 404, f"No held message {raw[:40]!r}.")
    return int(raw)


@bp.get("/held/<held_id>", provide_automatic_options=False)
def held_message(held_id: str):
    """One held message, by the id its send was answered with (X-Proxy-Held-Id)."""
    held_id = _held_id(held_id)
    with runtime().engine.connect() as conn:
        row = holds.one(conn, held_id)
    if row is None:
        raise ApiError(20404, 404, f"No held message {held_id}.")
    return _held_json(row)


@bp.delete("/held/<held_id>", provide_automatic_options=False)
def cancel_held(held_id: str):
    """Withdraw a held message before the user's next message releases it (an order canceled, an opt-out)."""
    held_id, rt = _held_id(held_id), runtime()
    with writing(rt.engine) as conn:
        row, canceled = holds.cancel(conn, held_id, utcnow())
    if canceled:  # a DELETE repeated is answered alike, and logged once
        logs.event("hold_canceled", redact=rt.settings.log_redact_numbers, held_id=held_id, sender=row["sender"],
                   user=row["user"], request_id=g.request_id)
    return "", 204


def _held_json(row) -> dict:
    out = dict(row)
    for key in ("created_at", "expires_at", "released_at"):
        out[key] = out[key].isoformat().replace("+00:00", "Z") if out[key] else None
    return out
