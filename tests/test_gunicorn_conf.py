"""gunicorn.conf.py: the worker model it picks and what each worker does once the app is loaded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CONF = Path(__file__).resolve().parents[1] / "gunicorn.conf.py"


def _run(code: str, env: dict | None = None) -> str:
    # In a child process: the hooks change process-wide state (the garbage collector).
    prelude = f"import runpy; conf = runpy.run_path({str(CONF)!r})\n"
    done = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=60,
                          env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_worker_freezes_the_loaded_app_out_of_the_garbage_collectors_reach():
    out = _run("import gc, weakref\n"
               "class Node: pass\n"
               "before = gc.get_freeze_count()\n"
               "node = Node(); node.me = node; alive = weakref.ref(node); del node  # freed only by a collection\n"
               "import logging, types\n"
               "error_log = logging.getLogger('gunicorn.error.test')\n"
               "conf['post_worker_init'](types.SimpleNamespace(log=types.SimpleNamespace(error_log=error_log)))\n"
               "print(before, gc.get_freeze_count(), alive() is None, len(error_log.filters))")
    before, frozen, collected, filters = out.split()
    assert int(before) == 0
    assert int(frozen) > 1000  # the interpreter's and the config's objects, now outside full collections
    assert collected == "True"  # garbage was collected before the freeze, not kept for good
    assert filters == "1"  # gunicorn's warnings about requests it cannot read are filtered (test_raw_http.py)


def test_a_gevent_worker_accepts_up_to_ten_waiting_connections_a_wakeup_not_one():
    """gunicorn has each of several gevent workers accept one connection a wakeup, and a saturated worker wakes once
    a turn of its loop (~90 ms): 256 clients connecting at once waited up to 7 s to be accepted (gunicorn.conf.py)."""
    out = _run("import logging, socket, types\n"
               "from gevent.pool import Pool\n"
               "from gevent.socket import socket as green_socket\n"
               "from gunicorn.workers import ggevent\n"
               "worker = ggevent.GeventWorker.__new__(ggevent.GeventWorker)\n"
               "worker.log = types.SimpleNamespace(error_log=logging.getLogger('gunicorn.error.test'))\n"
               "conf['post_worker_init'](worker)\n"
               "listener = green_socket(); listener.bind(('127.0.0.1', 0)); listener.listen(64)\n"
               "pool = Pool(1000)\n"
               "server = ggevent.StreamServer(listener, handle=lambda sock, address: sock.close(), spawn=pool)\n"
               "server.max_accept = 1  # as GeventWorker.run() sets it when there are several workers\n"
               "server.start()\n"
               "clients = [socket.create_connection(listener.getsockname(), timeout=10) for _ in range(15)]\n"
               "server._do_read()  # what one wakeup of the listening socket runs\n"
               "print(len(pool), 'StreamServer' in ggevent.GeventWorker.run.__code__.co_names)\n")
    # Ten accepted, their handlers spawned; and the worker's run() builds its servers from the name replaced.
    assert out == "10 True"


@pytest.mark.parametrize("message, kept, gone", [
    ("Invalid request from ip=127.0.0.1: Invalid HTTP request line: 'POST /x?To=whatsapp:+14155550111'",
     "Invalid request from ip=127.0.0.1: Invalid HTTP request line: …", ["4155550111", "To="]),
    ("Invalid request from ip=::1: Invalid HTTP Header: 'Authorization Basic QUMwMTIzOnNlY3JldA=='",
     "Invalid request from ip=::1: Invalid HTTP Header: …", ["QUMw"]),
    ("Invalid request from ip=10.0.0.7: Request Line is too large (5142 > 4094)",
     "Invalid request from ip=10.0.0.7: Request Line is too large (5142 > 4094)", []),
    ("Booting worker with pid: 123456", "Booting worker with pid: 123456", []),  # other lines untouched
])
def test_gunicorns_warning_keeps_what_was_wrong_never_what_was_sent(message, kept, gone):
    out = _run("import logging\n"
               "record = logging.LogRecord('gunicorn.error', logging.WARNING, 'gunicorn', 1, " + repr(message) + ", None, None)\n"
               "assert conf['_RequestLinesUnquoted']().filter(record)\n"
               "print(record.getMessage())")
    assert out == kept and not [text for text in gone if text in out]


def test_worker_class_is_gevent_unless_the_environment_says_otherwise():
    import os

    assert _run("print(conf['worker_class'])", {**os.environ, "WEB_WORKER_CLASS": ""}) == "gevent"
    assert _run("print(conf['worker_class'])", {**os.environ, "WEB_WORKER_CLASS": "gthread"}) == "gthread"


def test_workers_are_web_concurrency_else_one_per_core_at_most_4_on_postgresql():
    import os

    code = "import os; print(conf['_workers'](), len(os.sched_getaffinity(0)))"
    base = {k: v for k, v in os.environ.items() if k not in ("WEB_CONCURRENCY", "DATABASE_URL")}
    sqlite, cores = map(int, _run(code, base).split())
    assert sqlite == cores  # one per core
    assert _run(code, {**base, "DATABASE_URL": "sqlite:////tmp/x.sqlite3"}).split()[0] == str(cores)
    # PostgreSQL: the same, but never more than 4 (10 pooled connections each under max_connections=100)
    assert _run(code, {**base, "DATABASE_URL": "postgres://u@db/proxy"}).split()[0] == str(min(cores, 4))
    assert _run(code, {**base, "DATABASE_URL": "postgresql+psycopg://u@db/proxy"}).split()[0] == str(min(cores, 4))
    many = "import os; os.sched_getaffinity = lambda pid: set(range(32)); print(conf['_workers']())"
    assert _run(many, {**base, "DATABASE_URL": "postgres://u@db/proxy"}) == "4"
    assert _run(many, base) == "32"
    # One core, one worker: two took turns on it, at a third fewer sends/s and a p99 of 6 s (bench/README.md).
    one = "import os; os.sched_getaffinity = lambda pid: {0}; print(conf['_workers']())"
    assert _run(one, base) == "1" and _run(one, {**base, "DATABASE_URL": "postgres://u@db/proxy"}) == "1"
    assert _run(code, {**base, "DATABASE_URL": "postgres://u@db/proxy", "WEB_CONCURRENCY": " 3 "}).split()[0] == "3"


def _refused(env: dict, *command: str) -> str:
    """stderr of a start the configuration refuses: one line naming the variable, no traceback."""

    base = {k: v for k, v in os.environ.items() if k not in ("WEB_CONCURRENCY", "WEB_THREADS", "WEB_WORKER_CLASS")}
    done = subprocess.run(list(command) or [sys.executable, "-c", f"import runpy; runpy.run_path({str(CONF)!r})"],
                          capture_output=True, text=True, timeout=60, env={**base, **env}, cwd=CONF.parent)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    return done.stderr


@pytest.mark.parametrize("env, variable", [
    ({"WEB_CONCURRENCY": "0"}, "WEB_CONCURRENCY"),  # gunicorn itself would run a master with no worker
    ({"WEB_CONCURRENCY": "-1"}, "WEB_CONCURRENCY"),
    ({"WEB_CONCURRENCY": "2.5"}, "WEB_CONCURRENCY"),
    ({"WEB_THREADS": "0"}, "WEB_THREADS"),  # a gthread worker with no thread fails to boot
    ({"WEB_THREADS": "many"}, "WEB_THREADS"),
    # A typo's million workers were forked (review, session 15).
    ({"WEB_CONCURRENCY": "1000000"}, "WEB_CONCURRENCY"),
    ({"WEB_THREADS": "100000"}, "WEB_THREADS"),
    ({"WEB_WORKER_CLASS": "gevnet"}, "WEB_WORKER_CLASS"),
])
def test_a_bad_worker_setting_stops_the_start_with_one_line_naming_it(env, variable):
    err = _refused(env)
    assert err.startswith(f"whatsapp-window-proxy: configuration error: {variable} must be"), err
    assert repr(next(iter(env.values()))) in err


def test_gunicorn_shows_the_refusal_as_it_is(tmp_path):
    """gunicorn prints a traceback for an exception in its config file; the refusal must get through as one line
    (and before it, WEB_CONCURRENCY=0 passed gunicorn's own check: a master with no worker, serving nothing)."""
    from tests.conftest import ACCOUNT_SID, AUTH_TOKEN

    err = _refused({"WEB_CONCURRENCY": "0", "TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
                    "DATABASE_URL": f"sqlite:///{tmp_path / 'proxy.sqlite3'}"},
                   sys.executable, "-m", "gunicorn", "-c", str(CONF), "--check-config", "proxy:create_app()")
    assert "WEB_CONCURRENCY must be" in err


@pytest.mark.parametrize("env, variable", [
    ({"TWILIO_ACCOUNT_SID": "", "TWILIO_AUTH_TOKEN": ""}, "TWILIO_ACCOUNT_SID"),
    ({"SESSION_WINDOW_SECONDS": "0"}, "SESSION_WINDOW_SECONDS"),
    ({"SESSION_WINDOW_SECONDS": "abc"}, "SESSION_WINDOW_SECONDS"),
    ({"PROMETHEUS_MULTIPROC_DIR": "/proc/nope"}, "PROMETHEUS_MULTIPROC_DIR"),  # a traceback, not naming it
    ({"PROMETHEUS_MULTIPROC_DIR": "/etc/passwd"}, "PROMETHEUS_MULTIPROC_DIR"),
    ({"PROMETHEUS_MULTIPROC_DIR": "/proc/self"}, "PROMETHEUS_MULTIPROC_DIR"),  # there, but nothing can be written
])
def test_an_invalid_proxy_setting_stops_gunicorn_rather_than_restarting_its_workers(tmp_path, env, variable):
    """The proxy's own settings are read as each worker loads the app. A worker exiting with a code gunicorn
    does not know is restarted, so the Procfile's command kept a port open and booted workers forever."""
    from proxy.sandbox.cli import procfile_command
    from tests.conftest import ACCOUNT_SID, AUTH_TOKEN

    base = {k: v for k, v in os.environ.items() if not k.startswith(("WEB_", "TWILIO_", "SESSION_"))}
    full = {**base, "TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
            "DATABASE_URL": f"sqlite:///{tmp_path / 'proxy.sqlite3'}", "PORT": "0", "WEB_CONCURRENCY": "4", **env,
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    command = procfile_command("web").replace("0.0.0.0:", "127.0.0.1:")
    try:
        # The bound is a guard against a hang, not a measurement: the master stops at the first worker's exit.
        done = subprocess.run(["bash", "-c", f"exec {command}"], capture_output=True, text=True, timeout=60,
                              env=full, cwd=CONF.parent)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"gunicorn kept running: {(exc.stderr or b'')[-1500:]!r}")
    # Read before any worker starts (gunicorn.conf.py): with four workers failing on it at once, gunicorn 27's
    # master raised its own HaltServer a second time while stopping and printed tracebacks.
    assert done.returncode == 2, done.stderr[-1500:]
    refusals = [line for line in done.stderr.splitlines() if "configuration error" in line]
    assert len(refusals) == 1 and variable in refusals[0], done.stderr[-1500:]
    assert "Traceback" not in done.stderr and "Booting worker" not in done.stderr, done.stderr[-1500:]


def _gunicorn(tmp_path, port: int, **env) -> subprocess.Popen:
    """The Procfile's web command on 127.0.0.1 with its own HOME and TMPDIR, so what it leaves there can be seen."""
    from proxy.sandbox.cli import procfile_command
    from tests.conftest import ACCOUNT_SID, AUTH_TOKEN

    for name in ("home", "tmp"):
        (tmp_path / name).mkdir(exist_ok=True)
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("WEB_", "TWILIO_", "PROMETHEUS_", "XDG_")) and k not in ("HOME", "TMPDIR")}
    full = {**base, "TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
            "DATABASE_URL": f"sqlite:///{tmp_path / 'proxy.sqlite3'}", "PORT": str(port), "WEB_CONCURRENCY": "2",
            "HOME": str(tmp_path / "home"), "TMPDIR": str(tmp_path / "tmp"), **env,
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    command = procfile_command("web").replace("0.0.0.0:", "127.0.0.1:")
    return subprocess.Popen(["bash", "-c", f"exec {command}"], env=full, cwd=CONF.parent,
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "gunicorn.log", "w"))


