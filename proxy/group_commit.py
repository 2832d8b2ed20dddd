"""Write transactions of concurrent requests, committed together: one transaction for many.

Each inbound webhook or status callback writes one statement (a forwarded one a few: its message,
window and outbox item). Alone, each paid its own transaction: on SQLite a turn on the proxy's write
lock with its BEGIN and COMMIT, on PostgreSQL a pooled connection and a commit in the server. Here
the first request to arrive leads: it lets the requests that are ready reach their own write, then
runs, in one transaction, every request's work queued by then (a batch of one alone: a single
statement on PostgreSQL in autocommit, one round trip); the others wait for their own result. A
batch that fails on one request's values, or on an error its own code raised, is rerun one request
at a time, each in its own thread, so the failure costs only its own request; so is a PostgreSQL batch
that deadlocked with another worker's or waited over a second for a row (each request alone is what it
would have been without batching); a request alone that PostgreSQL ended for crossed locks is run again.
A failure of the database itself (locked, gone, out of connections) is every request's answer, as it would
have been alone.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, SQLAlchemyError, StatementError

from .db import writing

MAX_BATCH = 64
# PostgreSQL's answers to two transactions taking the same rows in opposite orders (deadlock_detected,
# serialization_failure), and to a batch that waited longer than BATCH_LOCK_TIMEOUT for a row
# (lock_not_available): nothing about the values; each request alone waits only for its own rows.
_CONFLICT_SQLSTATES = frozenset({"40P01", "40001", "55P03"})
# How long a PostgreSQL batch waits for a row another transaction holds (a purge deleting old windows, a
# forwarded webhook's transaction) before its requests are run alone: one held row must not hold up every
# webhook of the worker. Batches wait on each other for milliseconds; PostgreSQL's deadlock check is at 1 s.
BATCH_LOCK_TIMEOUT = "1s"
# Runs of a request alone that PostgreSQL ended for crossed locks, before its error is the caller's answer.
ALONE_ATTEMPTS = 3


def values_refused(exc: BaseException) -> bool:
    """The error is about one request's values, not the database: refused by it (a constraint, a type),
    or not bindable at all (SQLAlchemy's StatementError, or the driver's UnicodeError for a lone surrogate,
    raised before the database saw anything)."""
    if isinstance(exc, (IntegrityError, DataError)):
        return True
    return isinstance(exc, (StatementError, UnicodeError)) and not isinstance(exc, DBAPIError)


def one_requests_own(exc: BaseException) -> bool:
    """The error is one request's alone: its values refused, or raised by its own code rather than by
    SQLAlchemy or the database (a bug in one kind of write must not fail every webhook batched with it)."""
    return values_refused(exc) or not isinstance(exc, SQLAlchemyError)


def lock_conflict(exc: BaseException) -> bool:
    """PostgreSQL gave up the transaction because another one held rows it wanted, and vice versa."""
    return isinstance(exc, DBAPIError) and getattr(exc.orig, "sqlstate", None) in _CONFLICT_SQLSTATES


class _Job:
    __slots__ = ("work", "order", "several", "done", "lead", "alone", "result", "error")

    def __init__(self, work: Callable[[Connection], Any], order: tuple = (), several: bool = False):
        self.work = work
        self.order = order
        self.several = several  # more than one statement: alone, still one transaction (never autocommit)
        self.done = threading.Event()  # set when its result is in, or when it is handed the lead
        self.lead = False
        self.alone = False  # its batch did not commit for the batch's sake (a value, crossed locks): run it alone
        self.result: Any = None
        self.error: BaseException | None = None


class GroupCommit:
    def __init__(self, engine: Engine):
        self.engine = engine
        # A batch of one: on PostgreSQL one statement in autocommit is its own transaction, one round trip
        # instead of three; on SQLite a write needs the write turn, which `writing` takes.
        self._autocommit = (None if engine.dialect.name == "sqlite"
                            else engine.execution_options(isolation_level="AUTOCOMMIT"))
        self._mutex = threading.Lock()
        self._pending: list[_Job] = []
        self._leading = False

    def run(self, work: Callable[[Connection], Any], order: tuple = (), *, several: bool = False) -> Any:
        """`work(conn)` inside a write transaction shared with other requests; its return value.

        `work` must only use `conn` (it may run in another request's thread) and may run twice. A batch
        runs in `order` (the keys of the rows `work` writes): two batches then take their rows' locks in
        the same order, and do not wait on each other both ways (a PostgreSQL deadlock costs a second).
        `several`: `work` runs more than one statement, which must commit together even when it runs alone.
        """
        job = _Job(work, order, several)
        with self._mutex:
            self._pending.append(job)
            job.lead = not self._leading
            self._leading = True
        if not job.lead:
            try:
                job.done.wait()
            except BaseException:  # interrupted (a worker shutting down): never strand the queue
                self._abandon(job)
                raise
        if job.lead:  # first to arrive, or handed the lead: this job heads the next batch
            self._lead_once(job)
        if job.alone:  # in this request's own thread: it waits for its own rows only
            return self._alone(job)
        if job.error is not None:
            raise job.error
        return job.result

    def _lead_once(self, job: _Job) -> None:
        # Let the requests that are ready run up to their own write first, and join this batch: under
        # gevent a SQLite write never yields, so without this most batches were of one (sleep(0) is a
        # yield to gevent's hub, a GIL hand-off between threads). SQLite inbound +25% webhooks/s, A/B.
        try:
            time.sleep(0)
        except BaseException:  # interrupted before taking the batch: never strand the queue
            self._abandon(job)
            raise
        # One batch, then the lead passes to the oldest request still waiting, so no request serves
        # others' batches for longer than its own.
        with self._mutex:
            batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
        try:
            self._commit(batch)
        finally:
            with self._mutex:
                self._pass_lead()

    def _pass_lead(self) -> None:
        """With the mutex held: wake the oldest waiting request to lead, or step down."""
        if self._pending:
            successor = self._pending[0]
            successor.lead = True
            successor.done.set()
        else:
            self._leading = False

    def _abandon(self, job: _Job) -> None:
        with self._mutex:
            if job in self._pending:  # not in a batch yet: drop it, and pass on a lead just handed to it
                self._pending.remove(job)
                if job.lead:
                    self._pass_lead()

    def _commit(self, batch: list[_Job]) -> None:
        try:
            if len(batch) == 1:
                batch[0].result = self._alone(batch[0])
                return
            batch.sort(key=lambda job: job.order)
            try:
                with writing(self.engine) as conn:
                    if conn.dialect.name == "postgresql":
                        conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{BATCH_LOCK_TIMEOUT}'")
                    results = [job.work(conn) for job in batch]
            except Exception as error:  # noqa: BLE001 — sorted below: one request's, or the database's
                if not (one_requests_own(error) or lock_conflict(error)):
                    raise
                # One request's values were refused or its code failed, or the batch crossed another
                # transaction: each request runs alone, in its own thread, and gets its own answer.
                for job in batch:
                    job.alone = True
                return
            for job, result in zip(batch, results):
                job.result = result
        except Exception as exc:  # noqa: BLE001 — the database's answer to everyone in the batch
            for job in batch:
                job.error = exc
        except BaseException:  # the leader was interrupted: the others' work is their own again
            for job in batch:
                job.alone = True
            raise
        finally:
            for job in batch:
                job.done.set()

    def _alone(self, job: _Job) -> Any:
        # Alone, a request can still cross another worker's batch: PostgreSQL ends one of the two (its statement
        # rolled back), and the other goes on. Run again, it no longer waits on anyone; a 503 instead lost the
        # message (Twilio does not send an inbound webhook again).
        for attempt in range(1, ALONE_ATTEMPTS + 1):
            try:
                return self._alone_once(job)
            except DBAPIError as exc:
                if attempt == ALONE_ATTEMPTS or not lock_conflict(exc):
                    raise

    def _alone_once(self, job: _Job) -> Any:
        if self._autocommit is not None and not job.several:
            with self._autocommit.connect() as conn:
                return job.work(conn)
        with writing(self.engine) as conn:
            return job.work(conn)
