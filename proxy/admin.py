"""The proxy's own API under /v1 (same Basic auth as the gateway): preflight."""

from __future__ import annotations

from flask import Blueprint, g, request

from . import logs
from .auth import require_basic_auth
from .judge import judge
from .policy import Action, explain
from .runtime import runtime

bp = Blueprint("admin", __name__, url_prefix="/v1")
bp.before_request(require_basic_auth)


@bp.post("/preflight")
def preflight():
    """Judge a Messages create form without sending anything; a block is an answer here, not an error."""
    rt = runtime()
    judgement = judge(rt, request.form)
    decision = judgement.decision
    logs.event("preflight", redact=rt.settings.log_redact_numbers, decision=decision.action.value,
               reason=decision.reason, code=decision.code, content_type=judgement.send.content_type,
               sender=judgement.sender, user=judgement.user, request_id=g.request_id)
    return {
        "decision": decision.action.value,
        "reason": decision.reason,
        "code": decision.code,
        "message": explain(decision, judgement.send, judgement.window)
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
    }
