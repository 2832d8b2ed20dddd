"""Benchmark 2: the send gateway in front of a fake Twilio that answers each create after 250 ms.

256 concurrent clients POST Messages creates (Basic auth, free-form Body, inside an open window, so
every send is judged `allowed` and forwarded). The same requests are then sent straight to the fake
upstream. Reported: sends/s, p50/p99 through the proxy and direct, the added latency and the ratio.
The same load also goes through the floor (bench/bare_forward.py: gunicorn + Flask + the proxy's
forwarding transport, and nothing else, under the same settings): what this machine allows any
Flask proxy, so "proxy/floor" is the share the proxy's own work (auth, judging, records, logs) leaves.

The 256 clients send as fast as answers come back, so they measure the proxy at saturation, where
added latency is queueing. A second, open-loop run sends at a steady BENCH_GATEWAY_RATE (default
200/s, about 2.5 times Meta's default of 80 messages/s per number) and reports the latency the proxy
adds when it is not the bottleneck, and the proxy's own share of it from its log lines (`duration_ms` less
`upstream_ms`: its time in the gateway's view, without gunicorn's and Flask's around it nor the waits for a core
before and after).

    PYTHONPATH=. BENCH_POSTGRES_URL=postgresql://... python -m bench.gateway
"""

from __future__ import annotations

import base64
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from urllib.parse import urlencode

from sqlalchemy import create_engine, func, select

from bench.common import (ACCOUNT_SID, AUTH_TOKEN, BUSINESSES, Gunicorn, Subprocess, database_url,
                          databases_from_env, free_port, open_windows, run_at_rate, run_load, server_settings, table,
                          user_number, write_result)

DURATION = float(os.environ.get("BENCH_DURATION", "10"))
WARMUP = float(os.environ.get("BENCH_WARMUP", "3"))
CONNECTIONS = int(os.environ.get("BENCH_GATEWAY_CONNECTIONS", "256"))
UPSTREAM_DELAY = float(os.environ.get("BENCH_UPSTREAM_DELAY", "0.25"))
USERS = int(os.environ.get("BENCH_GATEWAY_USERS", "20000"))
RATE = float(os.environ.get("BENCH_GATEWAY_RATE", "200"))
PATH = f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"


def pairs(count: int) -> list[tuple[str, str]]:
    return [(BUSINESSES[n % len(BUSINESSES)], user_number(n)) for n in range(count)]


def send_requests(count: int) -> list[tuple[str, str, dict, str]]:
    auth = "Basic " + base64.b64encode(f"{ACCOUNT_SID}:{AUTH_TOKEN}".encode()).decode()
    headers = {"Authorization": auth, "Content-Type": "application/x-www-form-urlencoded",
               "User-Agent": "twilio-python/9 (bench)", "Accept": "application/json"}
    return [("POST", PATH, headers, urlencode({"To": user, "From": sender, "Body": f"Your order {n} has shipped."}))
            for n, (sender, user) in enumerate(pairs(count))]


def settle() -> None:
    """Let the sends the saturated run left in flight (256, cut off by the load tool) finish first:
    the steady-rate run measures a quiet server, not the tail of the previous run's queue."""
    time.sleep(2 * UPSTREAM_DELAY + 1)


def direct(upstream_url: str, reqs) -> tuple[dict, dict]:
    run_load(upstream_url, reqs[::7], connections=CONNECTIONS, duration=WARMUP)
    saturated = run_load(upstream_url, reqs, connections=CONNECTIONS, duration=DURATION)
    settle()
    return saturated, run_at_rate(upstream_url, reqs[1::2], rate=RATE, duration=DURATION)


