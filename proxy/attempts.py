"""Send-attempt records, written in batches by one background thread per process, off the request path.

The attempt is recorded after Twilio answered, so the caller must not wait for it: the gateway hands
its row over once the answer is written (proxy/gateway.py). Woken by a row, the writer lets rows
gather for LINGER_SECONDS, then stores them all in one transaction (one `executemany`). Without the pause, sends arriving a few milliseconds
apart each woke the writer and each paid a whole transaction: ~0.8 ms of CPU per send, a third of a
send's cost (bench/README.md). On PostgreSQL the batch is one INSERT of a JSON array: psycopg's
`executemany` pipelines a statement per row and, under gevent, waits on the socket for each (~160–190 µs
of CPU a row, against ~40–50 µs). Rows are flushed at exit and at once by `flush()`; a killed process
loses the records of its last LINGER_SECONDS of sends (never the sends themselves).
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import threading
import weakref
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Engine
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import SQLAlchemyError

from . import logs
from .db import send_attempts, storable, utcnow, writing
from .group_commit import values_refused

if TYPE_CHECKING:
    from .judge import Judgement

MAX_BATCH = 500
LINGER_SECONDS = 0.05
MAX_PENDING = 100_000  # rows kept while the database is down; older ones are dropped (and counted) beyond

_writers: weakref.WeakSet[AttemptWriter] = weakref.WeakSet()
_registered = False
_said_lost: int | None = None  # once an exit flush ran: how many records it could not store


class AttemptWriter:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._rows: queue.SimpleQueue = queue.SimpleQueue()
        self._flush_asked = threading.Event()  # cuts the writer's pause short
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid: int | None = None
        self._pending: list[dict] = []  # taken off the queue by the writer, not stored yet
        self.dropped = 0
        _writers.add(self)
        global _registered
        if not _registered:
            atexit.register(flush_at_exit, 5.0)
            _registered = True

    def submit(self, row: dict) -> None:
        """Queue one send_attempts row (column → value); it is stored within milliseconds."""
        self._ensure_thread()
        self._rows.put(row)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every row submitted before this call is stored (or given up); False on timeout."""
        if self._thread is None or self._pid != os.getpid():
            return True
        done = threading.Event()
        self._rows.put(done)
        self._flush_asked.set()
        return done.wait(timeout)

    def _ensure_thread(self) -> None:
        # Started lazily, in the process that writes: gunicorn may fork after the app was created.
        if self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
            return
        with self._lock:
            if self._thread is None or self._pid != os.getpid():
                self._pid = os.getpid()
                self._rows = queue.SimpleQueue()
                self._flush_asked = threading.Event()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="attempt-writer", daemon=True)
                self._thread.start()

    def unstored(self) -> int:
        """About how many rows wait to be stored (this process's, while its writer runs)."""
        if self._thread is None or self._pid != os.getpid():
            return 0
        return len(self._pending) + self._rows.qsize()  # the queue may hold a flush marker or two: "about"

    def _run(self) -> None:
        pending = self._pending = []
        markers: list[threading.Event] = []
        failures = 0
        while True:
            try:
                # While the database is away, wait a little longer each time (new rows still queue).
                item = self._rows.get(timeout=min(5.0, 0.1 * 2 ** failures) if pending else None)
            except queue.Empty:
                item = None
            if item is not None and not isinstance(item, threading.Event):
                self._flush_asked.wait(LINGER_SECONDS)  # let the rows of concurrent sends gather
            self._flush_asked.clear()
            while item is not None:  # take everything that is queued, so MAX_PENDING can bound it
                (markers if isinstance(item, threading.Event) else pending).append(item)
                try:
                    item = self._rows.get_nowait()
                except queue.Empty:
                    item = None
            if len(pending) > MAX_PENDING:
                extra = len(pending) - MAX_PENDING
                self.dropped += extra
                logs.log.error("attempts_dropped", extra={"count": extra, "detail": "database unavailable; "
                                                          "the oldest attempt records were not kept"})
                del pending[:extra]
            try:
                while pending:
                    self._store(pending)
                failures = 0
            except SQLAlchemyError as exc:  # down, restarting or locked: keep the rows and try again
                failures += 1
                if failures in (1, 10) or failures % 100 == 0:
                    logs.log.error("attempts_not_stored_yet", extra={"count": len(pending),
                                                                     "error": type(exc).__name__})
            except Exception:  # noqa: BLE001 — never let the writer die; these rows cannot be stored
                self.dropped += len(pending[:MAX_BATCH])
                logs.log.exception("attempts_not_stored", extra={"count": len(pending[:MAX_BATCH])})
                del pending[:MAX_BATCH]
            if not pending:
                for marker in markers:
                    marker.set()
                markers.clear()

    def _store(self, pending: list[dict]) -> None:
        """Store the first MAX_BATCH rows in one transaction and take them off `pending`; a refused value
        costs only its own row. A database failure leaves on `pending` every row not stored yet."""
        rows = pending[:MAX_BATCH]
        try:
            with writing(self.engine) as conn:
                _insert(conn, rows)
            del pending[:len(rows)]
        except Exception as error:  # noqa: BLE001 — sorted below: a row's values, or the database
            if not values_refused(error):
                raise  # the database is down or locked: keep every row for the next try
            for row in rows:
                try:
                    with writing(self.engine) as conn:
                        conn.execute(send_attempts.insert(), row)
                except Exception as exc:  # noqa: BLE001
                    if not values_refused(exc):
                        raise
                    self.dropped += 1
                    logs.log.error("attempt_not_stored", extra={"error": type(exc).__name__,
                                                                "request_id": row.get("request_id"),
                                                                "message_sid": row.get("message_sid")})
                pending.pop(0)  # stored, or refused for good


