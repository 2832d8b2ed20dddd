"""Serve a WSGI app on 127.0.0.1 in a background thread (the simulator, the demo's proxy, test servers)."""

from __future__ import annotations

import threading

from werkzeug.serving import make_server


class ServerThread:
    def __init__(self, app, port: int = 0):
        self.server = make_server("127.0.0.1", port, app, threaded=True)
        self.port = self.server.server_port
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.thread.join(5)
