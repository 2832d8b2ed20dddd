"""Benchmark 6: the outbox worker draining a backlog, as after an outage of the business's app.

While the app is down its webhooks wait in the outbox; once it is back, how fast does the Procfile's
`worker:` (`flask --app proxy worker`, WORKER_CONCURRENCY deliveries at once, 10 by default) catch up?
BENCH_DRAIN_ITEMS items (three per conversation: each conversation's go in order) are queued with SQL,
then one worker process delivers them to bench/fake_upstream.py's /app/tail, which answers after
BENCH_APP_DELAY (20 ms) and every TAIL_EVERY-th request after TAIL_DELAY (500 ms), as a real app's
slowest answers come. The bound is Little's law: WORKER_CONCURRENCY ÷ the app's mean answer time.
The rate is taken from the items' own delivery times (first to last), so the worker's start-up and
this script's polling are not in it.

    PYTHONPATH=. BENCH_POSTGRES_URL=postgresql://... python -m bench.drain
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy import create_engine, func, select

from bench.common import (BUSINESSES, ROOT, Subprocess, base_env, database_url, databases_from_env, free_port,
                          proc_cpu, proc_memory, table, user_number, write_result)
from bench.fake_upstream import TAIL_PATH

ITEMS = int(os.environ.get("BENCH_DRAIN_ITEMS", "2400"))
PER_CONVERSATION = 3
APP_DELAY = float(os.environ.get("BENCH_APP_DELAY", "0.02"))
TAIL_EVERY, TAIL_DELAY = 20, 0.5
CONCURRENCY = int(os.environ.get("WORKER_CONCURRENCY", "10"))
TIMEOUT = 600.0  # the worst a run may take (a batch-at-a-time worker needed about 6x the bound's time)


def mean_answer_seconds() -> float:
    return ((TAIL_EVERY - 1) * APP_DELAY + TAIL_DELAY) / TAIL_EVERY


def queue_backlog(url: str, target: str) -> None:
    """ITEMS inbound webhooks waiting for the worker, due now, as a failed inline attempt leaves them."""
    from proxy import outbox
    from proxy.db import utcnow

    engine = create_engine(url)
    now = utcnow() - timedelta(seconds=1)
    business = BUSINESSES[0]
    with engine.begin() as conn:
        for n in range(ITEMS):
            user = user_number(n // PER_CONVERSATION)
            pairs = [("MessageSid", f"SM{n:032x}"), ("AccountSid", "AC" + "0" * 32), ("From", user),
                     ("To", business), ("Body", "where is my order?"), ("NumMedia", "0"), ("ProfileName", "Ann")]
            outbox.enqueue(conn, kind="inbound", ordering_key=f"inbound:{business}|{user}", target=target,
                           headers={"User-Agent": "TwilioProxy/1.1"}, body=pairs, now=now)
    engine.dispose()


def drain(kind: str, workdir: Path, app_url: str) -> dict:
    url = database_url(kind, workdir)
    queue_backlog(url, app_url + TAIL_PATH)
    env = base_env(DATABASE_URL=url, TWILIO_API_BASE_URL="http://127.0.0.1:9",
                   TWILIO_CONTENT_BASE_URL="http://127.0.0.1:9", WORKER_CONCURRENCY=CONCURRENCY)
    log_path = Path(tempfile.gettempdir()) / f"bench-drain-{kind}.log"
    engine = create_engine(url)
    from proxy.db import outbox

    with open(log_path, "w") as log:
        worker = subprocess.Popen([sys.executable, "-m", "flask", "--app", "proxy", "worker"], cwd=ROOT, env=env,
                                  stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + TIMEOUT
            while time.monotonic() < deadline and worker.poll() is None:
                with engine.connect() as conn:
                    left = conn.scalar(select(func.count()).select_from(outbox).where(outbox.c.status != "delivered"))
                if not left:
                    break
                time.sleep(0.25)
            cpu, memory = proc_cpu(worker.pid), proc_memory(worker.pid)
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
    with engine.connect() as conn:
        by_status = dict(conn.execute(select(outbox.c.status, func.count()).group_by(outbox.c.status)).all())
        first, last, attempts = conn.execute(
            select(func.min(outbox.c.updated_at), func.max(outbox.c.updated_at), func.max(outbox.c.attempts))
            .where(outbox.c.status == "delivered")).one()
    engine.dispose()
    delivered = by_status.get("delivered", 0)
    seconds = (last - first).total_seconds() if delivered > 1 else None
    rate = round((delivered - 1) / seconds, 1) if seconds else None
    bound = CONCURRENCY / mean_answer_seconds()
    return {"database": kind, "items": ITEMS, "per_conversation": PER_CONVERSATION, "concurrency": CONCURRENCY,
            "app_delay_s": APP_DELAY, "tail_every": TAIL_EVERY, "tail_delay_s": TAIL_DELAY,
            "items_by_status": by_status, "max_attempts": attempts, "seconds": seconds, "items_per_s": rate,
            "bound_items_per_s": round(bound, 1), "ratio_to_bound": round(rate / bound, 3) if rate else None,
            "worker_cpu_ms_per_item": round(cpu * 1000 / delivered, 2) if delivered else None,
            "memory_mib": memory, "command": "flask --app proxy worker", "log": str(log_path)}


def main() -> list[dict]:
    port = free_port()
    app_url = f"http://127.0.0.1:{port}"
    results = []
    with Subprocess(["-m", "bench.fake_upstream", "--port", str(port), "--app-delay", str(APP_DELAY),
                     "--tail-every", str(TAIL_EVERY), "--tail-delay", str(TAIL_DELAY)], port, "drain-app"), \
            tempfile.TemporaryDirectory(prefix="bench-drain-") as tmp:
        for kind in databases_from_env():
            r = drain(kind, Path(tmp), app_url)
            write_result(f"drain-{kind}", r)
            results.append(r)
    if results:
        print(report(results))
    return results


def report(results: list[dict]) -> str:
    rows = [[r["database"], r["items_by_status"].get("delivered", 0), r["items"], r["seconds"], r["items_per_s"],
             r["bound_items_per_s"], r["ratio_to_bound"], r["max_attempts"], r["worker_cpu_ms_per_item"],
             r["memory_mib"].get("VmRSS")] for r in results]
    return table(f"Outbox worker draining a backlog ({ITEMS} webhooks, {PER_CONVERSATION} per conversation, "
                 f"WORKER_CONCURRENCY {CONCURRENCY}; the app answers in {APP_DELAY * 1000:g} ms, every "
                 f"{TAIL_EVERY}th in {TAIL_DELAY * 1000:g} ms)",
                 ["database", "delivered", "of", "seconds", "items/s", "bound (Little)", "ratio", "max attempts",
                  "worker CPU ms/item", "worker RSS MiB"], rows)


if __name__ == "__main__":
    main()