def floor(upstream_url: str, reqs) -> tuple[dict, dict]:
    env = {"TWILIO_API_BASE_URL": upstream_url, "TWILIO_TIMEOUT_SECONDS": "10"}
    with Gunicorn(env, app_spec="bench.bare_forward:app", label="gateway-floor",
                  extra_args=os.environ.get("BENCH_GUNICORN_ARGS", "")) as bare:
        bare.load(reqs[::7], connections=CONNECTIONS, duration=WARMUP)
        saturated = bare.load(reqs, connections=CONNECTIONS, duration=DURATION)
        settle()
        steady = bare.load(reqs[1::2], rate=RATE, duration=DURATION)
        saturated["memory_mib"] = bare.rss()
        saturated["workers"] = server_settings(bare.env)["workers"]  # its own, not the proxy's
    return saturated, steady


def through_proxy(kind: str, workdir: Path, upstream_url: str, reqs) -> dict:
    url = database_url(kind, workdir)
    open_windows(url, pairs(USERS))
    env = {"DATABASE_URL": url, "TWILIO_API_BASE_URL": upstream_url, "TWILIO_CONTENT_BASE_URL": upstream_url,
           "TWILIO_TIMEOUT_SECONDS": "10"}
    with Gunicorn(env, label=f"gateway-{kind}", extra_args=os.environ.get("BENCH_GUNICORN_ARGS", "")) as proxy:
        proxy.load(reqs[::7], connections=CONNECTIONS, duration=WARMUP)
        result = proxy.load(reqs, connections=CONNECTIONS, duration=DURATION)
        settle()
        logged_before = len(proxy.log_path.read_bytes().splitlines())
        steady = proxy.load(reqs[1::2], rate=RATE, duration=DURATION)
        time.sleep(0.5)  # a send's line is written once its answer is: let the last ones land
        steady["in_view_ms"] = in_view(proxy.log_path, logged_before)
        result["memory_mib"] = proxy.rss()
        settings = {"command": proxy.command, **server_settings(proxy.env)}
        warnings = sum("Connection pool is full" in line for line in proxy.log_path.read_text().splitlines())
    engine = create_engine(url)
    with engine.connect() as conn:
        from proxy.db import send_attempts
        decisions = dict(conn.execute(select(send_attempts.c.decision + "/" + send_attempts.c.outcome, func.count())
                                      .group_by(send_attempts.c.decision, send_attempts.c.outcome)).all())
    engine.dispose()
    return {"database": kind, **settings, "proxy": result, "proxy_at_rate": steady, "attempts_by_decision": decisions,
            "upstream_pool_full_warnings": warnings}


def main() -> list[dict]:
    reqs = send_requests(USERS)
    port = free_port()
    upstream_url = f"http://127.0.0.1:{port}"
    results = []
    with Subprocess(["-m", "bench.fake_upstream", "--port", str(port), "--delay", str(UPSTREAM_DELAY)], port,
                    "fake-upstream"), tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        baseline, baseline_at_rate = direct(upstream_url, reqs)
        bare, bare_at_rate = floor(upstream_url, reqs)
        for kind in databases_from_env():
            r = through_proxy(kind, Path(tmp), upstream_url, reqs)
            steady = r["proxy_at_rate"]
            r.update(direct=baseline, direct_at_rate=baseline_at_rate, floor=bare, floor_at_rate=bare_at_rate,
                     rate_per_s=RATE,
                     ratio_to_floor=round(r["proxy"]["rps"] / bare["rps"], 3) if bare["rps"] else None,
                     added_p50_ms_at_rate=round(steady["p50_ms"] - baseline_at_rate["p50_ms"], 2),
                     added_p99_ms_at_rate=round(steady["p99_ms"] - baseline_at_rate["p99_ms"], 2),
                     connections=CONNECTIONS, upstream_delay_s=UPSTREAM_DELAY, duration_s=DURATION,
                     ratio_rps=round(r["proxy"]["rps"] / baseline["rps"], 3) if baseline["rps"] else None,
                     added_p50_ms=round(r["proxy"]["p50_ms"] - baseline["p50_ms"], 2),
                     added_p99_ms=round(r["proxy"]["p99_ms"] - baseline["p99_ms"], 2),
                     targets={"sends_per_s": 1000, "added_p50_ms": 5})
            write_result(f"gateway-{kind}", r)
            results.append(r)
    print(report(results, baseline, bare))
    print(report_at_rate(results, baseline_at_rate, bare_at_rate))
    return results


