"""Send-attempt records, written in batches by one background thread per process, off the request path.

The attempt is recorded after Twilio answered, so the caller must not wait for it: a request hands
its row over and returns. The writer stores whatever has piled up in one transaction (one
`executemany`), which costs a fraction of a transaction per send and leaves SQLite's single write
lock to one thread per process. Rows are flushed at exit and by `flush()`; a killed process loses the
records of its last few milliseconds of sends (never the sends themselves).
"""

from __future__ import annotations

import atexit
import os
import queue
import threading
import time
import weakref

from sqlalchemy import Engine
from sqlalchemy.exc import DataError, IntegrityError, SQLAlchemyError

from . import logs
from .db import send_attempts, writing

MAX_BATCH = 500
MAX_PENDING = 100_000  # rows kept while the database is down; older ones are dropped (and counted) beyond
RETRY_SECONDS = (0.1, 0.5, 1, 2, 5)

_writers: weakref.WeakSet[AttemptWriter] = weakref.WeakSet()
_registered = False


class AttemptWriter:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._rows: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid: int | None = None
        self.dropped = 0
        _writers.add(self)
        global _registered
        if not _registered:
            # Registered after logging was configured, so it runs before the log listener stops.
            atexit.register(flush_all, 5.0)
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
        return done.wait(timeout)

    def _ensure_thread(self) -> None:
        # Started lazily, in the process that writes: gunicorn may fork after the app was created.
        if self._thread is not None and self._pid == os.getpid():
            return
        with self._lock:
            if self._thread is None or self._pid != os.getpid():
                self._pid = os.getpid()
                self._rows = queue.SimpleQueue()
                self._thread = threading.Thread(target=self._run, name="attempt-writer", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        pending: list[dict] = []
        markers: list[threading.Event] = []
        while True:
            try:
                # Rows the database refused for now are retried on their own after a pause.
                item = self._rows.get(timeout=1.0 if pending else None)
            except queue.Empty:
                item = None
            while item is not None:
                if isinstance(item, threading.Event):
                    markers.append(item)
                else:
                    pending.append(item)
                if len(pending) >= MAX_BATCH:
                    break
                try:
                    item = self._rows.get_nowait()
                except queue.Empty:
                    item = None
            pending = self._store(pending)
            if not pending:
                for marker in markers:
                    marker.set()
                markers.clear()

    def _store(self, rows: list[dict]) -> list[dict]:
        """Store rows; what could not be stored yet (the database is down) is returned to retry."""
        if not rows:
            return rows
        for delay in (0, *RETRY_SECONDS):
            time.sleep(delay)
            try:
                with writing(self.engine) as conn:
                    conn.execute(send_attempts.insert(), rows)
                return []
            except (IntegrityError, DataError):
                return self._store_one_by_one(rows)
            except SQLAlchemyError:
                continue  # the database is down, restarting or locked: wait for it
        if len(rows) > MAX_PENDING:
            self.dropped += len(rows) - MAX_PENDING
            logs.log.error("attempts_dropped", extra={"count": len(rows) - MAX_PENDING,
                                                      "detail": "database unavailable; oldest attempt records"})
            rows = rows[-MAX_PENDING:]
        logs.log.error("attempts_not_stored_yet", extra={"count": len(rows), "detail": "database unavailable"})
        return rows

    def _store_one_by_one(self, rows: list[dict]) -> list[dict]:
        # One bad row (a value the database refuses) must not cost the others their record.
        for row in rows:
            try:
                with writing(self.engine) as conn:
                    conn.execute(send_attempts.insert(), row)
            except SQLAlchemyError as exc:
                self.dropped += 1
                logs.log.error("attempt_not_stored", extra={"error": type(exc).__name__,
                                                            "request_id": row.get("request_id"),
                                                            "message_sid": row.get("message_sid")})
        return []


def flush_all(timeout: float = 10.0) -> bool:
    """Flush every writer of this process (at exit, and for tests that read send_attempts)."""
    return all([writer.flush(timeout) for writer in list(_writers)])