def _serve_metrics_then_stop(tmp_path, **env) -> dict[Path, list[Path]]:
    """Start, have /metrics answered and a webhook counted, stop; the metrics directories in TMPDIR while it ran, with their sample files."""
    import time

    import requests

    from tests.conftest import basic_auth
    from tests.e2e.conftest import free_port

    port = free_port()
    server = _gunicorn(tmp_path, port, **env)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "gunicorn.log").read_text()
            try:
                if requests.get(f"http://127.0.0.1:{port}/metrics", headers=basic_auth(), timeout=5).ok:
                    # Counted (an unsigned webhook): the worker writes its sample file.
                    assert requests.post(f"http://127.0.0.1:{port}/twilio/inbound", timeout=30).status_code == 403
                    break
            except (requests.ConnectionError, requests.Timeout):  # not listening yet, or a busy machine's first answer
                pass
            time.sleep(0.1)
        time.sleep(1)  # gunicorn starts its control server once the workers are forked
        running = {path: sorted(path.glob("*.db")) for path in (tmp_path / "tmp").glob("proxy-metrics-*")}
        assert not (tmp_path / "home" / ".gunicorn").exists(), "a control socket shared by every gunicorn"
    finally:
        server.terminate()
        assert server.wait(30) == 0, (tmp_path / "gunicorn.log").read_text()
    return running


