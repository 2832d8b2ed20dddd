"""What one app instance holds for its lifetime: settings, engine, upstream client, validator."""

from __future__ import annotations

from dataclasses import dataclass

from flask import current_app
from sqlalchemy import Engine
from twilio.request_validator import RequestValidator

from .attempts import AttemptWriter
from .content import ContentResolver
from .forwarding import Forwarder
from .group_commit import GroupCommit
from .migrate import HeadCheck
from .settings import Settings
from .upstream import Upstream


@dataclass(frozen=True)
class Runtime:
    settings: Settings
    engine: Engine
    # The same pool in autocommit, for single-SELECT reads: no BEGIN before and no ROLLBACK after the
    # query (on PostgreSQL two of a window lookup's three round trips; 2.0 -> 1.3 ms measured here).
    reader: Engine
    upstream: Upstream
    validator: RequestValidator
    previous_validator: RequestValidator | None  # TWILIO_AUTH_TOKEN_PREVIOUS, during a token rotation
    content: ContentResolver
    migrations_head: str
    schema: HeadCheck  # a send is refused while the database is behind this code's migrations
    forwarder: Forwarder
    attempts: AttemptWriter
    shared_writes: GroupCommit  # concurrent webhooks' writes committed together


def runtime() -> Runtime:
    return current_app.extensions["proxy"]
