"""Who may call the gateway and the admin API: HTTP Basic with the account SID and auth token,
or with an API key (SK sid and secret) listed in TWILIO_API_KEYS, as twilio-python sends them."""

from __future__ import annotations

import hmac

from flask import g, request

from . import logs
from .errors import twilio_error
from .runtime import runtime


def credentials_match(username: str | None, password: str | None) -> bool:
    settings = runtime().settings
    username, password = (username or "").encode(), (password or "").encode()
    key_secret = settings.api_keys.get(username.decode(errors="replace"))
    if key_secret is not None:
        # An API key's sid is not a secret; its secret is compared in constant time.
        return hmac.compare_digest(password, key_secret.encode())
    # Every comparison always runs, in constant time, so timing reveals no part.
    user_ok = hmac.compare_digest(username, settings.account_sid.encode())
    password_ok = hmac.compare_digest(password, settings.auth_token.encode())
    # During a rotation the callers' clients change tokens one by one: the one being replaced still works.
    previous_ok = hmac.compare_digest(password, (settings.previous_auth_token or settings.auth_token).encode())
    return user_ok & (password_ok | previous_ok)


def from_another_site() -> bool:
    """A browser's request made by another site's page: it would carry Basic credentials the browser cached
    for the proxy (an operator once opened /metrics or /v1), and a form POST needs no CORS preflight.
    twilio-python, curl and Twilio's own clients send neither header."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None:
        return site.strip().lower() not in ("same-origin", "none")
    origin = request.headers.get("Origin")  # browsers before Sec-Fetch-*: an Origin not this host's
    return origin is not None and origin.partition("://")[2].rstrip("/").lower() != request.host.lower()


def require_basic_auth():
    """A before_request hook: 401 with Twilio's 20003 body unless the caller holds the credentials; 403 for
    a browser request another site made (from_another_site), whatever credentials it carries."""
    if from_another_site():
        logs.event("auth_failed", redact=True, level=30, path=logs.masked_path(request.path), reason="cross_site",
                   remote_addr=request.remote_addr, request_id=g.request_id)
        return twilio_error(20403, 403, "Requests from another site's page are refused: the proxy's API is not "
                                        "for browsers.")
    try:
        auth = request.authorization
    except ValueError:  # werkzeug lets through the one base64 raises for a header that is not ASCII
        auth = None
    if auth is None or auth.type != "basic" or not credentials_match(auth.username, auth.password):
        # remote_addr: the peer (behind a load balancer, the balancer); nothing of what the caller sent.
        logs.event("auth_failed", redact=True, level=30, path=logs.masked_path(request.path),
                   remote_addr=request.remote_addr, request_id=g.request_id)
        return twilio_error(20003, 401)
    return None
