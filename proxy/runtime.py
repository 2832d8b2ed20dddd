"""What one app instance holds for its lifetime: settings, engine, upstream client, validator."""

from __future__ import annotations

from dataclasses import dataclass

from flask import current_app
from sqlalchemy import Engine
from twilio.request_validator import RequestValidator

from .attempts import AttemptWriter
from .content import ContentResolver
from .forwarding import Forwarder
from .settings import Settings
from .upstream import Upstream


@dataclass(frozen=True)
class Runtime:
    settings: Settings
    engine: Engine
    upstream: Upstream
    validator: RequestValidator
    content: ContentResolver
    migrations_head: str
    forwarder: Forwarder
    attempts: AttemptWriter


def runtime() -> Runtime:
    return current_app.extensions["proxy"]
