"""Benchmark 3: does the send decision slow down as the windows table grows (10^3 vs 10^6 rows)?

Each size gets its own database (SQLite file / PostgreSQL schema), filled with one SQL statement
(generate_series / a recursive CTE); then `proxy.judge.judge` (validation, address normalisation,
the window lookup through the unique (sender, user) index, `proxy.policy.decide`) is timed
in-process for random existing pairs and 10% unknown ones, and the bare lookup
`proxy.store.load_window` on its own, in alternating rounds of 200 calls per size.

    PYTHONPATH=. BENCH_POSTGRES_URL=postgresql://... python -m bench.growth
"""

from __future__ import annotations

import os
import random
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy import text
from werkzeug.datastructures import MultiDict

from bench.common import ACCOUNT_SID, AUTH_TOKEN, BUSINESSES, database_url, databases_from_env, table, user_number
from bench.common import write_result

SIZES = [int(s) for s in os.environ.get("BENCH_GROWTH_SIZES", "1000,1000000").split(",")]
CALLS = int(os.environ.get("BENCH_GROWTH_CALLS", "6000"))  # per size, in rounds of ROUND calls
ROUND = 200
TIME_LIMIT = float(os.environ.get("BENCH_GROWTH_SECONDS", "40"))  # per kind, whichever comes first


def insert_windows(engine, start: int, stop: int) -> float:
    """Rows start..stop-1: sender BUSINESSES[n % 4], user user_number(n), expiring in 23 hours."""
    from proxy.db import utcnow

    now = utcnow()
    expires = now + timedelta(hours=23)
    t0 = time.perf_counter()
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text(
                "INSERT INTO windows (sender, \"user\", expires_at, last_inbound_at, last_inbound_sid, profile_name,"
                " updated_at) SELECT 'whatsapp:+1415555' || lpad((100 + n % 4)::text, 4, '0'),"
                " 'whatsapp:+1650' || lpad(n::text, 7, '0'), :exp, :now, 'SM' || md5(n::text), 'User', :now"
                " FROM generate_series(:start, :stop - 1) AS n"), {"exp": expires, "now": now, "start": start,
                                                                   "stop": stop})
            conn.execute(text("ANALYZE windows"))
        else:
            fmt = "%Y-%m-%d %H:%M:%S.%f"
            conn.execute(text(
                "WITH RECURSIVE c(n) AS (SELECT :start UNION ALL SELECT n + 1 FROM c WHERE n + 1 < :stop) "
                "INSERT INTO windows (sender, user, expires_at, last_inbound_at, last_inbound_sid, profile_name,"
                " updated_at) SELECT printf('whatsapp:+1415555%04d', 100 + n % 4), printf('whatsapp:+1650%07d', n),"
                " :exp, :now, 'SM' || hex(randomblob(16)), 'User', :now FROM c"),
                {"exp": expires.replace(tzinfo=None).strftime(fmt), "now": now.replace(tzinfo=None).strftime(fmt),
                 "start": start, "stop": stop})
            conn.execute(text("ANALYZE"))
    return time.perf_counter() - t0


def form_for(n: int) -> MultiDict:
    return MultiDict({"To": user_number(n), "From": BUSINESSES[n % len(BUSINESSES)], "Body": "Your order shipped."})


def stats(samples: list[float]) -> dict:
    s = sorted(samples)
    return {"calls": len(s), "p50_us": round(statistics.median(s) * 1e6, 1),
            "p99_us": round(s[int(0.99 * (len(s) - 1))] * 1e6, 1), "mean_us": round(statistics.fmean(s) * 1e6, 1)}


