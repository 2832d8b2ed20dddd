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


def configure(level: str, fmt: str = "json") -> None:
    """Install the stdout handler once per process (create_app may run many times in tests).

    Request threads only format and enqueue; one listener thread writes to stdout, so busy
    threads never queue on the stream's lock.
    """
    handler = next((h for h in log.handlers if getattr(h, "_proxy_handler", False)), None)
    if handler is None:
        stream = logging.StreamHandler(sys.stdout)
        stream.setFormatter(logging.Formatter("%(message)s"))
        records: queue.SimpleQueue = queue.SimpleQueue()
        handler = QueueHandler(records)
        handler._proxy_handler = True
        listener = QueueListener(records, stream)
        listener.start()
        atexit.register(listener.stop)  # drains what is queued when the process exits
        log.addHandler(handler)
        log.propagate = False
    handler.setFormatter(make_formatter() if fmt == "json" else
                         TextFormatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    log.setLevel(level)
    # twilio-python's client logs every request at INFO, query strings included.
    logging.getLogger("twilio.http_client").setLevel(logging.WARNING)


def event(name: str, *, redact: bool, level: int = logging.INFO, **fields) -> None:
    if redact:
        for key in ADDRESS_FIELDS:
            if fields.get(key):
                fields[key] = mask(fields[key])
    log.log(level, name, extra=fields)
