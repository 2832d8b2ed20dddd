"""JSON logging to stdout: one line per decision, with numbers masked and no secrets or bodies."""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from urllib.parse import unquote, urlsplit

from pythonjsonlogger.json import JsonFormatter

from .addresses import mask

log = logging.getLogger("proxy")

# Fields holding an address; masked unless LOG_REDACT_NUMBERS=false.
ADDRESS_FIELDS = ("sender", "user", "from", "to", "window_sender")
_stream: _Lines | None = None


class _JsonLine(JsonFormatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        # UTC with milliseconds (2026-11-26T17:24:24.123Z), whatever the host's TZ: lines of several hosts and
        # processes sort by it, and whole seconds could not order two lines of one request.
        whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{whole}.{int(record.msecs):03d}Z"


def make_formatter() -> logging.Formatter:
    return _JsonLine(
        "{asctime}{levelname}{name}{message}",
        style="{",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger", "message": "event"},
    )


class TextFormatter(logging.Formatter):
    """LOG_FORMAT=text, for a human at a terminal: the JSON line's fields as key=value."""

    _standard = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        # Values as repr() when they hold a control character: a path with %0D in it must not draw a line of its own.
        extras = " ".join(f"{k}={_shown(v)}" for k, v in vars(record).items()
                          if k not in self._standard and v is not None)
        return f"{line} {extras}" if extras else line


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _shown(value) -> str:
    text = str(value)
    return repr(text) if _CONTROL.search(text) else text


class _Lines(logging.StreamHandler):
    """Each record becomes one line, written with one write(2) by the thread that logged it.

    Measured on the way here (bench/README.md): logging.Handler.handle formats under the handler's
    lock, where 28 of 64 gateway threads waited; a QueueHandler instead woke a listener thread for
    every record, and that hand-off cost ~0.3 ms of CPU per request, more than the line itself.
    Here the line is formatted without a lock, and only its write(2) holds the handler's lock.
    """

    def __init__(self, stream):
        super().__init__(stream)
        try:
            self._fd: int | None = stream.fileno()
        except (AttributeError, OSError, ValueError):  # a stream without a descriptor (pytest capture)
            self._fd = None

    def handle(self, record: logging.LogRecord) -> bool:
        if not self.filter(record):
            return False
        if self._fd is None:
            return super().handle(record)
        try:
            data = (self.format(record) + "\n").encode("utf-8", "backslashreplace")
            # Only the write holds the lock: a line longer than a pipe's atomic size (a traceback)
            # is written in pieces, and another thread's line must not land between them.
            with self.lock:
                self._write(data)
        except Exception:  # noqa: BLE001 — logging must never break a request
            self.handleError(record)
        return True

    def _write(self, data: bytes) -> None:
        written = 0
        try:
            while written < len(data):
                written += os.write(self._fd, data[written:])
        except OSError:
            if written:  # end the torn line, so the next record starts a line of its own
                os.write(self._fd, b"\n")
            raise


def configure(level: str, fmt: str = "json", stream=None) -> None:
    """Install the handler writing to `stream` (stdout by default) once per process (create_app may run many
    times in tests)."""
    global _stream
    handler = next((h for h in log.handlers if getattr(h, "_proxy_handler", False)), None)
    if handler is None:
        _stream = _Lines(stream or sys.stdout)
        _stream._proxy_handler = True
        log.addHandler(_stream)
        log.propagate = False
    _stream.setFormatter(make_formatter() if fmt == "json" else
                         TextFormatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    log.setLevel(level)
    # twilio-python's client logs every request at INFO, query strings included.
    logging.getLogger("twilio.http_client").setLevel(logging.WARNING)


def output_formatter() -> logging.Formatter | None:
    """The formatter stdout lines are written with (JSON, or LOG_FORMAT=text)."""
    return _stream.formatter if _stream else None


# A phone number inside free text (Twilio's error messages quote the `To` they refused), punctuated or not.
_NUMBER_IN_TEXT = re.compile(r"\+?\d[\d\s\-().]{5,}\d")


def mask_numbers(text: str) -> str:
    """`text` with every phone-number-like run masked the way address fields are."""
    return _NUMBER_IN_TEXT.sub(lambda found: mask(found.group()), text)


# A phone number in a path (Lookup-style `/PhoneNumbers/+14155550111`, spaced or punctuated once the
# %-escapes are decoded); digits inside a SID are not one, and neither is the API version.
_NUMBER_IN_PATH = re.compile(r"(?<![A-Za-z0-9])\+?[0-9][0-9 ().\-]{5,}[0-9](?![A-Za-z0-9])")
_API_VERSION = "2010-04-01"


def masked_path(path: str) -> str:
    """A request path as logged: every phone number in it masked (a refused request's too)."""
    return _NUMBER_IN_PATH.sub(lambda found: found.group() if found.group() == _API_VERSION else mask(found.group()),
                               path)


MAX_LOGGED_URL = 512  # the host part is the caller's Host header, unless PUBLIC_BASE_URL is set


def masked_url(url: str) -> str:
    """A URL as logged (the one a webhook's signature was checked against): scheme, host and port as they are,
    so a PUBLIC_BASE_URL mistake shows; phone numbers in the path masked; of the query only its names (a value
    may be a token or a number), an item without a name masked whole; never a user:password@."""
    parts = urlsplit(url)
    shown = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{_masked_as_sent(parts.path)}"
    if parts.query:
        # An item without `=` may be a bare token (`?s3cr3t`): masked too.
        shown += "?" + "&".join(_masked_as_sent(name) + "=…" if sep else "…" if name else ""
                                for name, sep, _ in (item.partition("=") for item in parts.query.split("&")))
    return shown[:MAX_LOGGED_URL]


def _masked_as_sent(text: str) -> str:
    """`text` with its %-escapes kept (they are part of what was signed), unless they hid a phone number: then
    decoded, and the number masked."""
    decoded = unquote(text)
    masked = masked_path(decoded)
    return masked_path(text) if masked == decoded else masked


def database_in_use(process: str, settings) -> None:
    """One line at the start of a long-running process (`web`, `worker`): the database it uses, and whether
    that is the default because DATABASE_URL is unset (a worker polling the wrong file said nothing)."""
    from .settings import database_shown

    fields = {"process_type": process, "database": database_shown(settings.database_url),
              "database_default": settings.database_is_default}
    if settings.database_is_default:
        fields["detail"] = "DATABASE_URL is unset: a SQLite file in ./instance/, for a single instance only"
    log.info("database_in_use", extra=fields)


def event(name: str, *, redact: bool, level: int = logging.INFO, **fields) -> None:
    if redact:
        for key in ADDRESS_FIELDS:
            if fields.get(key):
                fields[key] = mask(fields[key])
    log.log(level, name, extra=fields)
