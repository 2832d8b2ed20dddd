"""Benchmark: signed status callbacks through gunicorn (Procfile settings) vs a bare Flask endpoint.

Status callbacks are the webhook a deployment gets most: `sent`, `delivered` and `read` for every WhatsApp
message sent. Each request is a Twilio-shaped, correctly signed POST /twilio/status for a message the proxy
sent (its attempt row is in the database, SENDS of them, half through a Messaging Service, to SENDS / 4 users:
a user's messages are SENDS / 4 apart). They come as Twilio's do, a message's statuses apart in time: the
`sent` of a block of BLOCK messages, then their `delivered`, then their `read`. The proxy records the status
(committed with other webhooks' writes), and for a service send learns the number it went from (Sticky Sender:
a probe of the send's attempt in the same statement, a write the first time only). The bare endpoint and the
floor (Flask checking the signature, no database) get the very same requests under the same gunicorn command
in the same run.

    PYTHONPATH=. BENCH_POSTGRES_URL=postgresql://... python -m bench.status
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from urllib.parse import urlencode

from sqlalchemy import create_engine, func, inspect, select, text
from twilio.request_validator import RequestValidator

from bench.common import (ACCOUNT_SID, AUTH_TOKEN, BUSINESSES, Gunicorn, database_url, databases_from_env,
                          server_settings, table, user_number, write_result)
from bench.inbound import CONNECTIONS, DURATION, WARMUP

SENDS = int(os.environ.get("BENCH_STATUS_SENDS", "24000"))  # 72,000 callbacks: more than a run can use
USERS = SENDS // 4
BLOCK = 500
SERVICE = "MG" + "5e" * 16
PATH = "/twilio/status"
STATUSES = ("sent", "delivered", "read")


def message_sid(n: int) -> str:
    return f"SM{n:032x}"


def is_service_send(n: int) -> bool:
    return n % 2 == 0


def user_of(n: int) -> str:
    return user_number(n % USERS)


def sender_of(n: int) -> str:
    return BUSINESSES[(n % USERS) % len(BUSINESSES)]


def add_attempts(url: str, first: int, count: int) -> None:
    """The proxy's send records of messages first..first+count-1, as the gateway writes them."""
    from proxy.db import send_attempts, utcnow

    now = utcnow()
    rows = [{"created_at": now, "request_id": f"bench-{n}", "account_sid": ACCOUNT_SID,
             "sender": SERVICE if is_service_send(n) else sender_of(n), "user": user_of(n),
             "channel": "whatsapp", "content_type": "twilio/text", "decision": "allowed", "reason": "window_open",
             "outcome": "sent", "upstream_status": 201, "message_sid": message_sid(n), "params": "[]",
             "duration_ms": 250} for n in range(first, first + count)]
    engine = create_engine(url)
    with engine.begin() as conn:
        for i in range(0, len(rows), 5000):
            conn.execute(send_attempts.insert(), rows[i:i + 5000])
    engine.dispose()


def callback_requests(base_url: str, first: int, count: int) -> list[tuple[str, str, dict, str]]:
    """Each message's three callbacks: by blocks of BLOCK messages, each status of the block in turn."""
    validator = RequestValidator(AUTH_TOKEN)
    out = []
    for block in range(first, first + count, BLOCK):
        for status, n in ((status, n) for status in STATUSES for n in range(block, min(block + BLOCK, first + count))):
            params = {"MessageSid": message_sid(n), "SmsSid": message_sid(n), "AccountSid": ACCOUNT_SID,
                      "From": sender_of(n), "To": user_of(n), "MessageStatus": status, "SmsStatus": status,
                      "ChannelPrefix": "whatsapp", "ApiVersion": "2010-04-01",
                      "ChannelToAddress": user_of(n).removeprefix("whatsapp:")}
            if status == "read":
                params["EventType"] = "READ"
            if is_service_send(n):
                params["MessagingServiceSid"] = SERVICE
            signature = validator.compute_signature(base_url + PATH, params)
            out.append(("POST", PATH, {"Content-Type": "application/x-www-form-urlencoded",
                                       "X-Twilio-Signature": signature}, urlencode(params)))
    return out


WARM_SENDS = 1000


def measure(server: Gunicorn) -> dict:
    server.load(callback_requests(server.url, 0, WARM_SENDS), connections=CONNECTIONS, duration=WARMUP)
    result = server.load(callback_requests(server.url, WARM_SENDS, SENDS), connections=CONNECTIONS, duration=DURATION)
    result["memory_mib"] = server.rss()
    return result


def run(kind: str, workdir: Path) -> dict:
    url = database_url(kind, workdir)
    add_attempts(url, 0, WARM_SENDS + SENDS)
    env = {"DATABASE_URL": url, "TWILIO_API_BASE_URL": "http://127.0.0.1:9",
           "TWILIO_CONTENT_BASE_URL": "http://127.0.0.1:9"}
    extra = os.environ.get("BENCH_GUNICORN_ARGS", "")
    with Gunicorn(env, app_spec="bench.bare_app:app", label="status-bare", extra_args=extra) as bare:
        bare_result = measure(bare)
    with Gunicorn(env, app_spec="bench.bare_webhook:app", label="status-floor", extra_args=extra) as floor:
        floor_result = measure(floor)
    with Gunicorn(env, label=f"status-{kind}", extra_args=extra) as proxy:
        proxy_result = measure(proxy)
    engine = create_engine(url)
    with engine.connect() as conn:
        from proxy.db import messages
        stored = {"statuses": conn.scalar(select(func.count()).select_from(messages))}
        if inspect(conn).has_table("sticky_senders"):  # an A/B against a tree from before migration 0006
            stored["sticky_senders"] = conn.scalar(text("SELECT count(*) FROM sticky_senders"))
    engine.dispose()
    return {"database": kind, "command": proxy.command, **server_settings(proxy.env),
            "duration_s": DURATION, "connections": CONNECTIONS,
            "bare": bare_result, "floor": floor_result, "proxy": proxy_result, "stored_rows": stored,
            "ratio_rps": round(proxy_result["rps"] / bare_result["rps"], 3) if bare_result["rps"] else None,
            "ratio_to_floor": round(proxy_result["rps"] / floor_result["rps"], 3) if floor_result["rps"] else None}


def report(results: list[dict]) -> str:
    rows = []
    for r in results:
        for name, label in (("bare", "bare Flask"), ("floor", "floor: Flask + signature check"),
                            ("proxy", "proxy /twilio/status")):
            m = r[name]
            rows.append([f"{r['database']}: {label}", r["workers"], m["rps"], m["p50_ms"], m["p99_ms"], m["ok"],
                         m["non_2xx_3xx"] + m["socket_errors"] + m["timeouts"], m["server_cpu_ms_per_request"],
                         f"{r['ratio_rps']:.2f}" if name == "proxy" else "",
                         f"{r['ratio_to_floor']:.2f}" if name == "proxy" else ""])
    return table(f"Status callbacks ({results[0]['connections']} connections, {DURATION:g}s; sent, delivered, read "
                 "of each message, half sent through a Messaging Service)",
                 ["run", "workers", "req/s", "p50 ms", "p99 ms", "ok", "errors", "CPU ms/req", "proxy/bare",
                  "proxy/floor"], rows)


def main() -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-status-") as tmp:
        for kind in databases_from_env():
            result = run(kind, Path(tmp))
            write_result(f"status-{kind}", result)
            results.append(result)
    print(report(results))
    return results


if __name__ == "__main__":
    main()
