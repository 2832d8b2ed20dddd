"""Prometheus metrics, multiprocess-safe under gunicorn (PROMETHEUS_MULTIPROC_DIR, set by gunicorn.conf.py)."""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import multiprocess
from prometheus_client.core import GaugeMetricFamily

DECISIONS = Counter(
    "proxy_send_decisions_total", "Send decisions of the gateway.", ["action", "reason", "content_type"]
)
WEBHOOKS = Counter("proxy_webhooks_total", "Twilio webhooks received.", ["kind", "outcome"])
UPSTREAM_SECONDS = Histogram(
    "proxy_upstream_seconds",
    "Time Twilio's API took to answer a forwarded request.",
    ["operation", "outcome"],
    buckets=(0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10, 30),
)
# What the proxy adds to a send, which the issue it answers asks to be invisible: watched in production, not only in a
# benchmark. Twilio's own time is proxy_upstream_seconds.
SEND_OVERHEAD_SECONDS = Histogram(
    "proxy_send_overhead_seconds",
    "Time a judged Messages create spent in the proxy itself (read, judged, relayed), Twilio's answer excluded.",
    ["action"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 10),
)


class OutboxDepth:
    """Outbox items by status, read from the database at scrape time (shared by every instance), and whether
    the database answered: the outbox series are absent when it did not, proxy_database_up never is."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        from . import holds, outbox
        from .db import utcnow

        family = GaugeMetricFamily("proxy_outbox_items", "Outbox items by status.", labels=["status"])
        held = GaugeMetricFamily("proxy_held_messages", "Held messages (HOLD_ON_REROUTE) by status.", labels=["status"])
        now = utcnow()
        try:
            with self.engine.connect() as conn:
                counts, oldest = outbox.depth(conn), outbox.oldest_due(conn, now)
                held_counts = holds.counts(conn)
        except Exception:  # noqa: BLE001 — a scrape must not fail because the database is away
            yield _database_up(0)
            return
        yield _database_up(1)
        for status in outbox.STATUSES:  # every one, so a stuck `sending` or `uncertain` item can be alerted on
            family.add_metric([status], counts.get(status, 0))
        yield family
        for status in holds.STATUSES:  # `uncertain`: a release Twilio may have taken, for an operator to check
            held.add_metric([status], held_counts.get(status, 0))
        yield held
        # Alert when it stays above a minute: no worker is running, or it is far behind.
        yield GaugeMetricFamily("proxy_outbox_oldest_due_seconds",
                                "How long the longest-waiting due outbox item has waited for a worker.",
                                value=(now - oldest).total_seconds() if oldest else 0.0)


def _database_up(value: int) -> GaugeMetricFamily:
    # Without it an outage only removed series, and an alert on a missing series does not fire by itself.
    return GaugeMetricFamily("proxy_database_up",
                             "1 when the database answered this scrape's outbox queries, else 0 (unreachable, or "
                             "its tables missing).", value=value)


def exposition(engine) -> tuple[bytes, str]:
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.MultiProcessCollector(registry)
    else:
        for collector in (DECISIONS, WEBHOOKS, UPSTREAM_SECONDS, SEND_OVERHEAD_SECONDS):
            registry.register(collector)
    registry.register(OutboxDepth(engine))
    return generate_latest(registry), CONTENT_TYPE_LATEST
