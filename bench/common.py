"""Shared pieces of the benchmarks: gunicorn from the Procfile, databases, load generators, results.

Everything listens on and talks to 127.0.0.1 only. Every load run is bounded in time (a duration)
and in count (a request budget for the asyncio client; wrk stops at its duration).
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
LUA_SCRIPT = ROOT / "bench" / "wrk_requests.lua"

ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
AUTH_TOKEN = "bench-auth-token-0123456789abcdef"
BUSINESSES = [f"whatsapp:+1415555{n:04d}" for n in range(100, 104)]

# BENCH_SERVER_CPUS=1: the server under test (gunicorn, its workers) runs on those CPUs only, and this process, the
# load tool and the fake upstream on the others, so a run measures what the server does with cores of its own
# rather than what is left to it beside the load. Off by default: `make bench` shares the cores as before.
SERVER_CPUS = os.environ.get("BENCH_SERVER_CPUS", "").strip()


def _pin_load_side() -> None:
    if not SERVER_CPUS:
        return
    server = {int(n) for part in SERVER_CPUS.split(",") for n in
              (range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1))}
    load = set(os.sched_getaffinity(0)) - server
    if not server or not load:
        raise SystemExit(f"BENCH_SERVER_CPUS={SERVER_CPUS!r} must leave this machine's other CPUs to the load tool")
    os.sched_setaffinity(0, load)  # inherited by wrk and the fake upstream


_pin_load_side()


def user_number(n: int) -> str:
    return f"whatsapp:+1650{n:07d}"


# --- machine and results -------------------------------------------------------------------------

def machine() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = 0
    try:
        mem_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
    except (OSError, AttributeError):
        pass
    return {"cpus": os.cpu_count(), "cpu_model": model, "mem_gib": round(mem_kb / 2**20, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "load_generator": load_generator_name(), "server_cpus": SERVER_CPUS or "shared",
            **postgresql_settings()}


_postgresql_settings: dict | None = None


def postgresql_settings() -> dict:
    """BENCH_POSTGRES_URL's server and whether it flushes each commit to disk: `fsync=off` flatters every
    PostgreSQL number, so a result says which it was."""
    global _postgresql_settings
    raw = os.environ.get("BENCH_POSTGRES_URL", "").strip()
    if not raw:
        return {}
    if _postgresql_settings is None:
        from sqlalchemy import create_engine, text
        from sqlalchemy.exc import SQLAlchemyError

        from proxy.settings import normalise_database_url

        engine = create_engine(normalise_database_url(raw), connect_args={"connect_timeout": 5})
        try:
            with engine.connect() as conn:
                _postgresql_settings = {"postgresql": {
                    name: conn.execute(text(f"SHOW {name}")).scalar()
                    for name in ("server_version", "fsync", "synchronous_commit")}}
        except SQLAlchemyError as exc:
            _postgresql_settings = {"postgresql": {"error": str(exc.orig or exc).splitlines()[0]}}
        finally:
            engine.dispose()
    return _postgresql_settings


def write_result(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    data = {"benchmark": name, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(), **data}
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def table(title: str, columns: list[str], rows: list[list]) -> str:
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.rjust(w) if i else v.ljust(w)  # noqa: E731
                                           for i, (v, w) in enumerate(zip(vals, widths))) + " |"
    out = [f"\n### {title}\n", line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells]
    return "\n".join(out)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


# --- processes -----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, process: subprocess.Popen, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited: {log.read_text()[-3000:] if log.exists() else ''}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def procfile_web(app_spec: str | None = None) -> str:
    line = next(l for l in (ROOT / "Procfile").read_text().splitlines() if l.startswith("web:"))
    command = line.split(":", 1)[1].strip().replace("0.0.0.0:", "127.0.0.1:")
    if app_spec:
        command = command.replace("'proxy:create_app()'", f"'{app_spec}'")
    return command


def base_env(**extra) -> dict:
    env = {**os.environ,
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(os.pathsep),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_AUTH_TOKEN": AUTH_TOKEN}
    env.update({k: str(v) for k, v in extra.items() if v is not None})
    return env


class Gunicorn:
    """The Procfile's web command on 127.0.0.1 (optionally serving another WSGI app), as a context manager."""

    def __init__(self, env: dict, *, app_spec: str | None = None, label: str = "proxy", extra_args: str = "",
                 wrap: str = ""):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = procfile_web(app_spec)
        if extra_args:  # e.g. a different --worker-class; placed before the app spec
            head, _, app = self.command.rpartition(" ")
            self.command = f"{head} {extra_args} {app}"
        if wrap:  # a command the server runs under (bench/instructions.py: valgrind)
            self.command = f"{wrap} {self.command}"
        if SERVER_CPUS:
            self.command = f"taskset -c {SERVER_CPUS} {self.command}"
        self.env = base_env(PORT=self.port, **env)
        self.log_path = Path(tempfile.gettempdir()) / f"bench-gunicorn-{label}-{self.port}.log"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "Gunicorn":
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(["bash", "-c", f"exec {self.command}"], cwd=ROOT, env=self.env,
                                        stdout=self.log, stderr=subprocess.STDOUT)
        wait_listening(self.port, self.process, self.log_path)
        self._wait_workers()
        return self

    def _wait_workers(self, timeout: float = 30.0) -> None:
        want = int(server_settings(self.env)["web_concurrency"])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(self.worker_pids()) < want:
            time.sleep(0.1)
        time.sleep(0.5)  # let the workers finish importing the app

    def worker_pids(self) -> list[int]:
        return children(self.process.pid)

    def cpu_seconds(self) -> float:
        """User + system CPU of the master and its workers so far (from /proc/<pid>/stat)."""
        return sum(proc_cpu(pid) for pid in [self.process.pid, *self.worker_pids()])

    def load(self, requests, *, rate: float | None = None, **kwargs) -> dict:
        """run_load (or run_at_rate, given a rate) against this server, adding the server's CPU time per
        request and its cores in use."""
        cpu0, t0 = self.cpu_seconds(), time.monotonic()
        result = run_at_rate(self.url, requests, rate=rate, **kwargs) if rate else run_load(self.url, requests, **kwargs)
        cpu, wall = self.cpu_seconds() - cpu0, time.monotonic() - t0
        result["server_cpu_cores"] = round(cpu / wall, 2)
        result["server_cpu_ms_per_request"] = round(1000 * cpu / result["ok"], 2) if result["ok"] else None
        return result

    def rss(self) -> dict:
        return {"master": proc_memory(self.process.pid),
                "workers": [proc_memory(pid) for pid in self.worker_pids()]}

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self.log.close()


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(p) for p in task.read_text().split()]
        except OSError:
            pass
    return sorted(found)


