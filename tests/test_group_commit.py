"""proxy.group_commit on SQLite: concurrent requests share one write transaction; each gets its own
result; a refused value fails only its own request; a database failure is everyone's answer."""

import threading
import time

import pytest
from sqlalchemy import event, func, insert, select
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, StatementError

from proxy.db import late_failures, make_engine, metadata, utcnow, writing
from proxy import group_commit
from proxy.group_commit import MAX_BATCH, GroupCommit


@pytest.fixture
def engine(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'g.sqlite3'}")
    metadata.create_all(engine)
    commits = []
    event.listen(engine, "commit", lambda conn: commits.append(1))
    engine.commits = commits
    yield engine
    engine.dispose()


def row(sid):
    def work(conn):
        conn.execute(insert(late_failures).values(message_sid=sid, action="closed", created_at=utcnow()))
        return sid
    return work


def run_together(group, works, *, hold_first_until_queued=True):
    """Run each work from its own thread; the first holds its batch open until the others queue."""
    results, queued = [None] * len(works), threading.Event()

    def first(conn):
        assert queued.wait(10)
        return works[0](conn)

    def call(i, work):
        try:
            results[i] = group.run(work)
        except Exception as exc:  # noqa: BLE001 — the test looks at what each caller got
            results[i] = exc

    threads = [threading.Thread(target=call, args=(0, first if hold_first_until_queued else works[0]))]
    threads += [threading.Thread(target=call, args=(i, w)) for i, w in enumerate(works[1:], start=1)]
    threads[0].start()
    while not group._leading:
        time.sleep(0.001)
    for t in threads[1:]:
        t.start()
    deadline = time.monotonic() + 10
    while len(group._pending) < len(works) - 1 and time.monotonic() < deadline:
        time.sleep(0.001)
    queued.set()
    for t in threads:
        t.join(10)
    return results


def stored(engine):
    with engine.connect() as conn:
        return set(conn.execute(select(late_failures.c.message_sid)).scalars())


def test_waiting_requests_share_one_transaction_and_get_their_own_results(engine):
    group = GroupCommit(engine)
    sids = [f"SM{i:032d}" for i in range(MAX_BATCH + 6)]
    assert run_together(group, [row(s) for s in sids]) == sids
    assert stored(engine) == set(sids)
    # The first alone; then a full batch of those that queued behind it; then the lead passes to the
    # oldest request still waiting, which commits the last six.
    assert len(engine.commits) == 3
    assert group._leading is False and group._pending == []


def test_a_refused_value_fails_only_its_own_request(engine):
    with writing(engine) as conn:
        row("SM" + "9" * 32)(conn)
    group = GroupCommit(engine)
    works = [row(f"SM{i:032d}") for i in range(5)] + [row("SM" + "9" * 32)] + [row(f"SM{i:032d}") for i in range(5, 9)]
    results = run_together(group, works)
    assert isinstance(results[5], IntegrityError)
    assert [r for i, r in enumerate(results) if i != 5] == [f"SM{i:032d}" for i in range(9)]
    assert stored(engine) == {f"SM{i:032d}" for i in range(9)} | {"SM" + "9" * 32}


def test_a_value_that_cannot_be_bound_fails_only_its_own_request(engine):
    """A lone surrogate (a JSON webhook's \\ud83d) fails in the driver, before the database sees it: that is
    the request's own value, not an outage, so the others in its batch must still land."""
    group = GroupCommit(engine)
    works = [row(f"SM{i:032d}") for i in range(4)] + [row("SM\ud83d")] + [row(f"SM{i:032d}") for i in range(4, 8)]
    results = run_together(group, works)
    assert isinstance(results[4], (StatementError, UnicodeError)) and not isinstance(results[4], DBAPIError)
    assert [r for i, r in enumerate(results) if i != 4] == [f"SM{i:032d}" for i in range(8)]
    assert stored(engine) == {f"SM{i:032d}" for i in range(8)}


def test_a_database_failure_is_every_waiting_requests_answer(engine):
    group = GroupCommit(engine)

    def broken(conn):
        raise OperationalError("INSERT", {}, Exception("disk I/O error"))

    results = run_together(group, [row("SM" + "1" * 32)] + [broken] + [row(f"SM{i:032d}") for i in range(3)])
    assert results[0] == "SM" + "1" * 32  # the first batch was its own
    assert all(isinstance(r, OperationalError) for r in results[1:])
    assert stored(engine) == {"SM" + "1" * 32}


def test_many_threads_without_coordination_all_land(engine):
    group = GroupCommit(engine)
    sids = [f"SM{i:032d}" for i in range(200)]
    results = [None] * len(sids)
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, group.run(row(sids[i]))))
               for i in range(len(sids))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == sids and stored(engine) == set(sids)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(late_failures)).scalar_one() == 200
    assert group._leading is False and group._pending == []



def test_a_waiter_that_dies_after_being_handed_the_lead_passes_it_on(engine):
    # A waiting request interrupted (its worker shutting down) must not leave the queue without a leader.
    group = GroupCommit(engine)
    dying, later = group_commit._Job(row("SM" + "7" * 32)), group_commit._Job(row("SM" + "8" * 32))
    group._leading, group._pending = True, [dying, later]
    with group._mutex:
        group._pass_lead()  # what the previous leader does after its batch
    assert dying.lead and dying.done.is_set()
    group._abandon(dying)
    assert group._pending == [later] and later.lead and later.done.is_set()
    group._lead_once()  # what `later` does when it wakes
    assert stored(engine) == {"SM" + "8" * 32} and group._leading is False and group._pending == []
