"""Database schema (SQLAlchemy Core tables) and engine set-up for SQLite and PostgreSQL."""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import weakref
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # not POSIX: SQLite's own busy timeout is the only arbiter
    fcntl = None

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    DateTime,
    Engine,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    event,
    make_url,
)
from sqlalchemy.exc import DBAPIError, InvalidatePoolError, SQLAlchemyError

from .fair_pool import FairQueuePool


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on both backends (SQLite stores them naive, as UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# One row per (business sender, user). `sender` is the business address
# (whatsapp:+E164) or a Messaging Service SID that received the user's message.
windows = Table(
    "windows",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("sender", String(128), nullable=False),
    Column("user", String(128), nullable=False),
    Column("expires_at", UTCDateTime(), nullable=False),
    Column("last_inbound_at", UTCDateTime(), nullable=False),
    Column("last_inbound_sid", String(64), nullable=True),
    Column("profile_name", String(256), nullable=True),
    Column("updated_at", UTCDateTime(), nullable=False),
    UniqueConstraint("sender", "user"),
    Index(None, "expires_at"),
)

# Inbound messages and the latest known status of any message sid.
messages = Table(
    "messages",
    metadata,
    Column("sid", String(64), primary_key=True),
    Column("direction", String(16), nullable=False),
    Column("sender", String(128), nullable=True),
    Column("user", String(128), nullable=True),
    Column("messaging_service_sid", String(64), nullable=True),
    Column("status", String(32), nullable=False),
    Column("status_rank", Integer, nullable=False),
    Column("error_code", Integer, nullable=True),
    Column("num_media", Integer, nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    Index(None, "created_at"),
)

# Every send the gateway judged: what was asked, what was decided, what Twilio said.
send_attempts = Table(
    "send_attempts",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("request_id", String(64), nullable=False),
    Column("account_sid", String(64), nullable=False),
    Column("sender", String(128), nullable=True),
    Column("user", String(128), nullable=True),
    Column("channel", String(32), nullable=True),
    Column("content_type", String(64), nullable=True),
    Column("decision", String(16), nullable=False),
    Column("reason", String(64), nullable=False),
    Column("error_code", Integer, nullable=True),
    Column("upstream_status", Integer, nullable=True),
    Column("message_sid", String(64), nullable=True),
    Column("content_sid", String(34), nullable=True),
    Column("approval_status", String(32), nullable=True),
    Column("outcome", String(32), nullable=False),
    Column("params", Text, nullable=False),
    Column("duration_ms", Integer, nullable=False),
    Index(None, "created_at"),
    Index(None, "message_sid"),
)


# Content API answers (types and WhatsApp approval), kept CONTENT_CACHE_SECONDS.
content_cache = Table(
    "content_cache",
    metadata,
    Column("sid", String(34), primary_key=True),
    Column("types", Text, nullable=False),
    Column("approval_status", String(32), nullable=False),
    Column("friendly_name", String(256), nullable=True),
    Column("fetched_at", UTCDateTime(), nullable=False),
)


# Durable deliveries: webhooks forwarded to the app, held-message releases, fallback sends.
# Items with one ordering_key are delivered one at a time, oldest first.
# The id goes to the app as X-Proxy-Outbox-Id, which it de-duplicates forwards on: never given twice.
# SQLite hands out the largest rowid + 1, so without AUTOINCREMENT a purge of the newest rows let the
# next items take their ids again (PostgreSQL's sequence never does). Migration 0004.
outbox = Table(
    "outbox",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("kind", String(16), nullable=False),
    Column("ordering_key", String(300), nullable=False),
    Column("target", String(2048), nullable=False),
    Column("headers", Text, nullable=False),
    Column("body", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", UTCDateTime(), nullable=False),
    Column("lease_until", UTCDateTime(), nullable=True),
    Column("last_error", String(500), nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    Column("delivered_at", UTCDateTime(), nullable=True),
    # `claim` and `oldest_due` walk this in their order (the longest due first) and stop at their limit,
    # rather than read and sort every pending item: a backlog after an outage is when it matters.
    Index(None, "status", "next_attempt_at", "id"),
    # Whether an earlier item of a conversation is pending (for each claim candidate, and each forwarded
    # webhook's turn): one range of this. On (ordering_key, id) PostgreSQL, without statistics of the
    # table, combined it with the status index and read every pending item for each candidate.
    Index(None, "ordering_key", "status", "id"),
    sqlite_autoincrement=True,
)

# Sends that were rerouted and are kept until the user's next message opens the window.
# The id is shown to the caller as X-Proxy-Held-Id: never given twice, as the outbox's.
held_messages = Table(
    "held_messages",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("sender", String(128), nullable=False),
    Column("user", String(128), nullable=False),
    Column("account_sid", String(64), nullable=False),
    Column("params", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("request_id", String(64), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("expires_at", UTCDateTime(), nullable=False),
    Column("released_at", UTCDateTime(), nullable=True),
    Column("message_sid", String(64), nullable=True),
    Column("last_error", String(500), nullable=True),
    Index(None, "sender", "user", "status"),
    Index(None, "status", "expires_at"),
    sqlite_autoincrement=True,
)

# Messages the proxy let through that failed later with 63016: acted on once per sid.
late_failures = Table(
    "late_failures",
    metadata,
    Column("message_sid", String(64), primary_key=True),
    Column("sender", String(128), nullable=True),
    Column("user", String(128), nullable=True),
    Column("action", String(32), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
)


# The number a Messaging Service sends to a user from (Twilio's Sticky Sender: "Any future messages sent to that
# recipient from that Messaging Service will also use the same From number"), as the callbacks of the proxy's
# service sends reported it. A service send is judged by that number's window: the service's own row is open
# when the user wrote to any of its numbers.
sticky_senders = Table(
    "sticky_senders",
    metadata,
    Column("service_sid", String(64), primary_key=True),
    Column("user", String(128), primary_key=True),
    Column("sender", String(128), nullable=False),
    # When the send that named it was made: a late callback of an older send does not bring back its number.
    Column("sent_at", UTCDateTime(), nullable=False),
    # When a callback last named it (at most a day old while the service sends): purge ages it by this.
    Column("updated_at", UTCDateTime(), nullable=False),
    Index(None, "updated_at"),
)


def make_engine(url: str, *, pool_size: int = 10) -> Engine:
    """A pool of at most `pool_size` connections, kept open, most recently used first.

    No overflow connections: a gevent worker's bursts opened and closed them by the dozen a second, a
    PostgreSQL backend start each (py-spy; PostgreSQL gateway 323 → 535 sends/s). Last-in-first-out,
    so the few connections a steady load needs stay warm: SQLite's page cache and psycopg's prepared
    statements are per connection (SQLite inbound 674 → 969 req/s). Callers waiting for a connection are served
    in the order they came (proxy/fair_pool.py). Numbers in bench/README.md.
    """
    # hide_parameters: a database error must never carry a message body into the logs.
    pooling = {"poolclass": FairQueuePool, "pool_size": pool_size, "max_overflow": 0, "pool_use_lifo": True,
               "pool_timeout": POOL_TIMEOUT_SECONDS, "hide_parameters": True}
    if url.startswith("sqlite"):
        if url.startswith("sqlite:///") and not url.startswith("sqlite:///:memory:"):
            try:
                Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            except OSError:
                # A folder that cannot be made (a file in its place, no permission): every process died with a
                # traceback. Left to the connection, it is the database unavailable, said in one line, as any.
                pass
        engine = create_engine(url, connect_args={"timeout": 30}, **pooling)
        event.listen(engine, "connect", _sqlite_pragmas)
        database = engine.url.database
        if fcntl is not None and database and database != ":memory:" and not database.startswith("file:"):
            _WRITE_LOCKS[engine] = _sqlite_write_lock(database)
        return engine
    # connect_args would override the URL's own values: the operator's win.
    given = make_url(url).query
    connect_args = {name: value for name, value in (("connect_timeout", CONNECT_TIMEOUT_SECONDS),
                                                    ("tcp_user_timeout", TCP_USER_TIMEOUT_MS)) if name not in given}
    engine = create_engine(url, connect_args=connect_args, **pooling)
    dialect = engine.dialect

    def ping_if_idle(dbapi_connection, record, _proxy) -> None:
        if time.monotonic() - record.info.get("idle_since", float("inf")) < PING_AFTER_IDLE_SECONDS:
            return
        try:
            dialect.do_ping(dbapi_connection)  # what pool_pre_ping runs
        except Exception:  # noqa: BLE001 — the server went away: every pooled connection is stale too
            raise InvalidatePoolError() from None

    event.listen(engine, "checkin", _note_idle)
    event.listen(engine, "checkout", ping_if_idle)
    event.listen(engine, "invalidate", _cancel_what_was_interrupted)
    return engine


def _cancel_what_was_interrupted(dbapi_connection, _record, exception) -> None:
    """Before SQLAlchemy closes a connection a read's deadline interrupted (gevent's Timeout, proxy/judge.py), the
    server is told to stop that statement: a backend waiting on a lock does not notice its client gone, and one
    stayed behind per interrupted read for as long as the lock lasted. psycopg cancels by itself only for
    KeyboardInterrupt and SystemExit."""
    if exception is None or isinstance(exception, Exception):
        return
    try:
        dbapi_connection.cancel_safe(timeout=CANCEL_TIMEOUT_SECONDS)
    except Exception:  # noqa: BLE001 — the connection is being dropped anyway; the lock's end frees the backend
        pass


CANCEL_TIMEOUT_SECONDS = 2


# A PostgreSQL host that accepts the connection and never answers (or drops its packets) is given up on
# after this long, unless DATABASE_URL sets its own `connect_timeout`. Without it psycopg waits 130 s, past
# gunicorn's 60 s --timeout: every request hung until its worker was killed. 10 s is far beyond any
# healthy connect (TCP, TLS and authentication take milliseconds, a second across regions) and leaves an
# inbound webhook time to answer 503 before Twilio's 15 s run out.
CONNECT_TIMEOUT_SECONDS = 10
# A request waits this long for a pooled connection (SQLAlchemy's default is 30 s): every connection held
# that long means a stalled database, answered with a 503 rather than a send forwarded long after its caller
# gave up (proxy/judge.py refuses a window read as slow).
POOL_TIMEOUT_SECONDS = 10
# And an open connection whose host stops answering (it died, or the network between split) fails after
# this long without an acknowledgement of what was sent (libpq's `tcp_user_timeout`, Linux), instead of the
# kernel's ~15 minutes of retransmissions. It times the network, not the query: a slow query's packets are
# acknowledged at once.
TCP_USER_TIMEOUT_MS = 10_000


# A connection idle this long is pinged before use, so one a restarted database closed is replaced
# instead of failing a request. SQLAlchemy's pool_pre_ping pings on every checkout: a round trip per
# request that cost ~7% of PostgreSQL inbound throughput (bench/README.md); busy connections, checked
# in a few milliseconds ago, cannot have missed a restart that takes PostgreSQL seconds.
PING_AFTER_IDLE_SECONDS = 1.0


def _note_idle(_dbapi_connection, record) -> None:
    if record is not None:
        record.info["idle_since"] = time.monotonic()


def _sqlite_pragmas(dbapi_connection, _record):
    # WAL lets readers run while one writer writes; busy_timeout makes concurrent
    # gunicorn workers wait for the write lock instead of failing "database is locked".
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    # Reads through the OS page cache without a read(2) per page: a million-window table's index
    # is far larger than SQLite's own 2 MB page cache (bench/growth.py).
    cursor.execute("PRAGMA mmap_size=268435456")
    cursor.close()


class WriteLockTimeout(SQLAlchemyError):
    """Another writer held the SQLite database longer than its busy timeout: answered 503, like SQLite's own."""


class SQLiteWriteLock:
    """One write transaction at a time on a SQLite file, across the threads and processes of the proxy.

    SQLite lets one writer in and makes the others poll with sleeps of 1 to 100 ms (its busy
    handler); with 128 request threads in two workers that polling, not the writes, set the
    throughput and gave multi-second p99s (bench/README.md). Here the threads of a process queue on
    a lock, and one thread per process at a time takes flock(2) (the web workers, the outbox worker,
    the CLI), polling it at most every 2 ms, so the next writer starts right after the last commits.
    """

    _setup = threading.Lock()
    timeout = 30.0  # as SQLite's busy_timeout
    # A lock file that could not be opened (its folder missing, or a file in its place) is tried again this often:
    # the database may come (an operator makes the folder), and the process wrote without the lock for good.
    retry_seconds = 5.0

    def __init__(self, path: str):
        self.path = path
        self._pid: int | None = None
        self._fd: int | None = None
        self._local = threading.RLock()
        self._depth = 0
        self._retry_at = 0.0

    def _open(self) -> None:
        with self._setup:  # first write of this process (or after a fork): its own lock and descriptor
            if self._pid == os.getpid():
                return
            self._local, self._depth, self._fd = threading.RLock(), 0, None
            try:
                # Read-only is enough for flock, and 0644 lets a proxy running as another user (a CLI
                # command run as root, say) share the file; it holds nothing.
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CREAT, 0o644)
            except OSError as exc:
                self._retry_at = time.monotonic() + self.retry_seconds
                logging.getLogger("proxy").warning("sqlite_write_lock_unavailable", extra={
                    "path": self.path, "error": type(exc).__name__,
                    "detail": "writers fall back to SQLite's own busy timeout until it can be opened"})
            self._pid = os.getpid()

    def _reopen(self) -> None:
        """Try the lock file again (said once, when it failed first); the threads' lock and depth are left as they
        are: a writer inside now, which took no flock, releases none it does not hold (LOCK_UN is a no-op)."""
        with self._setup:
            if self._fd is not None or self._pid != os.getpid():
                return
            try:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CREAT, 0o644)
            except OSError:
                self._retry_at = time.monotonic() + self.retry_seconds

    @contextmanager
    def held(self) -> Iterator[None]:
        if self._pid != os.getpid():
            self._open()
        elif self._fd is None and time.monotonic() >= self._retry_at:
            self._reopen()
        deadline = time.monotonic() + self.timeout
        if not self._local.acquire(timeout=self.timeout):
            raise WriteLockTimeout("another thread held the SQLite write lock too long")
        try:
            if self._depth == 0 and self._fd is not None:
                self._take(deadline)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0 and self._fd is not None:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._local.release()

    def _take(self, deadline: float) -> None:
        pause = 0.0002
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise WriteLockTimeout("another process held the SQLite write lock too long") from None
                time.sleep(pause)  # cooperative under gevent, unlike a blocking flock
                pause = min(pause * 2, 0.002)


_LOCKS: dict[str, SQLiteWriteLock] = {}  # one per database file: nested writes through two engines share it
_WRITE_LOCKS: weakref.WeakKeyDictionary[Engine, SQLiteWriteLock] = weakref.WeakKeyDictionary()


def _sqlite_write_lock(database: str) -> SQLiteWriteLock:
    path = os.path.realpath(database) + ".write-lock"
    with SQLiteWriteLock._setup:
        return _LOCKS.setdefault(path, SQLiteWriteLock(path))


@contextmanager
def write_lock(engine: Engine) -> Iterator[None]:
    """Take SQLite's write turn with the proxy's other writers (nothing on PostgreSQL).

    Migrations hold it too: a writer SQLite itself makes wait would block a gevent worker whole.
    """
    lock = _WRITE_LOCKS.get(engine)
    if lock is None:
        yield
        return
    with lock.held():
        yield


@contextmanager
def writing(engine: Engine) -> Iterator[Connection]:
    """A write transaction: `engine.begin()`, taken in turn with the other writers on SQLite."""
    with write_lock(engine), engine.begin() as conn:
        yield conn


def unavailable_reason(exc: DBAPIError) -> str:
    """The first line of the driver's words for an unreachable or locked database (refused, timed out, locked,
    disk): what an operator needs, without SQLAlchemy's traceback."""
    text = str(exc.orig).strip()
    return text.splitlines()[0] if text else type(exc.orig).__name__


# The C0 control characters but tab: PostgreSQL refuses NUL, and the others have no place in a stored field.
_UNSTORABLE = re.compile(r"[\x00-\x08\x0a-\x1f]")


def storable(value: str | None, length: int) -> str | None:
    """Text as the database keeps it: no control characters (PostgreSQL refuses NUL), at most `length`."""
    # One regex pass, not a generator over each character: ~15 µs of a send's CPU (its attempt row's seven fields).
    text = _UNSTORABLE.sub("", value or "")[:length]
    return text or None


def utcnow() -> datetime:
    return datetime.now(timezone.utc)
