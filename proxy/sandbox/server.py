"""Serve a WSGI app on 127.0.0.1 in a background thread (the simulator, the demo's proxy, test servers)."""

from __future__ import annotations

import re
import threading

from werkzeug.serving import WSGIRequestHandler, make_server
from werkzeug.urls import uri_to_iri

from ..logs import masked_path

_ANSI_STYLE = re.compile(r"\x1b\[[0-9;]*m")


class PlainRequestHandler(WSGIRequestHandler):
    """werkzeug's access line without its ANSI colours, which end up as escape codes in a log file or CI's
    output, and without what the proxy's own lines never show: a query's values (a list's `To=whatsapp:+1…`) and
    phone numbers in the path. werkzeug already shows a control character of the path escaped."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        path = getattr(self, "path", None)
        if path is None:  # a request line werkzeug could not read: its own words for it
            line = self.requestline
        else:
            path, _, query = path.partition("?")
            # Decoded first (as werkzeug's own line is), so a %2B-escaped number is masked too.
            line = f"{self.command} {masked_path(uri_to_iri(path))}{'?…' if query else ''} {self.request_version}"
        # Control characters escaped, as werkzeug's own line has them: a raw ESC from a client would reach the terminal.
        line = line.translate(self._control_char_table)
        self.log("info", '"%s" %s %s', line, int(code) if isinstance(code, int) else code, size)

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
