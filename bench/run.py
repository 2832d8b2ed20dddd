"""Run every benchmark (what `make bench` does) and print one summary, memory included.

    PYTHONPATH=. BENCH_POSTGRES_URL=postgresql://... python -m bench.run
Knobs (environment): BENCH_DATABASES=sqlite,postgresql  BENCH_DURATION=10  BENCH_WARMUP=3
BENCH_LOADGEN=wrk|aiohttp  WEB_CONCURRENCY / WEB_THREADS (as in the Procfile)  BENCH_GUNICORN_ARGS.
"""

from __future__ import annotations

import time

from bench import drain, forwarding, gateway, growth, inbound, status
from bench.common import machine, table, write_result


def memory_table(inbound_results: list[dict], gateway_results: list[dict], forwarding_results: list[dict],
                 status_results: list[dict]) -> str:
    rows = []
    for label, results, key in (("inbound bare Flask", inbound_results, "bare"),
                                ("inbound floor", inbound_results, "floor"),
                                ("inbound proxy", inbound_results, "proxy"),
                                ("status callbacks proxy", status_results, "proxy"),
                                ("gateway floor", gateway_results[:1], "floor"),
                                ("gateway proxy", gateway_results, "proxy"),
                                ("forwarding floor", forwarding_results[:1], "floor"),
                                ("forwarding proxy", forwarding_results, "proxy")):
        for r in results:
            mem = r[key]["memory_mib"]
            workers = mem["workers"]
            name = label if label.endswith("floor") and not label.startswith("inbound") \
                else f"{label} ({r['database']})"  # the gateway's and forwarding's floors have no database
            rows.append([name, mem["master"].get("VmRSS"),
                         " / ".join(str(w.get("VmRSS")) for w in workers),
                         " / ".join(str(w.get("VmHWM")) for w in workers),
                         " / ".join(str(w.get("Threads")) for w in workers)])
    return table("Memory after each run (MiB; /proc/<pid>/status of the gunicorn processes)",
                 ["run", "master RSS", "worker RSS", "worker peak (VmHWM)", "worker threads"], rows)


def main() -> None:
    started = time.monotonic()
    print(f"machine: {machine()}")
    inbound_results = inbound.main()
    status_results = status.main()
    gateway_results = gateway.main()
    forwarding_results = forwarding.main()
    drain_results = drain.main()
    growth_results = growth.main()
    summary = [inbound.report(inbound_results), status.report(status_results)]
    if gateway_results:
        first = gateway_results[0]
        summary.append(gateway.report(gateway_results, first["direct"], first["floor"]))
        summary.append(gateway.report_at_rate(gateway_results, first["direct_at_rate"], first["floor_at_rate"]))
    if forwarding_results:
        summary.append(forwarding.report(forwarding_results))
    if drain_results:
        summary.append(drain.report(drain_results))
    summary += [growth.report(growth_results),
                memory_table(inbound_results, gateway_results, forwarding_results, status_results)]
    write_result("summary", {"inbound": inbound_results, "status": status_results, "gateway": gateway_results,
                             "forwarding": forwarding_results,
                             "drain": drain_results, "growth": growth_results,
                             "seconds": round(time.monotonic() - started)})
    print("\n\n## Summary (one run)\n" + "\n".join(summary))
    print(f"\n{round(time.monotonic() - started)}s; JSON in bench/results/")


if __name__ == "__main__":
    main()
