"""Benchmark 1: signed inbound webhooks through gunicorn (Procfile settings) vs a bare Flask endpoint.

Each request is a Twilio-shaped, correctly signed POST /twilio/inbound with its own MessageSid; most
come from new users (a new window), about a quarter from a user seen before (the window is extended).
The bare endpoint gets the very same requests under the same gunicorn command in the same run, and
so does the floor (bench/bare_webhook.py: Flask checking the signature as Twilio's guide does, no
database): "proxy/floor" is the share the proxy's own work (the message, its window, the log line) leaves.

    PYTHONPATH=. BENCH_POSTGRES_URL=postgresql://... python -m bench.inbound
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from urllib.parse import urlencode

from sqlalchemy import create_engine, func, select
from twilio.request_validator import RequestValidator

from bench.common import (ACCOUNT_SID, AUTH_TOKEN, BUSINESSES, Gunicorn, database_url, databases_from_env,
                          server_settings, table, user_number, write_result)

DURATION = float(os.environ.get("BENCH_DURATION", "10"))
WARMUP = float(os.environ.get("BENCH_WARMUP", "3"))
CONNECTIONS = int(os.environ.get("BENCH_INBOUND_CONNECTIONS", "64"))
REQUESTS = int(os.environ.get("BENCH_INBOUND_REQUESTS", "60000"))  # more than a run can use: no sid repeats
REPEAT_SHARE = 0.25
PATH = "/twilio/inbound"


def webhook_requests(base_url: str, count: int, *, sid_prefix: str, seed: int) -> list[tuple[str, str, dict, str]]:
    """`count` signed webhooks; `sid_prefix` (hex) keeps the sids of different batches apart."""
    # The proxy takes only real message sids (SM + 32 hex digits); anything else would measure its 400.
    if not (0 < len(sid_prefix) <= 8 and all(c in "0123456789abcdefABCDEF" for c in sid_prefix)):
        raise ValueError(f"sid_prefix must be 1 to 8 hex digits, got {sid_prefix!r}")
    digits = 32 - len(sid_prefix)
    rng = random.Random(seed)
    validator = RequestValidator(AUTH_TOKEN)
    seen: list[int] = []
    out = []
    for i in range(count):
        if seen and rng.random() < REPEAT_SHARE:
            n = rng.choice(seen)
        else:
            n = seed * 10_000_000 + i
            seen.append(n)
        user = user_number(n % 10_000_000)
        params = {"MessageSid": f"SM{sid_prefix}{i:0{digits}x}", "AccountSid": ACCOUNT_SID, "From": user,
                  "To": BUSINESSES[n % len(BUSINESSES)], "Body": "hello there", "NumMedia": "0",
                  "SmsStatus": "received", "ApiVersion": "2010-04-01", "ProfileName": f"User {n}",
                  "WaId": user.removeprefix("whatsapp:+")}
        params["SmsSid"] = params["MessageSid"]
        signature = validator.compute_signature(base_url + PATH, params)
        out.append(("POST", PATH, {"Content-Type": "application/x-www-form-urlencoded",
                                   "X-Twilio-Signature": signature}, urlencode(params)))
    return out


def measure(server: Gunicorn) -> dict:
    warm = webhook_requests(server.url, 3000, sid_prefix="aa", seed=7)
    server.load(warm, connections=CONNECTIONS, duration=WARMUP)
    reqs = webhook_requests(server.url, REQUESTS, sid_prefix="bb", seed=1)
    result = server.load(reqs, connections=CONNECTIONS, duration=DURATION)
    result["memory_mib"] = server.rss()
    return result


def run(kind: str, workdir: Path) -> dict:
    url = database_url(kind, workdir)
    env = {"DATABASE_URL": url, "TWILIO_API_BASE_URL": "http://127.0.0.1:9",
           "TWILIO_CONTENT_BASE_URL": "http://127.0.0.1:9"}
    extra = os.environ.get("BENCH_GUNICORN_ARGS", "")
    with Gunicorn(env, app_spec="bench.bare_app:app", label="bare", extra_args=extra) as bare:
        bare_result = measure(bare)
    with Gunicorn(env, app_spec="bench.bare_webhook:app", label="inbound-floor", extra_args=extra) as floor:
        floor_result = measure(floor)
    with Gunicorn(env, label=f"inbound-{kind}", extra_args=extra) as proxy:
        proxy_result = measure(proxy)
        log_tail = proxy.log_path.read_text().splitlines()[-1:] if proxy.log_path.exists() else []
    engine = create_engine(url)
    with engine.connect() as conn:
        from proxy.db import messages, windows
        stored = {"messages": conn.scalar(select(func.count()).select_from(messages)),
                  "windows": conn.scalar(select(func.count()).select_from(windows))}
    engine.dispose()
    return {"database": kind, "command": proxy.command, **server_settings(proxy.env),
            "duration_s": DURATION, "connections": CONNECTIONS,
            "bare": bare_result, "floor": floor_result, "proxy": proxy_result, "stored_rows": stored,
            "ratio_rps": round(proxy_result["rps"] / bare_result["rps"], 3) if bare_result["rps"] else None,
            "ratio_to_floor": round(proxy_result["rps"] / floor_result["rps"], 3) if floor_result["rps"] else None,
            "target_ratio": 0.6 if kind == "sqlite" else 0.5, "proxy_log_last_line": log_tail}


def report(results: list[dict]) -> str:
    rows = []
    for r in results:
        for name, label in (("bare", "bare Flask"), ("floor", "floor: Flask + signature check"),
                            ("proxy", "proxy /twilio/inbound")):
            m = r[name]
            rows.append([f"{r['database']}: {label}",
                         r["workers"], m["rps"], m["p50_ms"], m["p99_ms"], m["ok"], m["non_2xx_3xx"] + m["socket_errors"] + m["timeouts"],
                         m["server_cpu_ms_per_request"],
                         f"{r['ratio_rps']:.2f} (target >= {r['target_ratio']})" if name == "proxy" else "",
                         f"{r['ratio_to_floor']:.2f}" if name == "proxy" else ""])
    return table(f"Inbound webhooks ({results[0]['connections']} connections, {DURATION:g}s; "
                 f"the bare endpoint runs under the same gunicorn settings)",
                 ["run", "workers", "req/s", "p50 ms", "p99 ms", "ok", "errors", "CPU ms/req", "proxy/bare",
                  "proxy/floor"], rows)


def main() -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-inbound-") as tmp:
        for kind in databases_from_env():
            result = run(kind, Path(tmp))
            write_result(f"inbound-{kind}", result)
            results.append(result)
    print(report(results))
    return results


if __name__ == "__main__":
    main()