def test_the_metrics_directory_gunicorn_made_is_removed_when_it_stops(tmp_path):
    """One proxy-metrics-* directory was left in the temp directory by every start (1,700 on one host)."""
    running = _serve_metrics_then_stop(tmp_path)
    assert len(running) == 1 and list(running.values())[0], running  # the workers' sample files
    assert not list((tmp_path / "tmp").glob("proxy-metrics-*"))


def test_a_metrics_directory_the_operator_set_is_kept(tmp_path):
    given = tmp_path / "metrics"
    assert _serve_metrics_then_stop(tmp_path, PROMETHEUS_MULTIPROC_DIR=str(given)) == {}
    assert given.is_dir() and list(given.glob("*.db"))  # its counters, left for the operator


def test_the_metrics_directory_is_removed_when_gunicorn_cannot_start(tmp_path):
    """A port in use ends gunicorn's start before its on_exit hook could run."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = _gunicorn(tmp_path, taken.getsockname()[1])
        assert server.wait(60) != 0
    assert "Address already in use" in (tmp_path / "gunicorn.log").read_text()
    assert not list((tmp_path / "tmp").glob("proxy-metrics-*"))


def test_gunicorn_makes_no_control_socket():
    """gunicorn 25.1+ binds $XDG_RUNTIME_DIR/gunicorn.ctl (else ~/.gunicorn/gunicorn.ctl) for gunicornc: one path
    for every instance on the host, so a second instance replaced the first's. The proxy does not use it."""
    assert _run("print(conf['control_socket_disable'])") == "True"


