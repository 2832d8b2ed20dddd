"""SQLite write transactions of concurrent requests, committed together: one write turn for many.

SQLite takes one writer at a time, so each inbound webhook's transaction waited its turn on the
proxy's lock file and paid its own BEGIN and COMMIT. Here the first request to arrive leads: it
takes the turn once and runs, in one transaction, every request's work queued by then; the others
wait for their own result. A batch that fails on one request's values is rerun one by one, so a
refused value costs only its own request; any other failure (the database locked or gone) is every
request's answer, as it would have been alone.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, StatementError

from .db import writing

MAX_BATCH = 64


def values_refused(exc: BaseException) -> bool:
    """The error is about one request's values, not the database: refused by it (a constraint, a type),
    or not bindable at all (SQLAlchemy's StatementError, or the driver's UnicodeError for a lone surrogate,
    raised before the database saw anything)."""
    if isinstance(exc, (IntegrityError, DataError)):
        return True
    return isinstance(exc, (StatementError, UnicodeError)) and not isinstance(exc, DBAPIError)


class _Job:
    __slots__ = ("work", "done", "lead", "result", "error")

    def __init__(self, work: Callable[[Connection], Any]):
        self.work = work
        self.done = threading.Event()  # set when its result is in, or when it is handed the lead
        self.lead = False
        self.result: Any = None
        self.error: BaseException | None = None


class GroupCommit:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._mutex = threading.Lock()
        self._pending: list[_Job] = []
        self._leading = False

    def run(self, work: Callable[[Connection], Any]) -> Any:
        """`work(conn)` inside a write transaction shared with other requests; its return value.

        `work` must only use `conn` (it may run in another request's thread) and may run twice.
        """
        job = _Job(work)
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
            self._lead_once()
        if job.error is not None:
            raise job.error
        return job.result

    def _lead_once(self) -> None:
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
            try:
                with writing(self.engine) as conn:
                    results = [job.work(conn) for job in batch]
                for job, result in zip(batch, results):
                    job.result = result
            except Exception as error:  # noqa: BLE001 — sorted below: this batch's values, or the database
                if not values_refused(error) or len(batch) == 1:
                    raise
                for job in batch:  # one request's values were refused: find whose
                    try:
                        with writing(self.engine) as conn:
                            job.result = job.work(conn)
                    except Exception as exc:  # noqa: BLE001 — it is that request's answer
                        job.error = exc
        except Exception as exc:  # noqa: BLE001 — the database's answer to everyone in the batch
            for job in batch:
                job.error = exc
        finally:
            for job in batch:
                job.done.set()
