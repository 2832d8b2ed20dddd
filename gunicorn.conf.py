"""gunicorn reads this file from the working directory: the worker model, and /metrics across workers.

The Procfile's flags (threads, timeouts) override what is set here; the number of workers is
WEB_CONCURRENCY, else one per core, at most 4 on PostgreSQL (`_workers`). The worker class is
gevent (numbers in README.md "Performance"): a send waiting on Twilio costs a greenlet, not a thread,
and no GIL hand-offs; with SQLite too, where it measured 517 vs 355 sends/s and 786 vs 656 inbound
webhooks/s against gthread (one run each, 4 workers). WEB_WORKER_CLASS=gthread is the alternative
(tested in CI): a SQLite call then blocks one thread rather than one worker's every greenlet.

An invalid WEB_CONCURRENCY, WEB_THREADS or WEB_WORKER_CLASS stops the start with one line naming it,
as proxy/settings.py does for the proxy's own variables.
"""

import atexit
import gc
import glob
import json
import logging
import os
import re
import shutil
import sys
import tempfile

from gunicorn import util as _gunicorn_util

WORKER_CLASSES = ("gevent", "gthread")  # the two README.md documents and CI runs


def _refuse(message: str):
    # gunicorn prints a traceback for an exception raised here ("Failed to read config file"), but lets
    # SystemExit through: the operator sees this one line.
    sys.stderr.write(f"whatsapp-window-proxy: configuration error: {message}\n")
    raise SystemExit(2)


# Far above any useful value, and below what forks a machine to a halt by a typo (WEB_CONCURRENCY=1000000).
MAXIMUM = {"WEB_CONCURRENCY": 128, "WEB_THREADS": 4096}


def _positive_int(environ, name: str) -> int | None:
    raw = environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= MAXIMUM[name]:
        _refuse(f"{name} must be a whole number from 1 to {MAXIMUM[name]}, got {raw!r}.")
    return value


def _worker_class(environ=os.environ) -> str:
    name = environ.get("WEB_WORKER_CLASS", "").strip() or "gevent"
    if name not in WORKER_CLASSES:
        _refuse(f"WEB_WORKER_CLASS must be one of {', '.join(WORKER_CLASSES)}, got {name!r}.")
    return name


def _workers(environ=os.environ) -> int:
    """WEB_CONCURRENCY, else one worker per core, and on PostgreSQL at most 4. SQLite: writes take turns on one
    file, and on 2 cores 2 gevent workers did 10-20% more sends/s and 20-30% more inbound webhooks/s than 4 at
    ~15% less CPU per request, A/B alternating (bench/README.md). PostgreSQL had 4 until its webhooks' writes were
    committed together (session 10): since then 2 did ~20% more inbound webhooks/s than 4 on 2 cores (p99
    101-112 vs 123-160 ms) and as many sends/s. Not two on one core, as it was ("so one restarting worker never
    leaves none": gunicorn's listening socket keeps a restarting worker's connections waiting, it refuses none):
    on one dedicated core (BENCH_SERVER_CPUS=1) two workers did 332-357 sends/s at a p99 of 5.7-6.2 s and one
    did 444 at 0.87 s; inbound 744 vs 863 webhooks/s. The cap: each worker pools up to 10 connections, and
    4 x 10 stays under PostgreSQL's default max_connections of 100 with room for a worker process and a second
    instance, however many cores a container sees (sched_getaffinity ignores CPU quotas)."""
    configured = _positive_int(environ, "WEB_CONCURRENCY")  # 0 would leave a master with no worker
    if configured:
        return configured
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if environ.get("DATABASE_URL", "").strip().lower().startswith("postgres"):
        return min(max(1, cores), 4)
    return max(1, cores)


worker_class = _worker_class()
workers = _workers()
# The Procfile passes --threads ${WEB_THREADS:-64}, which overrides any setting here; gunicorn refuses a
# non-number itself, but 0 only fails later, in every gthread worker's boot.
_positive_int(os.environ, "WEB_THREADS")
# gunicorn 25.1+ serves `gunicornc` on $XDG_RUNTIME_DIR/gunicorn.ctl, else ~/.gunicorn/gunicorn.ctl: one path for
# every instance a user runs on the host, so a second instance took over the first's (and the first to stop
# removed the other's). The proxy never uses it; off, no instance can be managed through another's socket.
# (Older gunicorn ignores the name.)
control_socket_disable = True


