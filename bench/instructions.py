"""Instructions a webhook or a send costs a gunicorn worker, counted by valgrind's callgrind: the same on every run.

The other benchmarks time requests, and on this shared 2-core machine the same code's requests/s move by ±15% from
one run to the next; a change worth 5% cannot be seen there. This one serves each app with the Procfile's web command
and one worker under `valgrind --tool=callgrind`, sends a warm-up, then counts the instructions the worker executes
for N requests sent one after another on one keep-alive connection (bench/callgrind_app.py marks the stretch). Runs
of the same code agree to 0.3%.

What is counted: everything the worker runs in user space (gunicorn, gevent, Flask, the proxy, twilio-python, the
database driver, SQLite's library). What is not: the kernel's time (system calls, loopback), cache misses, and the
PostgreSQL server's own work. So a ratio of counts is the CPU ratio if every instruction cost the same; the
wall-clock benchmarks say what it comes to. Requests one at a time: webhooks are not committed together
(proxy/group_commit.py) as under load, and each send's attempt row is stored before the next send (RowsStored), so
the proxy's database writes are counted at their dearest.

    PYTHONPATH=. [BENCH_POSTGRES_URL=postgresql://...] python -m bench.instructions
Knobs: BENCH_INSTRUCTIONS_REQUESTS (300 counted), BENCH_INSTRUCTIONS_WARMUP (150), BENCH_DATABASES.
Needs valgrind and a C compiler with valgrind's headers (Debian: valgrind, gcc); without them it says so and stops.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import gateway, inbound, status
from bench.common import (Gunicorn, Subprocess, database_url, databases_from_env, free_port, open_windows, table,
                          write_result)

REQUESTS = int(os.environ.get("BENCH_INSTRUCTIONS_REQUESTS", "300"))
WARMUP = int(os.environ.get("BENCH_INSTRUCTIONS_WARMUP", "150"))
# Far longer than a request takes under valgrind (~100 ms), short enough that a stuck run ends.
REQUEST_TIMEOUT = 120.0

_MARKS_C = """
#include <valgrind/callgrind.h>
void bench_count_start(void) { CALLGRIND_START_INSTRUMENTATION; CALLGRIND_ZERO_STATS; }
void bench_count_stop(void) { CALLGRIND_DUMP_STATS_AT("measured"); CALLGRIND_STOP_INSTRUMENTATION; }
"""
_TOTALS = re.compile(rb"^totals: (\d+)", re.M)


def missing_tools() -> str | None:
    """Why this benchmark cannot run here, or None."""
    if not shutil.which("valgrind"):
        return "valgrind is not installed (Debian: apt-get install valgrind)"
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        return "no C compiler to build the counting marks (Debian: apt-get install gcc)"
    return None


def build_marks(workdir: Path) -> Path:
    """A shared library with callgrind's start and stop marks (client requests: C macros, not callable from Python)."""
    source, library = workdir / "marks.c", workdir / "libbenchmarks.so"
    source.write_text(_MARKS_C)
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    built = subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", str(library), str(source)],
                           capture_output=True, text=True)
    if built.returncode != 0:  # valgrind's headers missing, most likely (Debian ships them in `valgrind`)
        raise SystemExit(f"instructions: could not build the counting marks:\n{built.stderr.strip()}")
    return library


class Counted:
    """One app under gunicorn (one worker) under callgrind: `count(warm, measured)` is instructions per request."""

    def __init__(self, env: dict, app_spec: str, label: str, workdir: Path, marks: Path):
        self.out = workdir / f"callgrind-{label}"
        self.server = Gunicorn({**env, "WEB_CONCURRENCY": "1", "PYTHONHASHSEED": "0",
                                "BENCH_CALLGRIND_APP": app_spec, "BENCH_CALLGRIND_LIB": str(marks)},
                               app_spec="bench.callgrind_app:app", label=f"instructions-{label}",
                               wrap=f"valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file={self.out}.%p")

    def __enter__(self) -> "Counted":
        self.server.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.server.__exit__(*exc)

    @property
    def url(self) -> str:
        return self.server.url

    def count(self, warm: list, measured: list, *, ok: int = 200, settle=None) -> int:
        """Instructions per request of `measured`, sent after `warm` (not counted); `settle()`, when given, after each."""
        (worker,) = self.server.worker_pids()
        connection = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=REQUEST_TIMEOUT)
        try:
            _send(connection, warm, ok, settle)
            _send(connection, [("GET", "/__callgrind/start", {}, None)], 200)
            _send(connection, measured, ok, settle)
            _send(connection, [("GET", "/__callgrind/stop", {}, None)], 200)
        finally:
            connection.close()
        dump = Path(f"{self.out}.{worker}.1")
        match = _TOTALS.search(dump.read_bytes()) if dump.exists() else None
        if match is None:
            raise RuntimeError(f"callgrind wrote no counts to {dump}; the server's log: {self.server.log_path}")
        return round(int(match.group(1)) / len(measured))


def _send(connection: http.client.HTTPConnection, requests: list, ok: int, settle=None) -> None:
    for method, path, headers, body in requests:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        answer = response.read()
        if response.status != ok:  # a count of refusals would measure the wrong path
            raise RuntimeError(f"{method} {path}: {response.status} {answer[:300]!r}, expected {ok}")
        if settle is not None:
            settle()


class RowsStored:
    """`settle` for the gateway: wait until the send's attempt row is stored. The writer stores the rows that gathered
    in its pause (proxy/attempts.py), and under valgrind how many did varies from run to run (the count by 3%): one
    row a batch, every time, counts the same."""

    def __init__(self, url: str):
        from sqlalchemy import create_engine

        self.engine = create_engine(url)
        self.expected = self._stored()

    def _stored(self) -> int:
        from sqlalchemy import func, select

        from proxy.db import send_attempts

        with self.engine.connect() as conn:
            return conn.scalar(select(func.count()).select_from(send_attempts))

    def __call__(self) -> None:
        self.expected += 1
        deadline = time.monotonic() + REQUEST_TIMEOUT
        while self._stored() < self.expected:
            if time.monotonic() > deadline:
                raise RuntimeError("a send's attempt row was not stored in time")
            time.sleep(0.01)


