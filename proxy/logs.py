"""JSON logging to stdout: one line per decision, with numbers masked and no secrets or bodies."""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter

from .addresses import mask

log = logging.getLogger("proxy")

# Fields holding an address; masked unless LOG_REDACT_NUMBERS=false.
ADDRESS_FIELDS = ("sender", "user", "from", "to")


def make_formatter() -> logging.Formatter:
    return JsonFormatter(
        "{asctime}{levelname}{name}{message}",
        style="{",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger", "message": "event"},
        datefmt="%Y-%m-%dT%H:%M:%S%z",
    )


def configure(level: str) -> None:
    """Install the stdout JSON handler once per process (create_app may run many times in tests)."""
    if not any(getattr(h, "_proxy_handler", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(make_formatter())
        handler._proxy_handler = True
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(level)
    # twilio-python's client logs every request at INFO, query strings included.
    logging.getLogger("twilio.http_client").setLevel(logging.WARNING)


def event(name: str, *, redact: bool, level: int = logging.INFO, **fields) -> None:
    if redact:
        for key in ADDRESS_FIELDS:
            if fields.get(key):
                fields[key] = mask(fields[key])
    log.log(level, name, extra=fields)