def run(kind: str, workdir: Path) -> dict:
    """One database per size, measured in alternating rounds: drift and noise on this shared machine
    then hit every size alike, instead of whichever size happened to be measured in a noisy moment."""
    from proxy import create_app
    from proxy.judge import judge
    from proxy.policy import Action
    from proxy.settings import Settings
    from proxy.store import load_window

    rng = random.Random(42)
    sizes = {}
    for i, size in enumerate(SIZES):
        url = database_url(kind, workdir, "bench" if i == len(SIZES) - 1 else f"growth_{size}")
        app = create_app(Settings(account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN, database_url=url,
                                  twilio_api_base_url="http://127.0.0.1:9", twilio_content_base_url="http://127.0.0.1:9"))
        rt = app.extensions["proxy"]
        insert_s = insert_windows(rt.engine, 0, size)
        # 90% pairs that exist in the table, 10% that do not (a closed window: blocked).
        picks = [rng.randrange(size) if rng.random() < 0.9 else size + rng.randrange(10**6) for _ in range(CALLS)]
        forms = [form_for(n) for n in picks]
        for form in forms[:300]:  # warm the pool, the statement cache, the pages
            judge(rt, form)
        allowed = sum(judge(rt, form).decision.action is Action.ALLOWED for form in forms[:1000])
        sizes[size] = {"rt": rt, "forms": forms, "pairs": [(BUSINESSES[n % len(BUSINESSES)], user_number(n))
                                                         for n in picks],
                       "insert_s": round(insert_s, 1), "allowed_share": round(allowed / 1000, 3),
                       "judge": [], "lookup": []}

    def lookup(rt, sender, user):
        with rt.reader.connect() as conn:  # as proxy.judge reads it
            return load_window(conn, sender, user)

    deadline = time.monotonic() + TIME_LIMIT
    rounds = 0
    for start in range(0, CALLS, ROUND):
        for size, s in sizes.items():
            rt = s["rt"]
            for form in s["forms"][start:start + ROUND]:
                t0 = time.perf_counter()
                judge(rt, form)
                s["judge"].append(time.perf_counter() - t0)
            for sender, user in s["pairs"][start:start + ROUND]:
                t0 = time.perf_counter()
                lookup(rt, sender, user)
                s["lookup"].append(time.perf_counter() - t0)
        rounds += 1
        if time.monotonic() > deadline:
            break
    per_size = {}
    for size, s in sizes.items():
        s["rt"].engine.dispose()
        per_size[str(size)] = {"insert_s": s["insert_s"], "allowed_share": s["allowed_share"],
                               "judge": stats(s["judge"]), "lookup": stats(s["lookup"])}
    small, large = per_size[str(SIZES[0])], per_size[str(SIZES[-1])]
    return {"database": kind, "sizes": SIZES, "rounds": rounds, "round_calls": ROUND, "results": per_size,
            "ratio_judge_p50": round(large["judge"]["p50_us"] / small["judge"]["p50_us"], 3),
            "ratio_lookup_p50": round(large["lookup"]["p50_us"] / small["lookup"]["p50_us"], 3),
            "ratio_judge_mean": round(large["judge"]["mean_us"] / small["judge"]["mean_us"], 3), "target_ratio": 1.3}


def report(results: list[dict]) -> str:
    rows = []
    for r in results:
        for size in r["sizes"]:
            m = r["results"][str(size)]
            rows.append([f"{r['database']}: {size:,} windows", m["judge"]["p50_us"], m["judge"]["p99_us"],
                         m["lookup"]["p50_us"], m["lookup"]["p99_us"], m["judge"]["calls"], m["insert_s"],
                         f"{r['ratio_judge_p50']:.2f} / {r['ratio_lookup_p50']:.2f}" if size == r["sizes"][-1] else ""])
    return table("Growth: send decision (judge) and window lookup, in-process (target ratio <= 1.3)",
                 ["table size", "judge p50 us", "judge p99 us", "lookup p50 us", "lookup p99 us", "calls",
                  "insert s", "ratio judge / lookup"], rows)


def main() -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-growth-") as tmp:
        for kind in databases_from_env():
            result = run(kind, Path(tmp))
            write_result(f"growth-{kind}", result)
            results.append(result)
    print(report(results))
    return results


if __name__ == "__main__":
    main()