_quote = postgresql.dialect().identifier_preparer.quote
_COLUMNS = ", ".join(_quote(column.name) for column in send_attempts.c if column.name != "id")
_JSON_INSERT = (f"INSERT INTO {_quote(send_attempts.name)} ({_COLUMNS}) SELECT {_COLUMNS} "
                f"FROM json_populate_recordset(NULL::{_quote(send_attempts.name)}, %s::json) "
                "WITH ORDINALITY AS batch ORDER BY ordinality")


def _insert(conn: Connection, rows: list[dict]) -> None:
    """Insert `rows` in one statement: on PostgreSQL one JSON array, expanded by the server in the rows' order (their
    ids keep it); elsewhere, or when a value has no JSON form, SQLAlchemy's executemany."""
    if conn.dialect.name == "postgresql" and len(rows) > 1:
        try:
            batch = json.dumps(rows, default=_utc_text)
        except (TypeError, ValueError):
            pass  # SQLAlchemy's own binding says what is wrong with which value
        else:
            conn.exec_driver_sql(_JSON_INSERT, (batch,))
            return
    conn.execute(send_attempts.insert(), rows)


def _utc_text(value):
    if isinstance(value, datetime) and value.tzinfo is not None:  # as UTCDateTime binds it
        return value.astimezone(timezone.utc).isoformat()
    raise TypeError(f"{type(value).__name__} has no JSON form here")


def flush_all(timeout: float = 10.0) -> bool:
    """Flush every writer of this process (at exit, and for tests that read send_attempts)."""
    return all([writer.flush(timeout) for writer in list(_writers)])


def flush_at_exit(timeout: float) -> bool:
    """`flush_all`, and an ERROR line saying how many records the exiting process could not store: the sends
    went out (a FAIL_OPEN send while the database was away, say), their records did not. gunicorn's worker_exit
    hook runs it, then atexit, which flushes again when records were handed over since (and says only those it
    lost): a gthread worker told to quit at once (SIGINT, SIGQUIT) runs the hook while its requests still wait on
    Twilio, and they answer (201) and hand their records over after it."""
    global _said_lost
    if _said_lost is not None and sum(writer.unstored() for writer in list(_writers)) <= _said_lost:
        return True  # nothing new since the last exit flush said what it lost
    stored = flush_all(timeout)
    lost = 0 if stored else sum(writer.unstored() for writer in list(_writers))
    if lost > (_said_lost or 0):
        logs.log.error("attempts_lost_at_exit", extra={
            "count": lost - (_said_lost or 0),
            "detail": "the process is exiting and the database did not take these send records"})
    _said_lost = lost
    return stored


def content_type(judgement: Judgement) -> str | None:
    return judgement.send.content_type or ("content" if judgement.content_sid else None)


def row(judgement: Judgement, *, account_sid: str, request_id: str, params: list, decision: str, outcome: str,
        upstream_status: int | None, message_sid: str | None, duration_ms: float, at: datetime | None = None) -> dict:
    """One send_attempts row for a judged send: the gateway's, or one of the worker's own creates. `at`: when the
    send was over (default now); with duration_ms it says when it was judged (late_failures)."""
    return dict(
        created_at=at or utcnow(),
        request_id=request_id,
        account_sid=account_sid,
        # Passthrough channels are not normalised: store what fits, never fail the record.
        sender=storable(judgement.sender, 128),
        user=storable(judgement.user, 128),
        channel=storable(judgement.channel, 32),
        # The Content API names them: a type or an approval status this release does not know may be longer.
        content_type=storable(content_type(judgement), 64),
        content_sid=storable(judgement.content_sid, 34),
        approval_status=storable(judgement.send.approval, 32),
        decision=decision,
        reason=judgement.decision.reason,
        error_code=judgement.decision.code,
        params=json.dumps(params),
        outcome=outcome,
        upstream_status=upstream_status,
        message_sid=storable(message_sid, 64),
        duration_ms=int(duration_ms),
    )
