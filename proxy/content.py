"""Resolve a ContentSid to the type WhatsApp receives, its buttons and its approval, cached with a TTL."""

from __future__ import annotations

import json
import re
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterator, Mapping
from urllib.parse import urlsplit

from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError
from twilio.http.http_client import TwilioHttpClient

from . import logs
from .cooperative import within
from .db import content_cache, storable, utcnow, writing
from .rules import NOT_ON_WHATSAPP, TABLE, WHATSAPP_COMPLEXITY
from .store import _insert

CONTENT_SID = re.compile(r"^HX[0-9a-fA-F]{32}\Z")  # \Z: `$` also accepts a trailing newline


class ContentNotFound(LookupError):
    """The Content API does not know this sid (Twilio's 21655)."""


class ContentUnavailable(RuntimeError):
    """The Content API could not be asked; the proxy fails closed rather than guess. `lasting`: until the operator
    acts (the proxy's credentials refused), not a passing outage."""

    def __init__(self, detail: str, *, lasting: bool = False):
        super().__init__(detail)
        self.lasting = lasting


@dataclass(frozen=True)
class Content:
    sid: str
    types: Mapping[str, Any]
    approval: str  # WhatsApp approval status, lower case; "unsubmitted" when none was requested
    friendly_name: str | None = None

    @property
    def delivered_type(self) -> str | None:
        return delivered_type(self.types)

    @property
    def buttons(self) -> tuple[str, ...]:
        return buttons_of(self.types, self.delivered_type)


def delivered_type(types: Mapping[str, Any]) -> str | None:
    """The most complex type WhatsApp supports among those present; Twilio sends that one.

    A type the rule table does not know may be what Twilio sends (new types are the rich ones), so it
    wins and is judged as rules.UNKNOWN_TYPE rather than being skipped.
    """
    # Every type in Twilio's schema is nullable: a type given as null is not there (an approved text template
    # with `"twilio/location": null` was judged as a location, and blocked outside the window).
    present = [t for t, body in types.items() if body is not None and t not in NOT_ON_WHATSAPP]
    unknown = sorted(t for t in present if t not in TABLE)
    if unknown:
        return unknown[0]
    if not present:
        return None
    return max(present, key=WHATSAPP_COMPLEXITY.index)


def buttons_of(types: Mapping[str, Any], content_type: str | None) -> tuple[str, ...]:
    body = types.get(content_type or "") or {}
    actions = body.get("actions") if isinstance(body, Mapping) else None
    if actions is None:
        return ()
    if not isinstance(actions, list):  # buttons the proxy cannot read: never taken for none (fail closed)
        return ("MALFORMED",)
    # An action that is not an object is no button type WhatsApp allows unapproved: count it, never drop it.
    return tuple(str(a.get("type", "")).strip().upper() if isinstance(a, Mapping) else "MALFORMED" for a in actions)


def approval_status(approval: Mapping[str, Any] | None) -> str:
    """WhatsApp status from an ApprovalRequests body, nested ({"whatsapp": {...}}) or flat."""
    if not isinstance(approval, Mapping):
        return "unsubmitted"
    inner = approval.get("whatsapp", approval)
    if not isinstance(inner, Mapping):
        return "unsubmitted"
    channel = inner.get("type")
    if isinstance(channel, str) and channel.strip() and channel.strip().lower() != "whatsapp":
        return "unsubmitted"  # another channel's approval (flat shape, or misfiled) is not WhatsApp's
    status = inner.get("status")
    # Cut to its column (content_cache, send_attempts): a status this release does not know is not approval.
    return (storable(str(status).strip().lower(), 32) or "unsubmitted") if status else "unsubmitted"


def content_of(item: Any, approval: str, sid: str | None = None) -> Content:
    """A Content API object as the proxy keeps it; ContentUnavailable when it is not shaped like one."""
    sid = sid or (item.get("sid") if isinstance(item, Mapping) else None)
    types = item.get("types") if isinstance(item, Mapping) else None
    if not isinstance(sid, str) or not isinstance(types, (Mapping, type(None))):
        raise ContentUnavailable("Content API answered with a Content that has no sid or no types object")
    name = item.get("friendly_name")
    return Content(sid, dict(types or {}), approval, storable(name, 256) if isinstance(name, str) else None)


class _Lookup:
    """One Content API lookup in flight; requests for the same sid wait for its answer."""

    __slots__ = ("done", "content", "error")

    def __init__(self):
        self.done = threading.Event()
        self.content: Content | None = None
        self.error: BaseException | None = None