def proc_cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_memory(pid: int) -> dict:
    """VmRSS (resident now) and VmHWM (peak resident) of a process, in MiB, from /proc/<pid>/status."""
    out = {"pid": pid}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "Threads"):
                out[key] = round(int(value.split()[0]) / 1024, 1) if key != "Threads" else int(value)
    except OSError:
        pass
    return out


class Subprocess:
    """A helper server (the fake upstream) run as its own Python process."""

    def __init__(self, args: list[str], port: int, label: str):
        self.args, self.port = args, port
        self.log_path = Path(tempfile.gettempdir()) / f"bench-{label}-{port}.log"

    def __enter__(self):
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen([sys.executable, *self.args], cwd=ROOT, env=base_env(),
                                        stdout=self.log, stderr=subprocess.STDOUT)
        wait_listening(self.port, self.process, self.log_path)
        return self

    def __exit__(self, *exc):
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def http_get(url: str, timeout: float = 5.0) -> int:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status


# --- databases -----------------------------------------------------------------------------------

def database_url(kind: str, workdir: Path, name: str = "bench") -> str:
    """A fresh, migrated database: a new SQLite file, or BENCH_POSTGRES_URL with its tables dropped.

    Another `name` gives a second, independent database: another SQLite file, or on PostgreSQL a
    schema of that name (the connection's search_path points at it).
    """
    from sqlalchemy import create_engine, make_url, text

    from proxy.cli import upgrade
    from proxy.db import metadata
    from proxy.settings import normalise_database_url

    if kind == "sqlite":
        url = f"sqlite:///{workdir / f'{name}.sqlite3'}"
        for suffix in ("", "-wal", "-shm", ".write-lock"):
            Path(f"{workdir / f'{name}.sqlite3'}{suffix}").unlink(missing_ok=True)
    elif kind == "postgresql":
        raw = os.environ.get("BENCH_POSTGRES_URL", "").strip()
        if not raw:
            raise SystemExit("BENCH_POSTGRES_URL is not set (make bench starts a throw-away PostgreSQL)")
        url = normalise_database_url(raw)
        if name != "bench":
            engine = create_engine(url)
            with engine.begin() as conn:
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))
                conn.execute(text(f'CREATE SCHEMA "{name}"'))
            engine.dispose()
            url = make_url(url).update_query_dict({"options": f"-csearch_path={name}"}) \
                .render_as_string(hide_password=False)
        engine = create_engine(url)
        with engine.begin() as conn:
            for table_ in reversed(metadata.sorted_tables):
                conn.execute(text(f'DROP TABLE IF EXISTS "{table_.name}"'))
            conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
        engine.dispose()
    else:
        raise SystemExit(f"unknown database kind {kind!r}")
    upgrade(url)
    return url