def _check_proxy_settings():
    """Read the proxy's own settings once, before any worker starts: a bad one is one line and exit 2.

    Each worker reads them too, as it loads the app; when several failed at once gunicorn's master raised
    its HaltServer a second time while stopping, and printed tracebacks. A forked child reads them
    here, because the master itself must not import the app (gevent patches the standard library in
    each worker, after the fork).
    """
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            from proxy.settings import ConfigError, Settings

            Settings.from_env()
        except ConfigError as exc:
            sys.stderr.write(f"whatsapp-window-proxy: configuration error: {exc}\n")
            code = 2
        except BaseException:  # noqa: BLE001 — anything else is the workers' to report, with its traceback
            pass
        finally:
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) == 2:
        raise SystemExit(2)


def on_starting(server):
    _check_proxy_settings()
    # prometheus-client's multiprocess mode: every worker writes its samples to files in this
    # directory, and /metrics sums them. A stale directory would carry counts of old workers.
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        path = tempfile.mkdtemp(prefix="proxy-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
        # Removed when the master exits (one was left behind by every start); an operator's own is kept. On the
        # server, not in this module: a reload (SIGHUP) reads this file again, the server stays.
        server.proxy_metrics_dir = path
        # on_exit runs only on gunicorn's orderly way out; a start that fails after here (a port in use) exits
        # without it. Workers are forks that run atexit too: only this process removes it.
        atexit.register(_remove_metrics_dir, path, os.getpid())
    else:
        try:
            os.makedirs(path, exist_ok=True)
            for stale in glob.glob(os.path.join(path, "*.db")):
                os.remove(stale)
            # Written into, not only there: a read-only one let every create reach Twilio, then failed its answer
            # with a 500 (counting its duration) before its attempt was recorded.
            with tempfile.NamedTemporaryFile(dir=path, prefix=".writable-"):
                pass
        except OSError as exc:
            _refuse(f"PROMETHEUS_MULTIPROC_DIR must be a directory this process can write, got {path!r} "
                    f"({exc.strerror or type(exc).__name__}).")


def on_exit(server):
    path = getattr(server, "proxy_metrics_dir", None)
    if path:  # every worker has stopped by now
        _remove_metrics_dir(path, os.getpid())


def _remove_metrics_dir(path: str, master_pid: int) -> None:
    if os.getpid() == master_pid:
        shutil.rmtree(path, ignore_errors=True)


def _twilio_shaped_error(sock, status_int, reason, mesg):
    """gunicorn's own answer to a request it cannot read as HTTP (a request line over 4 KiB, a header over 8 KiB,
    two Content-Lengths, a control character in a header): Twilio's error shape in JSON, as every other answer of
    the proxy, instead of an HTML page a Twilio client cannot read. `mesg` is not repeated: it may quote the
    request line, query string and all."""
    body = json.dumps({"code": status_int, "status": status_int,
                       "message": f"{reason}: the request could not be read as HTTP; nothing was judged or sent.",
                       "more_info": "https://www.twilio.com/docs/api/errors"}).encode()
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1")
    _gunicorn_util.write_nonblock(sock, head + body)


# Every worker class calls gunicorn.util.write_error through the module (workers/base.py handle_error): replaced
# here, in the master before the workers fork, it is replaced in all of them.
_gunicorn_util.write_error = _twilio_shaped_error


def _linger_off_the_event_loop(worker) -> None:
    """gunicorn's gthread worker (27) closes a `Connection: close` socket gracefully (RFC 9112 9.6: half-close,
    then read until the client closes its end, up to 2 s) on its event-loop thread: a client keeping its end open
    froze every connection of the worker for 2 s, twenty of them for 40 s, with no credentials needed. The
    lingering runs on a few daemon threads of the worker's own instead (a process that exits drops what is left)."""
    import queue
    import socket
    import threading

    from gunicorn.workers import gthread

    close_graceful = getattr(_gunicorn_util, "close_graceful", None)
    if close_graceful is None or not isinstance(worker, gthread.ThreadWorker):
        return  # another worker class, or a gunicorn that closes at once
    waiting: queue.SimpleQueue = queue.SimpleQueue()

    def linger():
        while True:
            sock = waiting.get()
            try:
                close_graceful(sock)
            except Exception:  # noqa: BLE001 — one socket's trouble must not end the lingering for all
                pass

    for n in range(4):
        threading.Thread(target=linger, name=f"linger-{n}", daemon=True).start()
    plain_close = gthread.TConn.close

    def close(conn, graceful=False):
        if not graceful:
            return plain_close(conn)
        conn.sock.setblocking(True)
        try:  # the end of the answer said at once (close_graceful says it again, harmlessly), the wait queued
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        waiting.put(conn.sock)

    gthread.TConn.close = close


class _RequestLinesUnquoted(logging.Filter):
    """gunicorn's warning for a request it cannot read quotes what it could not read (`Invalid HTTP request line:
    'POST /…?To=whatsapp:+1415…'`, a header line without its colon, `Authorization Basic …` and all): a number or
    a credential may be in it, and no log line may hold one. Kept: who sent it and what was wrong; whatever
    gunicorn quoted becomes `…`, and a number (five digits or more, punctuated or not) is starred."""

    def filter(self, record):
        if isinstance(record.msg, str) and record.msg.startswith("Invalid request from ip="):
            who, sep, error = record.msg.partition(": ")
            error = _QUOTED.sub("…", _QUERY.sub("?…", error))
            record.msg = who + sep + _NUMBER_LIKE.sub(lambda run: "*" * len(run.group()), error)
        return True


_QUOTED = re.compile(r"""['"].*\Z""", re.S)  # from the first quote on: repr() picks either kind
_QUERY = re.compile(r"\?.*\Z", re.S)
_NUMBER_LIKE = re.compile(r"\+?\d(?:[\s\-().]*\d){4,}")  # as proxy/addresses.py reads a number


# gunicorn's gevent worker, when there are several, accepts one connection each time its listening socket wakes it,
# so that one worker does not take every waiting connection. It is woken once a turn of its event loop, and a
# saturated worker's turn is every ready greenlet's work: ~90 ms with 128 connections a worker. Under the gateway
# benchmark's 256 clients, connections waited in the kernel's accept queue for up to 7 s (130 queued, one accepted
# a turn): p99 4.7-6.5 s, where the requests themselves took at most 1.3 s inside the app. Ten a wakeup, alternating
# with one: p99 1.1-1.4 s, the queue empty within 2 s, and the connections still even between the workers (127/129,
# 123/133); a hundred (gevent's default) emptied it as fast but left one worker with twice the other's (83/173).
ACCEPTS_PER_WAKEUP = 10


def _accept_in_batches(worker) -> None:
    ggevent = sys.modules.get("gunicorn.workers.ggevent")  # imported only by a gevent worker: no gevent otherwise
    if ggevent is None or not isinstance(worker, ggevent.GeventWorker):
        return

    class StreamServer(ggevent.StreamServer):
        def start(self):
            # gunicorn sets max_accept = 1 between building the server and starting it (workers/ggevent.py run).
            self.max_accept = max(self.max_accept, ACCEPTS_PER_WAKEUP)
            super().start()

    ggevent.StreamServer = StreamServer  # the name the worker's run() builds its servers from


def post_worker_init(worker):
    worker.log.error_log.addFilter(_RequestLinesUnquoted())
    _linger_off_the_event_loop(worker)
    _accept_in_batches(worker)
    # The app's ~100k objects (Flask, SQLAlchemy, twilio, ...) live as long as the worker. Python's
    # full collections traversed them all: 55-130 ms each under load, several per worker every 10 s,
    # and a gevent worker answers nothing meanwhile (the gateway's max latency at 200 sends/s was
    # +80-110 ms over direct in every run). Frozen, a full collection sees only what requests
    # created: ~1 ms (bench/README.md). Collected first, so no garbage is kept for good.
    gc.collect()
    gc.freeze()


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def worker_exit(server, worker):
    # Send-attempt records still queued in this worker's writer go to the database before it exits
    # (atexit does it too; this runs first and inside gunicorn's graceful timeout).
    from proxy.attempts import flush_at_exit

    flush_at_exit(5.0)
