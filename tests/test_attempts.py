"""The background attempt writer: batches, keeps every row, survives a refused row and a locked database."""

import threading

from sqlalchemy import create_engine, func, select

from proxy.attempts import AttemptWriter
from proxy.db import make_engine, send_attempts, utcnow
from proxy.migrate import upgrade


def row(n: int, **overrides) -> dict:
    values = dict(created_at=utcnow(), request_id=f"r{n}", account_sid="AC1", sender="whatsapp:+1", user="whatsapp:+2",
                  channel="whatsapp", content_type="twilio/text", content_sid=None, approval_status=None,
                  decision="allowed", reason="window_open", error_code=None, params="[]", outcome="sent",
                  upstream_status=201, message_sid=f"SM{n}", duration_ms=1)
    return values | overrides


def stored(engine) -> list[str]:
    with engine.connect() as conn:
        return conn.execute(select(send_attempts.c.request_id).order_by(send_attempts.c.id)).scalars().all()


def test_rows_from_many_threads_are_all_stored_in_order_per_thread(database_url, db_engine):
    engine = make_engine(database_url)
    writer = AttemptWriter(engine)
    threads = [threading.Thread(target=lambda t=t: [writer.submit(row(t * 1000 + i)) for i in range(250)])
               for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert writer.flush()
    ids = stored(db_engine)
    assert len(ids) == 2000 and len(set(ids)) == 2000
    for t in range(8):  # one thread's rows keep their order
        mine = [int(i[1:]) for i in ids if int(i[1:]) // 1000 == t]
        assert mine == sorted(mine)
    engine.dispose()


def test_a_refused_row_costs_only_itself(database_url, db_engine):
    engine = make_engine(database_url)
    writer = AttemptWriter(engine)
    writer.submit(row(1))
    writer.submit(row(2, decision=None))  # NOT NULL: the database refuses this one
    writer.submit(row(3))
    assert writer.flush()
    assert stored(db_engine) == ["r1", "r3"]
    assert writer.dropped == 1
    engine.dispose()


def test_rows_wait_while_the_database_is_locked_and_land_after(tmp_path):
    url = f"sqlite:///{tmp_path / 'locked.sqlite3'}"
    upgrade(url)
    engine = make_engine(url)
    writer = AttemptWriter(engine)
    blocker = create_engine(url, connect_args={"timeout": 0.1}).connect()
    blocker.exec_driver_sql("BEGIN EXCLUSIVE")
    try:
        writer.submit(row(1))
        assert writer.flush(timeout=0.5) is False  # not stored yet: it waits on SQLite's busy timeout
    finally:
        blocker.exec_driver_sql("ROLLBACK")
        blocker.close()
    assert writer.flush(timeout=60)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(send_attempts)).scalar_one() == 1
    engine.dispose()


def test_sqlite_writers_of_other_processes_wait_for_the_write_lock(tmp_path):
    """The flock(2) write lock serialises writers across processes (web workers, outbox worker, CLI)."""
    import multiprocessing

    from proxy.db import _WRITE_LOCKS, writing

    url = f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    upgrade(url)
    engine = make_engine(url)
    lock = _WRITE_LOCKS[engine]

    def child(url, started):
        other = make_engine(url)
        started.set()
        with writing(other) as conn:
            conn.execute(send_attempts.insert(), row(7))
        other.dispose()

    ctx = multiprocessing.get_context("fork")
    started = ctx.Event()
    with lock.held():
        process = ctx.Process(target=child, args=(url, started))
        process.start()
        assert started.wait(10)
        process.join(0.5)
        assert process.is_alive()  # still waiting for the lock this process holds
        assert stored(engine) == []
    process.join(30)
    assert process.exitcode == 0 and stored(engine) == ["r7"]
    engine.dispose()


def test_rows_sent_together_are_stored_in_one_transaction_and_flush_does_not_wait_for_the_pause(
        database_url, db_engine, monkeypatch):
    from sqlalchemy import event

    from proxy import attempts

    # A pause longer than flush's timeout: flush() can only succeed by cutting it short.
    monkeypatch.setattr(attempts, "LINGER_SECONDS", 60.0)
    engine = make_engine(database_url)
    commits = []
    event.listen(engine, "commit", lambda conn: commits.append(1))
    writer = AttemptWriter(engine)
    for n in range(50):
        writer.submit(row(n))
    assert writer.flush(timeout=10)
    assert len(stored(db_engine)) == 50
    assert len(commits) == 1
    engine.dispose()


def test_a_batch_is_stored_with_every_value_as_given(database_url, db_engine, monkeypatch):
    """On PostgreSQL a batch goes in as one JSON array: each value must come back as SQLAlchemy would have stored it."""
    from datetime import datetime, timedelta, timezone

    from proxy import attempts

    monkeypatch.setattr(attempts, "LINGER_SECONDS", 60.0)  # one batch: flush() cuts the pause short
    engine = make_engine(database_url)
    writer = AttemptWriter(engine)
    given = [
        row(1, created_at=datetime(2026, 3, 1, 23, 59, 59, 999999, tzinfo=timezone(timedelta(hours=-5)))),
        row(2, sender=None, user=None, channel=None, content_type=None, upstream_status=None, message_sid=None,
            error_code=63016, content_sid="HX" + "0" * 32, approval_status="approved", decision="blocked"),
        row(3, params='[["Body", "quote \\" backslash \\\\ tab \\t é 🙂"]]', user="whatsapp:+4915é'\"",
            duration_ms=2**31 - 1, reason="a_reason_of_sixty_four_characters_" + "x" * 30),
    ]
    for values in given:
        writer.submit(values)
    assert writer.flush()
    with db_engine.connect() as conn:
        got = [dict(r._mapping) for r in conn.execute(select(send_attempts).order_by(send_attempts.c.id))]
    assert [{k: v for k, v in r.items() if k != "id"} for r in got] == [
        values | {"created_at": values["created_at"].astimezone(timezone.utc)} for values in given]
    engine.dispose()


def test_a_batch_is_one_statement_on_postgresql(database_url, db_engine, monkeypatch):
    """psycopg's executemany pipelines a statement per row and, under gevent, waits on the socket for each:
    ~4x the CPU a row of one INSERT of a JSON array (bench/README.md)."""
    from sqlalchemy import event

    from proxy import attempts

    monkeypatch.setattr(attempts, "LINGER_SECONDS", 60.0)  # one batch: flush() cuts the pause short
    engine = make_engine(database_url)
    inserts = []
    event.listen(engine, "before_cursor_execute",
                 lambda conn, cursor, sql, params, context, many: inserts.append(many) if "INSERT" in sql else None)
    writer = AttemptWriter(engine)
    for n in range(50):
        writer.submit(row(n))
    assert writer.flush(timeout=10)
    assert stored(db_engine) == [f"r{n}" for n in range(50)]
    assert inserts == ([False] if engine.dialect.name == "postgresql" else [True])
    engine.dispose()


def test_a_value_that_cannot_even_be_bound_costs_only_its_own_row(database_url, db_engine):
    """A lone surrogate fails in the driver before the database sees it (SQLAlchemy's StatementError, not a
    DBAPI error): once taken for an outage, the batch was retried forever and no later send was recorded."""
    engine = make_engine(database_url)
    writer = AttemptWriter(engine)
    writer.submit(row(1))
    writer.submit(row(2, message_sid="SM\ud83d"))
    writer.submit(row(3))
    assert writer.flush(5)
    writer.submit(row(4))
    assert writer.flush(5)
    assert stored(db_engine) == ["r1", "r3", "r4"] and writer.dropped == 1
    engine.dispose()


def test_records_an_exiting_process_could_not_store_are_counted_in_one_error_line(tmp_path, log_lines, monkeypatch):
    """A FAIL_OPEN send while the database is away goes out; its record waits in memory. A worker stopped then
    exited with one `attempts_not_stored_yet` line naming the first batch: nothing said the records were lost."""
    from sqlalchemy.exc import OperationalError

    from proxy import attempts

    monkeypatch.setattr(attempts, "_said_lost", None)
    url = f"sqlite:///{tmp_path / 'away.sqlite3'}"
    upgrade(url)
    engine = make_engine(url)
    writer = AttemptWriter(engine)

    def database_away(pending):
        raise OperationalError("INSERT", {}, RuntimeError("unable to open database file"))

    monkeypatch.setattr(writer, "_store", database_away)
    for n in range(5):
        writer.submit(row(n))
    assert attempts.flush_at_exit(0.5) is False
    assert attempts.flush_at_exit(0.5) is True  # gunicorn's hook, then atexit: the same five said once
    writer.submit(row(5))  # a request still running at the hook answers after it (a gthread worker's SIGINT)
    assert attempts.flush_at_exit(0.5) is False
    lines = [line for line in log_lines() if line["event"] == "attempts_lost_at_exit"]
    assert [(line["level"], line["count"]) for line in lines] == [("ERROR", 5), ("ERROR", 1)]
    monkeypatch.undo()  # the database is back: the writer stores them, and stops retrying
    assert writer.flush(timeout=60) and stored(engine) == [f"r{n}" for n in range(6)]
    engine.dispose()


def test_records_handed_over_after_the_exit_hook_are_stored_at_exit(tmp_path, monkeypatch):
    """A gthread worker told to quit at once (SIGINT, SIGQUIT) runs gunicorn's worker_exit hook while its requests
    still wait on Twilio; they answer 201 after it and hand their records to the writer. The atexit flush returned
    at once (the hook had run), and the daemon writer died with them: sends without their records, no line."""
    from proxy import attempts

    monkeypatch.setattr(attempts, "_said_lost", None)
    url = f"sqlite:///{tmp_path / 'late.sqlite3'}"
    upgrade(url)
    engine = make_engine(url)
    writer = AttemptWriter(engine)
    assert attempts.flush_at_exit(5.0) is True  # the hook: nothing yet
    for n in range(3):
        writer.submit(row(n))  # answered after the hook
    assert attempts.flush_at_exit(5.0) is True  # atexit
    assert stored(engine) == ["r0", "r1", "r2"]
    engine.dispose()
