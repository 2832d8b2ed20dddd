"""gunicorn reads this file from the working directory: the worker model, and /metrics across workers.

The Procfile's flags (workers, threads, timeouts) override what is set here; the worker class is
chosen here because it depends on the database (numbers in README.md "Performance"):
gevent with PostgreSQL (forwarding waits cost a greenlet, not a thread, and no GIL convoy), gthread
with SQLite (a SQLite lock wait would block every greenlet of a worker). WEB_WORKER_CLASS overrides.
"""

import glob
import os
import tempfile


def _worker_class(environ=os.environ) -> str:
    chosen = environ.get("WEB_WORKER_CLASS", "").strip()
    if chosen:
        return chosen
    database = environ.get("DATABASE_URL", "").strip()
    return "gevent" if database.startswith(("postgres://", "postgresql")) else "gthread"


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


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def worker_exit(server, worker):
    # Send-attempt records still queued in this worker's writer go to the database before it exits
    # (atexit does it too; this runs first and inside gunicorn's graceful timeout).
    from proxy.attempts import flush_all

    flush_all(5.0)