def _inbound(kind: str, workdir: Path, marks: Path) -> dict:
    env = {"DATABASE_URL": database_url(kind, workdir, "inbound"), "TWILIO_API_BASE_URL": "http://127.0.0.1:9",
           "TWILIO_CONTENT_BASE_URL": "http://127.0.0.1:9"}
    counts = {}
    for name, spec in (("bare", "bench.bare_app:app"), ("floor", "bench.bare_webhook:app"),
                       ("proxy", "proxy:create_app()")):
        with Counted(env, spec, f"inbound-{name}-{kind}", workdir, marks) as server:
            reqs = inbound.webhook_requests(server.url, WARMUP + REQUESTS, sid_prefix="cc", seed=3)
            counts[name] = server.count(reqs[:WARMUP], reqs[WARMUP:])
    return counts


def _status(kind: str, workdir: Path, marks: Path) -> dict:
    url = database_url(kind, workdir, "status")
    sends = -(-(WARMUP + REQUESTS) // len(status.STATUSES))  # three callbacks a send
    status.add_attempts(url, 0, sends)
    env = {"DATABASE_URL": url, "TWILIO_API_BASE_URL": "http://127.0.0.1:9",
           "TWILIO_CONTENT_BASE_URL": "http://127.0.0.1:9"}
    counts = {}
    for name, spec in (("bare", "bench.bare_app:app"), ("floor", "bench.bare_webhook:app"),
                       ("proxy", "proxy:create_app()")):
        with Counted(env, spec, f"status-{name}-{kind}", workdir, marks) as server:
            reqs = status.callback_requests(server.url, 0, sends)
            counts[name] = server.count(reqs[:WARMUP], reqs[WARMUP:WARMUP + REQUESTS])
    return counts


def _gateway(kind: str, workdir: Path, marks: Path) -> dict:
    url = database_url(kind, workdir, "gateway")
    open_windows(url, gateway.pairs(WARMUP + REQUESTS))
    reqs = gateway.send_requests(WARMUP + REQUESTS)
    port = free_port()
    upstream = f"http://127.0.0.1:{port}"
    counts = {}
    # Twilio answers at once: what the upstream's wait costs the worker is its event loop's, not counted apart.
    with Subprocess(["-m", "bench.fake_upstream", "--port", str(port), "--delay", "0"], port, "instructions-upstream"):
        env = {"DATABASE_URL": url, "TWILIO_API_BASE_URL": upstream, "TWILIO_CONTENT_BASE_URL": upstream,
               "TWILIO_TIMEOUT_SECONDS": "10"}
        for name, spec in (("floor", "bench.bare_forward:app"), ("proxy", "proxy:create_app()")):
            with Counted(env, spec, f"gateway-{name}-{kind}", workdir, marks) as server:
                settle = RowsStored(url) if name == "proxy" else None
                counts[name] = server.count(reqs[:WARMUP], reqs[WARMUP:], ok=201, settle=settle)
                if settle is not None:
                    settle.engine.dispose()
    return counts


def run(kind: str, workdir: Path, marks: Path) -> dict:
    result = {"database": kind, "counter": _valgrind_version(), "requests_counted": REQUESTS, "warmup_requests": WARMUP,
              "client": "http.client, one keep-alive connection, one request at a time (no load tool: nothing is timed)",
              "inbound": _inbound(kind, workdir, marks), "status": _status(kind, workdir, marks),
              "gateway": _gateway(kind, workdir, marks)}
    for scenario in ("inbound", "status"):
        c = result[scenario]
        c["proxy_over_bare"] = round(c["proxy"] / c["bare"], 2)
        c["floor_over_bare"] = round(c["floor"] / c["bare"], 2)
        c["proxy_over_floor"] = round(c["proxy"] / c["floor"], 2)
    g = result["gateway"]
    g["proxy_over_floor"] = round(g["proxy"] / g["floor"], 2)
    return result


def _valgrind_version() -> str:
    found = subprocess.run(["valgrind", "--version"], capture_output=True, text=True)
    return f"{found.stdout.strip()} --tool=callgrind (instructions executed, Ir)"


def report(results: list[dict]) -> str:
    rows = []
    for r in results:
        for scenario in ("inbound", "status", "gateway"):
            c = r[scenario]
            rows.append([f"{scenario} ({r['database']})", _millions(c.get("bare")), _millions(c["floor"]),
                         _millions(c["proxy"]), c.get("proxy_over_bare", "—"), c.get("floor_over_bare", "—"),
                         c["proxy_over_floor"]])
    return table(f"Instructions a request costs one gunicorn worker (callgrind; millions; {REQUESTS} requests one "
                 "at a time; the inbound floor checks the signature, the gateway's forwards)",
                 ["scenario", "bare Flask", "floor", "proxy", "proxy ÷ bare", "floor ÷ bare", "proxy ÷ floor"], rows)


def _millions(value) -> str:
    return "—" if value is None else f"{value / 1e6:.3f}"


def main() -> list[dict]:
    why = missing_tools()
    if why:
        print(f"instructions: skipped: {why}")
        return []
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-instructions-") as tmp:
        workdir = Path(tmp)
        marks = build_marks(workdir)
        for kind in databases_from_env():
            r = run(kind, workdir, marks)
            write_result(f"instructions-{kind}", r)
            results.append(r)
    print(report(results))
    return results


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
