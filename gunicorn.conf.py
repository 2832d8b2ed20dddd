"""gunicorn reads this file from the working directory: it makes /metrics add up across workers."""

import glob
import os
import tempfile


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
