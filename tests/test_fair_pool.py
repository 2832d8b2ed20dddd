"""proxy/fair_pool.py: callers waiting for a pooled connection are served in the order they came."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy.util import queue as sqla_queue

from proxy.fair_pool import HandOffQueue

ROOT = Path(__file__).resolve().parents[1]


def _waiting(queue: HandOffQueue, count: int) -> None:
    deadline = time.monotonic() + 10
    while len(queue._waiting) < count:
        assert time.monotonic() < deadline, "the waiter never got in line"
        time.sleep(0.001)


def _wait_in_line(queue: HandOffQueue, got: dict, name: str) -> threading.Thread:
    ahead = len(queue._waiting)
    thread = threading.Thread(target=lambda: got.__setitem__(name, queue.get(True, 10)))
    thread.start()
    _waiting(queue, ahead + 1)
    return thread


def test_a_connection_put_back_goes_to_the_one_waiting_not_to_one_asking_after():
    queue, got = HandOffQueue(2, use_lifo=True), {}
    waiter = _wait_in_line(queue, got, "waiting")
    queue.put("connection", False)
    # Asked before the waiter had run again: SQLAlchemy's own queue gave it the connection here.
    with pytest.raises(sqla_queue.Empty):
        queue.get(False)
    waiter.join(10)
    assert got == {"waiting": "connection"}


def test_waiters_are_served_in_the_order_they_came():
    queue, got = HandOffQueue(5), {}
    threads = [_wait_in_line(queue, got, f"waiter-{n}") for n in range(5)]
    for n in range(5):
        queue.put(f"connection-{n}", False)
    for thread in threads:
        thread.join(10)
    assert got == {f"waiter-{n}": f"connection-{n}" for n in range(5)}


def test_with_nobody_waiting_connections_are_queued_last_in_first_out():
    queue = HandOffQueue(3, use_lifo=True)
    for name in ("a", "b", "c"):
        queue.put(name, False)
    with pytest.raises(sqla_queue.Full):
        queue.put("d", False)  # QueuePool closes a connection beyond its size
    assert [queue.get(False) for _ in range(3)] == ["c", "b", "a"]


def test_a_wait_that_times_out_leaves_the_line():
    queue = HandOffQueue(2)
    with pytest.raises(sqla_queue.Empty):
        queue.get(True, 0.05)
    assert not queue._waiting
    queue.put("connection", False)  # not handed to a caller gone
    assert queue.get(False) == "connection"


def _under_gevent(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", "from gevent import monkey; monkey.patch_all()\n" + code],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


class _Interrupted(BaseException):
    """As gevent's Timeout (the judge's deadline on a window read) or a greenlet's kill: not an Exception."""


def _scripted_wait(monkeypatch, during_the_first_wait):
    """The first caller to wait runs `during_the_first_wait()` in place of waiting (what it returns is what the wait
    returned: True handed, False timed out; it may raise); any later caller waits for real."""
    from proxy import fair_pool

    scripted = []

    class Ready:
        def __init__(self):
            self.lock = threading.Lock()
            self.lock.acquire()

        def acquire(self, timeout=-1):
            if not scripted:
                scripted.append(self)
                return during_the_first_wait()
            return self.lock.acquire(timeout=timeout)

        def release(self):
            self.lock.release()

    class Waiter(fair_pool._Waiter):
        def __init__(self):
            self.ready, self.item = Ready(), None

    monkeypatch.setattr(fair_pool, "_Waiter", Waiter)


def test_a_wait_interrupted_just_after_a_connection_was_handed_over_passes_it_on(monkeypatch):
    """The interruption can land after put() handed the connection over and before the waiter ran again: the
    connection goes to the next in line, not away with the caller that left."""
    queue, got, behind = HandOffQueue(2), {}, []

    def handed_then_interrupted():
        behind.append(_wait_in_line(queue, got, "behind"))
        queue.put("connection", False)
        raise _Interrupted()

    _scripted_wait(monkeypatch, handed_then_interrupted)
    with pytest.raises(_Interrupted):
        queue.get(True, 10)
    behind[0].join(10)
    assert got == {"behind": "connection"}
    assert not queue._waiting and queue.qsize() == 0


def test_a_connection_handed_to_an_interrupted_caller_with_the_queue_full_is_kept_without_waiting(monkeypatch):
    """Nobody left in line and the queue filled meanwhile: QueuePool's put() would wait for room that no get() ever
    makes, and the interrupted request hung there for good, its connection lost to the pool."""
    queue = HandOffQueue(1)

    def handed_then_full_then_interrupted():
        queue.put("handed", False)  # to the caller waiting
        queue.put("returned", False)  # nobody waits now: into the queue, which is full
        raise _Interrupted()

    _scripted_wait(monkeypatch, handed_then_full_then_interrupted)
    outcome = []

    def caller():
        try:
            queue.get(True, 10)
        except _Interrupted:
            outcome.append("interrupted")

    thread = threading.Thread(target=caller, daemon=True)
    thread.start()
    thread.join(10)
    assert outcome == ["interrupted"]
    assert sorted(queue.get(False) for _ in range(2)) == ["handed", "returned"]  # both kept, none lost