def databases_from_env() -> list[str]:
    kinds = [k.strip() for k in os.environ.get("BENCH_DATABASES", "sqlite,postgresql").split(",") if k.strip()]
    if "postgresql" in kinds and not os.environ.get("BENCH_POSTGRES_URL"):
        print("BENCH_POSTGRES_URL unset: skipping PostgreSQL", file=sys.stderr)
        kinds.remove("postgresql")
    return kinds


def open_windows(url: str, pairs: list[tuple[str, str]], hours: int = 23) -> None:
    """Insert open windows for (sender, user) pairs directly with SQL."""
    from datetime import timedelta

    from sqlalchemy import create_engine

    from proxy.db import utcnow, windows

    now = utcnow()
    rows = [{"sender": s, "user": u, "expires_at": now + timedelta(hours=hours), "last_inbound_at": now,
             "last_inbound_sid": None, "profile_name": "Bench", "updated_at": now} for s, u in pairs]
    engine = create_engine(url)
    with engine.begin() as conn:
        for i in range(0, len(rows), 5000):
            conn.execute(windows.insert(), rows[i:i + 5000])
    engine.dispose()


# --- load generation -----------------------------------------------------------------------------
#
# A request list is [(method, path, headers, body)], written once; the load generator cycles through
# it (each connection starting at its own offset). wrk (C, event loop) is used when it is installed,
# because a Python client would take much of the CPU the server is being measured on; otherwise an
# aiohttp client does the same job.

def load_generator_name() -> str:
    forced = os.environ.get("BENCH_LOADGEN", "").strip()
    if forced:
        return forced
    return "wrk" if shutil.which("wrk") else "aiohttp"


def run_load(base_url: str, requests: list[tuple[str, str, dict, str]], *, connections: int, duration: float,
             timeout: float = 10.0, max_requests: int = 500_000) -> dict:
    if load_generator_name() == "wrk":
        return _run_wrk(base_url, requests, connections=connections, duration=duration, timeout=timeout)
    return asyncio.run(_run_aiohttp(base_url, requests, connections=connections, duration=duration,
                                    timeout=timeout, max_requests=max_requests))


def _run_wrk(base_url, requests, *, connections, duration, timeout) -> dict:
    threads = max(1, min(os.cpu_count() or 1, 2, connections))
    with tempfile.NamedTemporaryFile("w", suffix=".reqs", delete=False) as f:
        for method, path, headers, body in requests:
            head = "\x1f".join(f"{k}: {v}" for k, v in headers.items())
            f.write(f"{method}\t{path}\t{head}\t{body}\n")
        req_file = f.name
    try:
        cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{int(max(1, round(duration)))}s",
               f"--timeout={int(timeout)}s", "-s", str(LUA_SCRIPT), base_url]
        proc = subprocess.run(cmd, env={**os.environ, "BENCH_REQUESTS": req_file, "BENCH_THREADS": str(threads)}, capture_output=True,
                              text=True, timeout=duration + timeout + 30)
    finally:
        os.unlink(req_file)
    match = re.search(r"^BENCH_JSON (.*)$", proc.stdout, re.M)
    if proc.returncode != 0 or not match:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
    raw = json.loads(match.group(1))
    seconds = raw["duration_us"] / 1e6
    errors = raw["errors"]
    ok = raw["requests"] - errors["status"]
    return {"load_generator": "wrk", "connections": connections, "seconds": round(seconds, 2),
            "requests": raw["requests"], "ok": ok, "non_2xx_3xx": errors["status"],
            "socket_errors": errors["connect"] + errors["read"] + errors["write"], "timeouts": errors["timeout"],
            "rps": round(ok / seconds, 1),
            "p50_ms": raw["p50_us"] / 1000, "p90_ms": raw["p90_us"] / 1000, "p99_ms": raw["p99_us"] / 1000,
            "max_ms": raw["max_us"] / 1000, "mean_ms": round(raw["mean_us"] / 1000, 3)}