def in_view(log_path: Path, skip: int) -> dict:
    """The proxy's own time per forwarded send, from its `send` lines after the first `skip` log lines."""
    own = []
    for line in log_path.read_bytes().splitlines()[skip:]:
        if line.startswith(b"{") and b'"event": "send"' in line:
            sent = json.loads(line)
            if sent.get("upstream_ms") is not None:
                own.append(sent["duration_ms"] - sent["upstream_ms"])
    if not own:
        return {"sends": 0}
    own.sort()
    return {"sends": len(own), "p50_ms": round(statistics.median(own), 2),
            "p99_ms": round(own[int(0.99 * (len(own) - 1))], 2)}


def _errors(m: dict) -> int:
    return m["non_2xx_3xx"] + m["socket_errors"] + m["timeouts"]


def report(results: list[dict], baseline: dict, bare: dict) -> str:
    def added(m):
        return round(m["p50_ms"] - baseline["p50_ms"], 2)

    rows = [["direct to fake upstream", "", baseline["rps"], baseline["p50_ms"], baseline["p99_ms"], "", "", "",
             _errors(baseline), "", ""],
            ["floor: bare Flask forward", bare["workers"], bare["rps"], bare["p50_ms"],
             bare["p99_ms"], added(bare), f"{bare['rps'] / baseline['rps']:.2f}" if baseline["rps"] else "", "",
             _errors(bare), bare["server_cpu_ms_per_request"], bare["server_cpu_cores"]]]
    for r in results:
        m = r["proxy"]
        rows.append([f"{r['database']}: through proxy", r["workers"], m["rps"], m["p50_ms"], m["p99_ms"], added(m),
                     f"{r['ratio_rps']:.2f}", f"{r['ratio_to_floor']:.2f}", _errors(m),
                     m["server_cpu_ms_per_request"], m["server_cpu_cores"]])
    return table(f"Gateway sends ({CONNECTIONS} clients, upstream answers after {UPSTREAM_DELAY * 1000:g} ms, "
                 f"{DURATION:g}s; targets >= 1000/s, <= 5 ms added p50)",
                 ["run", "workers", "sends/s", "p50 ms", "p99 ms", "added p50 ms", "÷ direct", "÷ floor", "errors",
                  "CPU ms/send", "CPU cores"], rows)


def report_at_rate(results: list[dict], baseline: dict, bare: dict) -> str:
    rows = [["direct to fake upstream", baseline["rps"], baseline["p50_ms"], baseline["p99_ms"], "", "",
             _errors(baseline), "", ""],
            ["floor: bare Flask forward", bare["rps"], bare["p50_ms"], bare["p99_ms"],
             round(bare["p50_ms"] - baseline["p50_ms"], 2), round(bare["p99_ms"] - baseline["p99_ms"], 2),
             _errors(bare), bare["server_cpu_ms_per_request"], ""]]
    for r in results:
        m = r["proxy_at_rate"]
        own = m.get("in_view_ms", {})
        rows.append([f"{r['database']}: through proxy", m["rps"], m["p50_ms"], m["p99_ms"], r["added_p50_ms_at_rate"],
                     r["added_p99_ms_at_rate"], _errors(m), m["server_cpu_ms_per_request"],
                     f"{own['p50_ms']} / {own['p99_ms']}" if own.get("sends") else ""])
    return table(f"Gateway at a steady {RATE:g} sends/s (open loop, latency from when each send was due; "
                 f"upstream answers after {UPSTREAM_DELAY * 1000:g} ms, {DURATION:g}s)",
                 ["run", "sends/s", "p50 ms", "p99 ms", "added p50 ms", "added p99 ms", "errors", "CPU ms/send",
                  "in the view p50 / p99 ms"], rows)


if __name__ == "__main__":
    main()
