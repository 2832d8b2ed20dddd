"""gunicorn.conf.py: the worker model it picks and what each worker does once the app is loaded."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CONF = Path(__file__).resolve().parents[1] / "gunicorn.conf.py"


def _run(code: str, env: dict | None = None) -> str:
    # In a child process: the hooks change process-wide state (the garbage collector).
    prelude = f"import runpy; conf = runpy.run_path({str(CONF)!r})\n"
    done = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=60,
                          env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_worker_freezes_the_loaded_app_out_of_the_garbage_collectors_reach():
    out = _run("import gc, weakref\n"
               "class Node: pass\n"
               "before = gc.get_freeze_count()\n"
               "node = Node(); node.me = node; alive = weakref.ref(node); del node  # freed only by a collection\n"
               "conf['post_worker_init'](None)\n"
               "print(before, gc.get_freeze_count(), alive() is None)")
    before, frozen, collected = out.split()
    assert int(before) == 0
    assert int(frozen) > 1000  # the interpreter's and the config's objects, now outside full collections
    assert collected == "True"  # garbage was collected before the freeze, not kept for good


def test_worker_class_is_gevent_unless_the_environment_says_otherwise():
    import os

    assert _run("print(conf['worker_class'])", {**os.environ, "WEB_WORKER_CLASS": ""}) == "gevent"
    assert _run("print(conf['worker_class'])", {**os.environ, "WEB_WORKER_CLASS": "gthread"}) == "gthread"


def test_workers_are_web_concurrency_else_chosen_by_database():
    import os

    code = "import os; print(conf['_workers'](), len(os.sched_getaffinity(0)))"
    base = {k: v for k, v in os.environ.items() if k not in ("WEB_CONCURRENCY", "DATABASE_URL")}
    sqlite, cores = map(int, _run(code, base).split())
    assert sqlite == max(2, cores)  # SQLite (the default database): one per core, never fewer than two
    assert _run(code, {**base, "DATABASE_URL": "sqlite:////tmp/x.sqlite3"}).split()[0] == str(max(2, cores))
    assert _run(code, {**base, "DATABASE_URL": "postgres://u@db/proxy"}).split()[0] == "4"
    assert _run(code, {**base, "DATABASE_URL": "postgresql+psycopg://u@db/proxy"}).split()[0] == "4"
    assert _run(code, {**base, "DATABASE_URL": "postgres://u@db/proxy", "WEB_CONCURRENCY": " 3 "}).split()[0] == "3"
