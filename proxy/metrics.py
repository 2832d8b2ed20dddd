"""Prometheus metrics, multiprocess-safe under gunicorn (PROMETHEUS_MULTIPROC_DIR, set by gunicorn.conf.py)."""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import REGISTRY, multiprocess

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


def exposition() -> tuple[bytes, str]:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return generate_latest(registry), CONTENT_TYPE_LATEST
