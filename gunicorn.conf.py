"""gunicorn reads this file from the working directory: the worker model, and /metrics across workers.

The Procfile's flags (workers, threads, timeouts) override what is set here. The worker class is
gevent (numbers in README.md "Performance"): a send waiting on Twilio costs a greenlet, not a thread,
and no GIL hand-offs; with SQLite too, where it measured 517 vs 355 sends/s and 786 vs 656 inbound
webhooks/s against gthread (one run each, 4 workers). WEB_WORKER_CLASS=gthread is the alternative
(tested in CI): a SQLite call then blocks one thread rather than one worker's every greenlet.
"""

import gc
import glob
import os
import tempfile


def _worker_class(environ=os.environ) -> str:
    return environ.get("WEB_WORKER_CLASS", "").strip() or "gevent"


worker_class = _worker_class()


def on_starting(server):
    # prometheus-client's multiprocess mode: every worker writes its samples to files in this
    # directory, and /metrics sums them. A stale directory would carry counts of old workers.
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        path = tempfile.mkdtemp(prefix="proxy-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    else:
        os.makedirs(path, exist_ok=True)
        for stale in glob.glob(os.path.join(path, "*.db")):
            os.remove(stale)


def post_worker_init(worker):
    # The app's ~100k objects (Flask, SQLAlchemy, twilio, ...) live as long as the worker. Python's
    # full collections traversed them all: 55-130 ms each under load, several per worker every 10 s,
    # and a gevent worker answers nothing meanwhile (the gateway's max latency at 200 sends/s was
    # +80-110 ms over direct in every run). Frozen, a full collection sees only what requests
    # created: ~1 ms (bench/README.md). Collected first, so no garbage is kept for good.
    gc.collect()
    gc.freeze()


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def worker_exit(server, worker):
    # Send-attempt records still queued in this worker's writer go to the database before it exits
    # (atexit does it too; this runs first and inside gunicorn's graceful timeout).
    from proxy.attempts import flush_all

    flush_all(5.0)