def test_a_wait_that_times_out_as_a_connection_is_handed_over_takes_it(monkeypatch):
    queue = HandOffQueue(2)

    def handed_as_the_wait_timed_out():
        queue.put("connection", False)
        return False

    _scripted_wait(monkeypatch, handed_as_the_wait_timed_out)
    assert queue.get(True, 0.05) == "connection"
    assert not queue._waiting and queue.qsize() == 0


def test_a_connection_returned_while_the_caller_joins_the_line_is_not_left_idle(monkeypatch):
    """A garbage collection can run a lost connection's weakref callback (its return to the pool, put()) at any
    allocation, also inside get(): a connection queued just before the caller was in line was left idle while the
    caller waited for a hand-over."""
    from proxy import fair_pool

    queue = HandOffQueue(2)
    original_append = fair_pool.deque.append

    class Line(fair_pool.deque):
        def append(self, waiter):
            queue.put("returned meanwhile", False)  # the callback, before the caller is in the line
            original_append(self, waiter)

    queue._waiting = Line()
    assert queue.get(True, 0.5) == "returned meanwhile"
    assert not queue._waiting and queue.qsize() == 0


def test_a_connection_returned_while_the_callers_place_in_line_is_made_is_not_left_idle(monkeypatch):
    from proxy import fair_pool

    queue = HandOffQueue(2)

    class Waiter(fair_pool._Waiter):
        def __init__(self):
            queue.put("returned meanwhile", False)  # a collection at the allocation: the callback runs first
            super().__init__()

    monkeypatch.setattr(fair_pool, "_Waiter", Waiter)
    assert queue.get(True, 0.5) == "returned meanwhile"
    assert not queue._waiting and queue.qsize() == 0


def test_a_pooled_connection_returned_and_asked_for_again_at_once_goes_to_the_callers_already_waiting():
    """A gevent worker: a request returns its connection and the next code to run asks for one (a new request's
    window read) before the waiting greenlets run. QueuePool's own queue gave it that connection, every time."""
    out = _under_gevent(
        "import gevent, tempfile, os\n"
        "from proxy.db import make_engine\n"
        "engine = make_engine('sqlite:///' + os.path.join(tempfile.mkdtemp(), 'p.sqlite3'), pool_size=1)\n"
        "order = []\n"
        "def use(name):\n"
        "    with engine.connect() as conn:\n"
        "        order.append(name)\n"
        "        conn.exec_driver_sql('select 1')\n"
        "holder = engine.connect()\n"
        "waiting = [gevent.spawn(use, f'waiter-{n}') for n in range(3)]\n"
        "gevent.sleep(0.01)  # all three in line for the only connection\n"
        "holder.close()\n"
        "use('asked-after')  # no yield between: the waiters have not run yet\n"
        "gevent.joinall(waiting, timeout=10)\n"
        "print(' '.join(order), engine.pool.checkedin(), engine.pool.checkedout())\n")
    assert out == "waiter-0 waiter-1 waiter-2 asked-after 1 0"  # and the one connection back in the pool


def test_the_pools_own_log_lines_stay_sqlalchemys(tmp_path):
    """Not the proxy's JSON log lines ("Pool disposed", "Pool recreating" as events): SQLAlchemy's logger, as for
    its own QueuePool."""
    from proxy.db import make_engine

    engine = make_engine(f"sqlite:///{tmp_path / 'p.sqlite3'}")
    assert engine.pool.logger.name == "sqlalchemy.pool.impl.QueuePool"
    engine.dispose()


def test_a_waiting_greenlet_whose_deadline_fires_leaves_the_line_and_the_pool_whole():
    """The judge's deadline on a window read (gevent's Timeout) can fire while the request waits for a connection."""
    out = _under_gevent(
        "import gevent, tempfile, os\n"
        "from proxy.db import make_engine\n"
        "engine = make_engine('sqlite:///' + os.path.join(tempfile.mkdtemp(), 'p.sqlite3'), pool_size=1)\n"
        "holder = engine.connect()\n"
        "def read_within(seconds):\n"
        "    try:\n"
        "        with gevent.Timeout(seconds), engine.connect() as conn:\n"
        "            return conn.exec_driver_sql('select 1').scalar()\n"
        "    except gevent.Timeout:\n"
        "        return 'gave up'\n"
        "late = gevent.spawn(read_within, 0.05)\n"
        "patient = gevent.spawn(read_within, 10)\n"
        "gevent.sleep(0.2)  # the first gave up meanwhile\n"
        "holder.close()\n"
        "gevent.joinall([late, patient], timeout=10)\n"
        "print(late.value, patient.value, len(engine.pool._pool._waiting), engine.pool.checkedin(),"
        " engine.pool.checkedout())\n")
    assert out == "gave up 1 0 1 0"