def test_on_exit_removes_only_the_directory_gunicorn_made(tmp_path):
    made, given = tmp_path / "proxy-metrics-made", tmp_path / "given"
    for path in (made, given):
        path.mkdir()
        (path / "counter_1.db").write_bytes(b"")
    _run("import types\n"
         f"conf['on_exit'](types.SimpleNamespace(proxy_metrics_dir={str(made)!r}))\n"
         "conf['on_exit'](types.SimpleNamespace())  # PROMETHEUS_MULTIPROC_DIR was the operator's")
    assert not made.exists() and given.is_dir()


def test_clients_keeping_their_end_open_after_connection_close_do_not_stall_a_gthread_worker(tmp_path):
    """gunicorn's gthread worker lingered on each `Connection: close` socket (up to 2 s, until the client closed
    its end) on its event-loop thread: twenty such clients, no credentials needed, froze every connection of the
    worker for 40 s. Now the lingering runs beside the loop, and the next request is answered meanwhile."""
    import socket
    import time

    import requests

    from tests.e2e.conftest import free_port

    port = free_port()
    server = _gunicorn(tmp_path, port, WEB_WORKER_CLASS="gthread", WEB_CONCURRENCY="1", WEB_THREADS="8")
    lingering = []
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "gunicorn.log").read_text()
            try:
                if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).ok:
                    break
            except (requests.ConnectionError, requests.Timeout):
                pass
            time.sleep(0.1)
        for _ in range(20):  # all at once: each is answered, then the worker lingers until its client closes
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n")
            lingering.append(sock)
        # 20 x 2 s on the loop thread before: this request waited ~40 s for its turn.
        assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=15).ok
        assert all(sock.recv(65536).startswith(b"HTTP/1.1 200") for sock in lingering)
    finally:
        for sock in lingering:
            sock.close()
        server.terminate()
        assert server.wait(30) == 0, (tmp_path / "gunicorn.log").read_text()
