"""The app under test, wrapped so that bench/instructions.py can tell callgrind where a measured stretch begins and ends.

Served by the Procfile's web command under valgrind: `BENCH_CALLGRIND_APP` names the app (a gunicorn app spec,
`proxy:create_app()` or a bench baseline), `BENCH_CALLGRIND_LIB` the marks library bench/instructions.py built.
`GET /__callgrind/start` zeroes the worker's counts and starts counting; `GET /__callgrind/stop` writes them out
and stops. Every other request goes to the app, through one comparison of its path, the same for every app.
"""

from __future__ import annotations

import ctypes
import os

from gunicorn.util import import_app

_PREFIX = "/__callgrind/"
_marks = ctypes.CDLL(os.environ["BENCH_CALLGRIND_LIB"])
_inner = import_app(os.environ["BENCH_CALLGRIND_APP"])


def app(environ, start_response):
    path = environ.get("PATH_INFO", "")
    if not path.startswith(_PREFIX):
        return _inner(environ, start_response)
    mark = path[len(_PREFIX):]
    if mark == "start":
        _marks.bench_count_start()
    elif mark == "stop":
        _marks.bench_count_stop()
    else:
        start_response("404 Not Found", [("Content-Length", "0")])
        return [b""]
    start_response("200 OK", [("Content-Length", "0")])
    return [b""]
