"""Operations endpoints: liveness, readiness (database reachable, migrations at head), Prometheus metrics."""

from __future__ import annotations

import hmac

from flask import Blueprint, Response, request
from sqlalchemy.exc import SQLAlchemyError

from .auth import from_another_site, require_basic_auth
from .migrate import current_revision, known_revision
from .metrics import exposition
from .runtime import runtime

bp = Blueprint("ops", __name__)


@bp.get("/healthz")
def healthz():
    """The process is alive and serving; says nothing about its dependencies."""
    return {"status": "ok"}


@bp.get("/readyz")
def readyz():
    rt = runtime()
    try:
        with rt.engine.connect() as conn:
            current = current_revision(conn)
    except SQLAlchemyError as exc:
        return {"status": "unavailable", "reason": "database_unreachable", "error": type(exc).__name__}, 503
    if current == rt.migrations_head:
        return {"status": "ok", "database_revision": current}
    if current is not None and not known_revision(current):
        # A newer release's migrations ran first (its release phase, before its instances are up): this one serves
        # on, as the gateway does (migrate.HeadCheck). Unready, every old instance left the load balancer at once.
        return {"status": "ok", "database_revision": current, "code_revision": rt.migrations_head,
                "detail": "the database is ahead of this code: a newer release has migrated it"}
    return {"status": "unavailable", "reason": "migrations_not_at_head", "database_revision": current,
            "code_revision": rt.migrations_head}, 503


# No automatic OPTIONS: Flask would answer it 200 before the view checks the credentials.
@bp.get("/metrics", provide_automatic_options=False)
def metrics():
    token = runtime().settings.metrics_token
    bearer = request.headers.get("Authorization", "")
    if from_another_site():  # refused before any credentials, the Bearer token's too, as README says
        return require_basic_auth()
    if not (token and bearer.startswith("Bearer ") and hmac.compare_digest(bearer[7:].encode(), token.encode())):
        denied = require_basic_auth()
        if denied is not None:
            return denied
    body, content_type = exposition(runtime().engine)
    return Response(body, content_type=content_type)
