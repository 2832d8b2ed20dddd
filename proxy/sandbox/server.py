"""Serve a WSGI app on 127.0.0.1 in a background thread (the simulator, the demo's proxy, test servers)."""

from __future__ import annotations

import re
import threading

from werkzeug.serving import WSGIRequestHandler, make_server

_ANSI_STYLE = re.compile(r"\x1b\[[0-9;]*m")


class PlainRequestHandler(WSGIRequestHandler):
    """werkzeug's access line without its ANSI colours, which end up as escape codes in a log file or CI's
    output. Only the styling is taken out: werkzeug already shows a control character of the path escaped."""

    def log(self, type: str, message: str, *args) -> None:
        super().log(type, message, *(_ANSI_STYLE.sub("", a) if isinstance(a, str) else a for a in args))


class ServerThread:
    def __init__(self, app, port: int = 0):
        self.server = make_server("127.0.0.1", port, app, threaded=True, request_handler=PlainRequestHandler)
        self.port = self.server.server_port
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.thread.join(5)
