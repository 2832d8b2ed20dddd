"""Benchmark 5: inbound webhooks forwarded to the business's app (FORWARD_INBOUND_URL), its TwiML relayed.

The product's inbound path in production: each signed webhook is stored with its window and an outbox
item, handed to the app inline, marked delivered, and the app's TwiML goes back to Twilio. The app is
bench/fake_upstream.py's /app/inbound (aiohttp; answers a reply after BENCH_APP_DELAY, 20 ms). The same
requests go straight to the app (its own latency), through the floor (bench/bare_forward_webhook.py:
Flask checking the signature and relaying with the proxy's forwarder, no database), and through the
proxy, all under the Procfile's gunicorn command. "proxy/floor" is the share the proxy's own work (the
message, window, outbox item and its delivery, the log lines) leaves.

    PYTHONPATH=. BENCH_POSTGRES_URL=postgresql://... python -m bench.forwarding
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from sqlalchemy import create_engine, func, select

from bench.common import (Gunicorn, Subprocess, database_url, databases_from_env, free_port, run_load,
                          server_settings, table, write_result)
from bench.fake_upstream import APP_PATH, APP_TWIML
from bench.inbound import CONNECTIONS, DURATION, REQUESTS, WARMUP, webhook_requests

APP_DELAY = float(os.environ.get("BENCH_APP_DELAY", "0.02"))


def measure(server: Gunicorn) -> dict:
    server.load(webhook_requests(server.url, 3000, sid_prefix="aa", seed=7), connections=CONNECTIONS,
                duration=WARMUP)
    result = server.load(webhook_requests(server.url, REQUESTS, sid_prefix="bb", seed=1), connections=CONNECTIONS,
                         duration=DURATION)
    result["memory_mib"] = server.rss()
    return result


def direct(app_url: str) -> dict:
    """The same bodies straight to the app (its path, no signature needed): the app's own latency."""
    reqs = [(method, APP_PATH, headers, body)
            for method, _, headers, body in webhook_requests(app_url, REQUESTS, sid_prefix="cc", seed=1)]
    run_load(app_url, reqs[:3000], connections=CONNECTIONS, duration=WARMUP)
    return run_load(app_url, reqs, connections=CONNECTIONS, duration=DURATION)


def floor(app_url: str) -> dict:
    env = {"FORWARD_INBOUND_URL": app_url + APP_PATH}
    with Gunicorn(env, app_spec="bench.bare_forward_webhook:app", label="forwarding-floor",
                  extra_args=os.environ.get("BENCH_GUNICORN_ARGS", "")) as bare:
        result = measure(bare)
        result["workers"] = server_settings(bare.env)["workers"]  # its own, not the proxy's
    return result


def through_proxy(kind: str, workdir: Path, app_url: str) -> dict:
    url = database_url(kind, workdir)
    env = {"DATABASE_URL": url, "FORWARD_INBOUND_URL": app_url + APP_PATH,
           "TWILIO_API_BASE_URL": "http://127.0.0.1:9", "TWILIO_CONTENT_BASE_URL": "http://127.0.0.1:9"}
    with Gunicorn(env, label=f"forwarding-{kind}", extra_args=os.environ.get("BENCH_GUNICORN_ARGS", "")) as proxy:
        result = measure(proxy)
        settings = {"command": proxy.command, **server_settings(proxy.env)}
    engine = create_engine(url)
    with engine.connect() as conn:
        from proxy.db import outbox
        # Every forward the proxy took should have been delivered inline; anything else waits for a worker.
        items = dict(conn.execute(select(outbox.c.status, func.count()).group_by(outbox.c.status)).all())
    engine.dispose()
    return {"database": kind, **settings, "proxy": result, "outbox_items_by_status": items}


def main() -> list[dict]:
    port = free_port()
    app_url = f"http://127.0.0.1:{port}"
    results = []
    with Subprocess(["-m", "bench.fake_upstream", "--port", str(port), "--app-delay", str(APP_DELAY)], port,
                    "fake-app"), tempfile.TemporaryDirectory(prefix="bench-forwarding-") as tmp:
        app_alone = direct(app_url)
        bare = floor(app_url)
        for kind in databases_from_env():
            r = through_proxy(kind, Path(tmp), app_url)
            m = r["proxy"]
            r.update(direct=app_alone, floor=bare, app_delay_s=APP_DELAY, connections=CONNECTIONS, duration_s=DURATION,
                     app_answer_bytes=len(APP_TWIML),
                     ratio_to_floor=round(m["rps"] / bare["rps"], 3) if bare["rps"] else None,
                     added_p50_ms=round(m["p50_ms"] - app_alone["p50_ms"], 2))
            write_result(f"forwarding-{kind}", r)
            results.append(r)
    if results:
        print(report(results))
    return results


def _errors(m: dict) -> int:
    return m["non_2xx_3xx"] + m["socket_errors"] + m["timeouts"]


def report(results: list[dict]) -> str:
    app_alone, bare = results[0]["direct"], results[0]["floor"]
    rows = [["direct to the app", "", app_alone["rps"], app_alone["p50_ms"], app_alone["p99_ms"], "", _errors(app_alone),
             "", "", ""],
            ["floor: Flask + signature + relay", bare["workers"],
             bare["rps"], bare["p50_ms"], bare["p99_ms"], round(bare["p50_ms"] - app_alone["p50_ms"], 2),
             _errors(bare), bare["server_cpu_ms_per_request"], "", ""]]
    for r in results:
        m = r["proxy"]
        pending = sum(n for status, n in r["outbox_items_by_status"].items() if status != "delivered")
        rows.append([f"{r['database']}: proxy, forwarding", r["workers"], m["rps"], m["p50_ms"], m["p99_ms"],
                     r["added_p50_ms"], _errors(m), m["server_cpu_ms_per_request"], f"{r['ratio_to_floor']:.2f}",
                     f"{r['outbox_items_by_status'].get('delivered', 0)} / {pending}"])
    return table(f"Inbound webhooks forwarded to the app ({CONNECTIONS} connections, app answers after "
                 f"{APP_DELAY * 1000:g} ms, {DURATION:g}s)",
                 ["run", "workers", "req/s", "p50 ms", "p99 ms", "added p50 ms", "errors", "CPU ms/req",
                  "proxy/floor", "forwards delivered / not"], rows)


if __name__ == "__main__":
    main()
