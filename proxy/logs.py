"""JSON logging to stdout: one line per decision, with numbers masked and no secrets or bodies."""

from __future__ import annotations

import atexit
import logging
import queue
import sys
from logging.handlers import QueueHandler, QueueListener

from pythonjsonlogger.json import JsonFormatter

from .addresses import mask

log = logging.getLogger("proxy")

# Fields holding an address; masked unless LOG_REDACT_NUMBERS=false.
ADDRESS_FIELDS = ("sender", "user", "from", "to")
_stream: logging.StreamHandler | None = None


def make_formatter() -> logging.Formatter:
    return JsonFormatter(
        "{asctime}{levelname}{name}{message}",
        style="{",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger", "message": "event"},
        datefmt="%Y-%m-%dT%H:%M:%S%z",
    )


class TextFormatter(logging.Formatter):
    """LOG_FORMAT=text, for a human at a terminal: the JSON line's fields as key=value."""

    _standard = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = " ".join(f"{k}={v}" for k, v in vars(record).items() if k not in self._standard and v is not None)
        return f"{line} {extras}" if extras else line


class _Enqueue(QueueHandler):
    """Hand the record to the listener thread as it is: no lock, no formatting in the request thread.

    logging.Handler.handle holds the handler's lock while formatting; under 64 request threads
    that lock was where a third of them waited (py-spy, bench/README.md). The records carry only
    plain values, so formatting them later in the listener gives the same line.
    """

    def handle(self, record: logging.LogRecord) -> bool:
        if self.filter(record):
            self.enqueue(record)
            return True
        return False


def configure(level: str, fmt: str = "json") -> None:
    """Install the stdout handler once per process (create_app may run many times in tests).

    Request threads only enqueue; one listener thread formats and writes to stdout.
    """
    global _stream
    handler = next((h for h in log.handlers if getattr(h, "_proxy_handler", False)), None)
    if handler is None:
        _stream = logging.StreamHandler(sys.stdout)
        records: queue.SimpleQueue = queue.SimpleQueue()
        handler = _Enqueue(records)
        handler._proxy_handler = True
        listener = QueueListener(records, _stream)
        listener.start()
        atexit.register(listener.stop)  # drains what is queued when the process exits
        log.addHandler(handler)
        log.propagate = False
    _stream.setFormatter(make_formatter() if fmt == "json" else
                         TextFormatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    log.setLevel(level)
    # twilio-python's client logs every request at INFO, query strings included.
    logging.getLogger("twilio.http_client").setLevel(logging.WARNING)


def output_formatter() -> logging.Formatter | None:
    """The formatter the listener writes stdout lines with (JSON, or LOG_FORMAT=text)."""
    return _stream.formatter if _stream else None


def event(name: str, *, redact: bool, level: int = logging.INFO, **fields) -> None:
    if redact:
        for key in ADDRESS_FIELDS:
            if fields.get(key):
                fields[key] = mask(fields[key])
    log.log(level, name, extra=fields)