async def _send_one(session, base_url: str, request: tuple[str, str, dict, str], since: float, clock,
                    counts: dict, latencies: list[float]) -> None:
    """One request; its latency (clock() - since) is kept when it succeeds, else it is counted by kind."""
    import aiohttp

    method, path, headers, body = request
    try:
        async with session.request(method, base_url + path, headers=headers, data=body) as response:
            await response.read()
            if response.status < 400:
                counts["ok"] += 1
                latencies.append(clock() - since)
            else:
                counts["bad"] += 1
    except asyncio.TimeoutError:
        counts["timeouts"] += 1
    except aiohttp.ClientError:
        counts["errors"] += 1


async def _run_aiohttp(base_url, requests, *, connections, duration, timeout, max_requests) -> dict:
    import aiohttp

    latencies: list[float] = []
    counts = {"ok": 0, "bad": 0, "errors": 0, "timeouts": 0}
    issued = 0
    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    started = time.perf_counter()
    deadline = started + duration

    async def worker(offset: int, session):
        nonlocal issued
        i = offset
        while time.perf_counter() < deadline and issued < max_requests:
            issued += 1
            request = requests[i % len(requests)]
            i += connections
            await _send_one(session, base_url, request, time.perf_counter(), time.perf_counter, counts, latencies)

    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:
        await asyncio.gather(*(worker(n, session) for n in range(connections)))
    seconds = time.perf_counter() - started
    return {"load_generator": "aiohttp", "connections": connections,
            **_summary(latencies, counts, seconds, requests=issued)}


def _summary(latencies: list[float], counts: dict, seconds: float, *, requests: int) -> dict:
    latencies.sort()
    pct = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else 0.0  # noqa
    return {"seconds": round(seconds, 2), "requests": requests, "ok": counts["ok"], "non_2xx_3xx": counts["bad"],
            "socket_errors": counts["errors"], "timeouts": counts["timeouts"], "rps": round(counts["ok"] / seconds, 1),
            "p50_ms": round(pct(0.50), 3), "p90_ms": round(pct(0.90), 3), "p99_ms": round(pct(0.99), 3),
            "max_ms": round(pct(1.0), 3),
            "mean_ms": round(sum(latencies) / len(latencies) * 1000, 3) if latencies else 0.0}


def run_at_rate(base_url: str, requests: list[tuple[str, str, dict, str]], *, rate: float, duration: float,
                timeout: float = 10.0) -> dict:
    """Open loop: request i is due at start + i/rate, whether or not earlier ones were answered.

    Latency counts from the moment a request was due, not from when it went out, so a server that
    falls behind shows it (no coordinated omission). wrk cannot pace requests; the aiohttp client does.
    """
    return asyncio.run(_run_at_rate(base_url, requests, rate=rate, duration=duration, timeout=timeout))


async def _run_at_rate(base_url, requests, *, rate, duration, timeout) -> dict:
    import aiohttp

    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    counts = {"ok": 0, "bad": 0, "errors": 0, "timeouts": 0}
    total = int(rate * duration)

    async def one(i: int, session, start: float) -> None:
        due = start + i / rate
        await asyncio.sleep(max(0.0, due - loop.time()))
        await _send_one(session, base_url, requests[i % len(requests)], due, loop.time, counts, latencies)

    connector = aiohttp.TCPConnector(limit=0)  # open loop: never queue behind the client's own pool
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        start = loop.time() + 0.05
        await asyncio.gather(*(one(i, session, start) for i in range(total)))
        seconds = loop.time() - start
    return {"load_generator": "aiohttp (fixed rate)", "rate_per_s": rate,
            **_summary(latencies, counts, seconds, requests=total)}


def server_settings(env: dict) -> dict:
    """The worker model gunicorn runs with for `env`: the Procfile's defaults and gunicorn.conf.py's choices."""
    import importlib.util

    defaults = dict(re.findall(r"\$\{(WEB_THREADS):-(\d+)\}", procfile_web()))
    spec = importlib.util.spec_from_file_location("gunicorn_conf", ROOT / "gunicorn.conf.py")
    conf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conf)
    worker_class = conf._worker_class(env)
    if SERVER_CPUS:  # counted on the server's CPUs (taskset), not on this process's, which are the load's
        workers = subprocess.run(
            ["taskset", "-c", SERVER_CPUS, sys.executable, "-c",
             "import importlib.util as u; s = u.spec_from_file_location('c', 'gunicorn.conf.py'); "
             "c = u.module_from_spec(s); s.loader.exec_module(c); print(c.workers)"],
            cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout.split()[-1]
    else:
        workers = str(conf._workers(env))
    threads = env.get("WEB_THREADS") or defaults["WEB_THREADS"]
    label = f"{workers}x{threads} gthread" if worker_class == "gthread" else f"{workers} {worker_class}"
    return {"worker_class": worker_class, "web_concurrency": workers, "web_threads": threads, "workers": label}
