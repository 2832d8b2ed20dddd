"""proxy.upstream: where a forward goes — straight to the API host (base path kept) or through HTTP_PROXY."""

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from proxy.upstream import Upstream


class Recorder(BaseHTTPRequestHandler):
    """Answers every POST with 201 and remembers its request line and headers (plays Twilio or a proxy)."""

    seen: list

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.seen.append({"line": self.requestline, "headers": self.headers, "body": body})  # case-insensitive
        answer = json.dumps({"sid": "SM" + "1" * 32}).encode()
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


@pytest.fixture
def recorder():
    handler = type("Handler", (Recorder,), {"seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler.seen
    server.shutdown()
    server.server_close()


@pytest.fixture
def no_proxy_env(monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy",
                 "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_a_forward_keeps_the_base_urls_path_and_the_query(recorder, no_proxy_env):
    url, seen = recorder
    upstream = Upstream(url + "/twilio-api/", timeout=2.0, pool_size=2)
    answer = upstream.request("POST", "/2010-04-01/Accounts/AC1/Messages.json", query="a=1",
                              data=[("To", "whatsapp:+1"), ("Body", "hé")], headers={"X-Test": "yes"})
    assert answer.status_code == 201 and json.loads(answer.content)["sid"].startswith("SM")
    assert seen[0]["line"] == "POST /twilio-api/2010-04-01/Accounts/AC1/Messages.json?a=1 HTTP/1.1"
    assert seen[0]["headers"]["X-Test"] == "yes"
    assert seen[0]["body"] == b"To=whatsapp%3A%2B1&Body=h%C3%A9"


def test_an_http_api_behind_http_proxy_is_asked_in_absolute_form_with_the_proxys_credentials(recorder,
                                                                                              no_proxy_env):
    proxy_url, seen = recorder
    no_proxy_env.setenv("HTTP_PROXY", proxy_url.replace("http://", "http://bob:s3cret@"))
    upstream = Upstream("http://api.twilio.invalid", timeout=2.0, pool_size=2)
    answer = upstream.request("POST", "/2010-04-01/Accounts/AC1/Messages.json", data=b"To=x", headers={})
    assert answer.status_code == 201
    # The request reached the proxy (the .invalid host itself was never resolved), naming its target.
    assert seen[0]["line"] == "POST http://api.twilio.invalid/2010-04-01/Accounts/AC1/Messages.json HTTP/1.1"
    assert seen[0]["headers"]["Proxy-Authorization"] == "Basic " + base64.b64encode(b"bob:s3cret").decode()


def test_no_proxy_sends_the_forward_straight_to_the_host(recorder, no_proxy_env):
    url, seen = recorder
    no_proxy_env.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # would refuse: nothing listens there
    no_proxy_env.setenv("NO_PROXY", "127.0.0.1")
    answer = Upstream(url, timeout=2.0, pool_size=2).request("POST", "/x.json", data=b"a=b", headers={})
    assert answer.status_code == 201 and seen[0]["line"] == "POST /x.json HTTP/1.1"


def test_a_pooled_connection_the_server_closed_is_replaced_not_reused(no_proxy_env):
    """The reuse check (proxy.upstream._ReuseCheck): a kept-alive connection the peer has since closed
    is dropped before the next send, so that send goes out on a new connection instead of failing."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted = []

    def serve():
        for _ in range(2):
            conn, _ = listener.accept()
            accepted.append(conn)
            conn.recv(65536)
            body = b'{"sid": "SM1"}'
            conn.sendall(b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\n\r\n" + body)  # keep-alive, as far as urllib3 knows
            conn.close()  # ... but the server goes away right after answering

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    upstream = Upstream(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout=2.0, pool_size=1)
    first = upstream.request("POST", "/x", data=b"a=1", headers={})
    pooled = upstream._host_pool.pool.queue[-1]
    assert first.status_code == 201 and pooled is not None and pooled.sock is not None
    deadline = time.monotonic() + 5
    while pooled.is_connected and time.monotonic() < deadline:  # the FIN reaches the client's socket
        time.sleep(0.01)
    assert not pooled.is_connected
    second = upstream.request("POST", "/x", data=b"a=2", headers={})
    assert second.status_code == 201 and len(accepted) == 2
    thread.join(5)
    listener.close()


def test_a_kept_alive_connection_is_reused(no_proxy_env):
    handler = type("Handler", (Recorder,), {"seen": [], "protocol_version": "HTTP/1.1"})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        upstream = Upstream(f"http://127.0.0.1:{server.server_address[1]}", timeout=2.0, pool_size=1)
        upstream.request("POST", "/x", data=b"a=1", headers={})
        pooled = upstream._host_pool.pool.queue[-1]
        assert type(pooled).__name__ == "_HTTPConnection" and pooled.is_connected
        upstream.request("POST", "/x", data=b"a=2", headers={})
        assert upstream._host_pool.pool.queue[-1] is pooled and upstream._host_pool.num_connections == 1
    finally:
        server.shutdown()
        server.server_close()