class ContentResolver:
    """Content API lookups behind a per-process and a database cache, both with one TTL."""

    def __init__(self, http: TwilioHttpClient, base_url: str, auth: tuple[str, str], engine: Engine, ttl: int):
        self.http, self.base_url, self.auth, self.engine, self.ttl = http, base_url.rstrip("/"), auth, engine, ttl
        self.list_page_size = 500
        self._memory: dict[str, tuple[float, Content]] = {}
        self._lookups: dict[str, _Lookup] = {}
        self._lock = threading.Lock()

    def get(self, sid: str) -> Content:
        hit = self._memory.get(sid)
        if hit and hit[0] > time.monotonic():
            return hit[1]
        # One lookup per sid at a time: a new template used by many sends at once is asked for once,
        # and a Content API that is down costs the waiting sends one timeout, not one each.
        with self._lock:
            lookup = self._lookups.get(sid)
            leads = lookup is None
            if leads:
                lookup = self._lookups[sid] = _Lookup()
        if not leads:
            lookup.done.wait()
            if lookup.error is not None:
                raise lookup.error
            return lookup.content
        try:
            lookup.content = self._lookup(sid)
            return lookup.content
        except BaseException as exc:
            lookup.error = exc
            raise
        finally:
            with self._lock:
                self._lookups.pop(sid, None)
            lookup.done.set()

    def _lookup(self, sid: str) -> Content:
        cached = self._from_database(sid)
        if cached is not None:
            content, age = cached
        else:
            content, age = self._fetch(sid), 0.0
        # Trusted for what is left of its TTL, not a fresh one: another process's row may be almost as
        # old as the TTL, and an approval revoked since must not be trusted twice as long.
        with self._lock:
            self._memory[sid] = (time.monotonic() + self.ttl - age, content)
        return content

    def _from_database(self, sid: str) -> tuple[Content, float] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(content_cache).where(content_cache.c.sid == sid)).mappings().first()
        if row is None:
            return None
        age = (utcnow() - row["fetched_at"]).total_seconds()
        if not 0 <= age < self.ttl:
            return None
        return Content(sid, json.loads(row["types"]), row["approval_status"], row["friendly_name"]), age

    def _fetch(self, sid: str) -> Content:
        found = self._get_json(f"/v1/Content/{sid}")
        if found is None:
            raise ContentNotFound(sid)
        approval = self._get_json(f"/v1/Content/{sid}/ApprovalRequests")
        resolved = content_of(found, approval_status(approval), sid)
        try:
            self.save([resolved], utcnow())
        except SQLAlchemyError as exc:
            # The answer is good; only its copy for the other processes was not kept. Not an outage
            # of the judging (FAIL_OPEN must not send unjudged because a cache row failed).
            logs.log.warning("content_cache_write_failed", extra={"content_sid": sid, "error": type(exc).__name__})
        return resolved

    def save(self, contents: list[Content], fetched_at: datetime) -> None:
        with writing(self.engine) as conn:
            for c in contents:
                stmt = _insert(conn, content_cache).values(
                    sid=c.sid, types=json.dumps(c.types), approval_status=c.approval,
                    friendly_name=c.friendly_name, fetched_at=fetched_at,
                )
                conn.execute(stmt.on_conflict_do_update(
                    index_elements=["sid"],
                    set_={k: stmt.excluded[k] for k in ("types", "approval_status", "friendly_name", "fetched_at")},
                ))
        with self._lock:
            for c in contents:
                self._memory.pop(c.sid, None)

    def list_all(self) -> Iterator[Content]:
        """Every Content with its approval, following /v1/ContentAndApprovals pages."""
        url = f"{self.base_url}/v1/ContentAndApprovals?PageSize={self.list_page_size}"
        while url:
            page = self._get_json_url(url)
            if page is None:
                raise ContentUnavailable("ContentAndApprovals answered 404")
            items = page.get("contents") or []
            if not isinstance(items, list):
                raise ContentUnavailable("ContentAndApprovals answered without a list of contents")
            for item in items:
                approval = approval_status(item.get("approval_requests") if isinstance(item, Mapping) else None)
                yield content_of(item, approval)
            meta = page.get("meta")
            following = meta.get("next_page_url") if isinstance(meta, Mapping) else None
            url = self._same_host(following if isinstance(following, str) else None)

    def _same_host(self, url: str | None) -> str | None:
        # Credentials only ever go to the configured Content API host, whatever a page links to.
        if not url or url.startswith(self.base_url + "/"):
            return url
        parts = urlsplit(url)
        return f"{self.base_url}{parts.path}?{parts.query}" if parts.query else f"{self.base_url}{parts.path}"

    def refresh_all(self) -> int:
        contents = list(self.list_all())
        self.save(contents, utcnow())
        return len(contents)

    def _get_json(self, path: str) -> dict | None:
        return self._get_json_url(self.base_url + path)

    def _get_json_url(self, url: str) -> dict | None:
        limit = getattr(self.http, "timeout", None) or 0
        try:
            # The client's timeout bounds each read: the whole call is bounded too, as a create's (proxy/upstream.py).
            with within(limit, lambda: ContentUnavailable(f"Content API did not answer within {limit:g}s")) \
                    if limit else nullcontext():
                response = self.http.request("GET", url, auth=self.auth, headers={"Accept": "application/json"})
        except ContentUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 — any transport failure means "cannot know"
            raise ContentUnavailable(f"Content API unreachable ({type(exc).__name__})") from exc
        if response.status_code == 404:
            return None
        if response.status_code in (401, 403):
            # Not a passing outage: no retry helps until the operator fixes the proxy's own credentials.
            raise ContentUnavailable(f"Content API answered {response.status_code}: it refused the proxy's "
                                     "TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN", lasting=True)
        if response.status_code != 200:
            raise ContentUnavailable(f"Content API answered {response.status_code}")
        try:
            body = json.loads(response.text)
        except ValueError as exc:
            raise ContentUnavailable("Content API answered with invalid JSON") from exc
        if not isinstance(body, dict):
            raise ContentUnavailable("Content API answered with JSON that is not an object")
        return body
