"""Profile one gunicorn worker under load with py-spy: where the gateway / inbound time goes.

    PYTHONPATH=. python -m bench.profile gateway --db sqlite [--gil] [--seconds 8]
    PYTHONPATH=. python -m bench.profile inbound --db postgresql --dump
    PYTHONPATH=. python -m bench.profile forwarding --db sqlite
    PYTHONPATH=. python -m bench.profile gateway --db postgresql --gil --at-rate 200   # a steady load, not saturated

Writes py-spy's collapsed stacks to bench/results/profile-<scenario>-<db>[-gil].txt and prints the
top functions (bench/stacks.py). Without --gil every sampled thread counts, so waiting (for the GIL,
a lock, the network) shows up; with --gil only the thread holding the GIL is sampled (CPU work).
--dump prints one `py-spy dump` of all threads of the worker halfway through the load instead.
Environment (WEB_CONCURRENCY, WEB_THREADS, BENCH_GUNICORN_ARGS, ...) is passed on as in the benchmarks.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench import forwarding, gateway, inbound
from bench.common import RESULTS, Gunicorn, Subprocess, database_url, free_port, open_windows, run_load
from bench.stacks import load, summarise


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise SystemExit("py-spy is not installed (pip install py-spy)")
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=["gateway", "inbound", "forwarding"])
    parser.add_argument("--db", default="sqlite", choices=["sqlite", "postgresql"])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rate", type=int, default=100)
    parser.add_argument("--at-rate", type=float, default=None,
                        help="requests/s, open loop (as the gateway's steady run); default: saturate")
    parser.add_argument("--gil", action="store_true")
    parser.add_argument("--dump", action="store_true")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / (f"profile-{args.scenario}-{args.db}{'-gil' if args.gil else ''}"
                     f"{f'-at-{args.at_rate:g}' if args.at_rate else ''}.txt")
    duration = args.seconds + 4

    with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
        url = database_url(args.db, Path(tmp))
        extra = os.environ.get("BENCH_GUNICORN_ARGS", "")
        if args.scenario == "gateway":
            port = free_port()
            upstream_url = f"http://127.0.0.1:{port}"
            helper = Subprocess(["-m", "bench.fake_upstream", "--port", str(port), "--delay",
                                 str(gateway.UPSTREAM_DELAY)], port, "fake-upstream")
            open_windows(url, gateway.pairs(gateway.USERS))
            env = {"DATABASE_URL": url, "TWILIO_API_BASE_URL": upstream_url,
                   "TWILIO_CONTENT_BASE_URL": upstream_url}
            connections = gateway.CONNECTIONS
        elif args.scenario == "forwarding":
            port = free_port()
            helper = Subprocess(["-m", "bench.fake_upstream", "--port", str(port), "--app-delay",
                                 str(forwarding.APP_DELAY)], port, "fake-app")
            env = {"DATABASE_URL": url, "FORWARD_INBOUND_URL": f"http://127.0.0.1:{port}{forwarding.APP_PATH}",
                   "TWILIO_API_BASE_URL": "http://127.0.0.1:9", "TWILIO_CONTENT_BASE_URL": "http://127.0.0.1:9"}
            connections = inbound.CONNECTIONS
        else:
            helper = None
            env = {"DATABASE_URL": url, "TWILIO_API_BASE_URL": "http://127.0.0.1:9",
                   "TWILIO_CONTENT_BASE_URL": "http://127.0.0.1:9"}
            connections = inbound.CONNECTIONS
        if helper:
            helper.__enter__()
        try:
            with Gunicorn(env, label=f"profile-{args.scenario}", extra_args=extra) as server:
                reqs = (gateway.send_requests(gateway.USERS) if args.scenario == "gateway"
                        else inbound.webhook_requests(server.url, 40000, sid_prefix="cc", seed=11))
                result = {}
                loader = threading.Thread(target=lambda: result.update(
                    server.load(reqs, rate=args.at_rate, duration=duration) if args.at_rate
                    else run_load(server.url, reqs, connections=connections, duration=duration)))
                loader.start()
                time.sleep(2)  # past the start-up of the load
                pid = server.worker_pids()[0]
                if args.dump:
                    time.sleep(args.seconds / 2)
                    print(subprocess.run([py_spy(), "dump", "-p", str(pid)], capture_output=True, text=True).stdout)
                else:
                    cmd = [py_spy(), "record", "-p", str(pid), "-d", str(int(args.seconds)), "-r", str(args.rate),
                           "-f", "raw", "-o", str(out), "--nonblocking"] + (["--gil"] if args.gil else [])
                    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
                loader.join()
        finally:
            if helper:
                helper.__exit__(None, None, None)
    print(f"load while profiling: {result.get('rps')} req/s, p50 {result.get('p50_ms')} ms, "
          f"p99 {result.get('p99_ms')} ms (profiling slows the worker)")
    if not args.dump:
        print(f"stacks: {out}")
        print(summarise(load(str(out)), args.top, None))


if __name__ == "__main__":
    main()
