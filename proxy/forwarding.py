"""Forward a Twilio webhook to the business's app, signed so the app's own RequestValidator accepts it."""

from __future__ import annotations

import base64
import concurrent.futures
import functools
import logging
import socket
import threading
import time
from dataclasses import dataclass
from urllib.parse import unquote, urlencode

import certifi
import urllib3
from twilio.request_validator import RequestValidator
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, HTTPError, NewConnectionError, ProtocolError, ReadTimeoutError
from werkzeug.datastructures import MultiDict

from . import logs
from .headers import sendable

# Twilio's request headers worth passing on. The signature is recomputed for the app's URL with the auth
# token, so Twilio's SharedKey signature-settings header is not kept.
TWILIO_HEADERS = ("I-Twilio-Idempotency-Token", "X-Home-Region", "User-Agent")
# The proxy's own, which only it sets: the same names in a request (the signature does not cover headers)
# are never passed on, or a replayed callback could tell the app what it likes under a valid signature.
PROXY_HEADERS = ("X-Proxy-Window-Expires-At", "X-Proxy-Outbox-Id")
KEPT_HEADERS = TWILIO_HEADERS + PROXY_HEADERS
# The query of the URL Twilio posted the webhook to (a StatusCallback's `?order=44`, an inbound URL's
# `?tenant=acme`), kept with the headers under a name no header can have, and added to the forward URL: the app
# gets it as it would from Twilio. Never sent as a header.
WEBHOOK_QUERY = ":query"


def with_query(url: str, query: str | None) -> str:
    """The forward URL with the webhook's query after its own (`…/status?src=proxy&order=44`)."""
    if not query:
        return url
    return f"{url}{'' if url.endswith(('?', '&')) else '&' if '?' in url else '?'}{query}"


# The app's "not now" (Request Timeout, Too Many Requests): retried like a 5xx. Any other 4xx is its answer.
RETRYABLE_4XX = frozenset({408, 429})
# What a URL that does not reach the app's handler answers (a wrong path, credentials or method), and a
# signature check refusing the forward (an app behind its own TLS terminator checking another URL) — but also
# what an app may answer on purpose (404 for a message it does not know, 403 for a blocked user). Not retried:
# a retried item holds back every later webhook of its conversation for the whole retry schedule. Not counted
# as delivered either: the item is exhausted at once, so a wrong URL's webhooks are kept, counted in /metrics
# and sent again by `outbox replay --all` once it is fixed.
NOT_TAKEN_4XX = frozenset({401, 403, 404, 405})

# The most of the app's answer read. Twilio refuses TwiML over 64 kB (error 11750), so a longer answer is
# nothing Twilio would act on, most likely a debug page or a runaway loop; read whole, it could take a
# worker's memory. Past this the proxy stops reading and hangs up.
MAX_ANSWER_BYTES = 64 * 1024


@dataclass(frozen=True)
class Reply:
    """The app's answer; `ok` False means retry later (down, timed out, 5xx, 408/429, a redirect), or with
    `final` not at all (NOT_TAKEN_4XX)."""

    ok: bool
    status: int | None
    body: bytes
    content_type: str | None
    error: str | None = None
    final: bool = False
    # The app answered more than MAX_ANSWER_BYTES: it had the webhook (`ok`), its answer is not relayed
    # (cut short it would be broken TwiML). `content_length`: the length it declared, if it did.
    too_large: bool = False
    content_length: int | None = None


class Forwarder:
    """Posts webhooks to the app through urllib3 directly (as proxy/upstream.py does for Twilio): requests'
    request preparation cost about 0.6 ms of CPU per forward on top of urllib3's own (bench/README.md)."""

    def __init__(self, auth_token: str, timeout: float, pool_size: int = 16):
        self.validator = RequestValidator(auth_token)
        self.timeout, self.threads = timeout, pool_size
        # Forward targets come from configuration only: no proxy or CA variables from the environment, no
        # redirects followed, no retries (the outbox retries, and counts each attempt).
        self.http = urllib3.PoolManager(num_pools=8, maxsize=pool_size, block=False, retries=False,
                                        ca_certs=certifi.where())
        self.http.pool_classes_by_scheme = _WATCHED_POOLS
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=pool_size, thread_name_prefix="forward")

    def headers_for(self, url: str, pairs: list[tuple[str, str]], kept: dict) -> dict:
        # twilio-python's validator sorts and de-duplicates values itself; a MultiDict keeps repeats.
        signature = self.validator.compute_signature(url, MultiDict(pairs))
        headers = {k: v for k, v in kept.items() if k in KEPT_HEADERS}
        headers["X-Twilio-Signature"] = signature
        headers["Content-Type"] = "application/x-www-form-urlencoded"
        return headers

    def post(self, url: str, pairs: list[tuple[str, str]], kept: dict, timeout: float | None = None) -> Reply:
        """POST within one overall deadline, counted from this call: a socket timeout is per read, an app
        that drip-feeds its answer must not hold Twilio's webhook past its 15 s limit, and the inline
        attempt's lease (FORWARD_TIMEOUT_SECONDS + 5) must outlast it. At the deadline the connection is
        hung up on, so the thread is free again too.

        A post still waiting for a thread at the deadline is cancelled: it is reported failed and
        retried by the outbox, so it must never go out afterwards. One that went out and was not
        answered in time may still reach the app: that copy and the retry are the same webhook.
        `timeout`: a shorter deadline than FORWARD_TIMEOUT_SECONDS (what is left of Twilio's 15 s).
        """
        limit = self.timeout if timeout is None else min(timeout, self.timeout)
        deadline = time.monotonic() + limit
        line = _Line()
        future = self.pool.submit(self._post, url, pairs, kept, deadline, line, limit)
        try:
            return future.result(timeout=limit)
        except concurrent.futures.TimeoutError:
            if future.cancel():
                return _not_sent(limit)
            # The socket timeout is per read: an app dripping its answer a byte at a time would keep this
            # thread until it finished, and sixteen such answers every forwarding thread.
            line.hang_up()
            return Reply(False, None, b"", None, f"no answer within {limit:g}s")

    def _post(self, url: str, pairs: list[tuple[str, str]], kept: dict, deadline: float, line: _Line,
              limit: float) -> Reply:
        remaining = deadline - time.monotonic()
        if remaining <= 0:  # the caller gave up just as a thread took this post, too late to cancel it
            return _not_sent(limit)
        target, authorization = _target(with_query(url, kept.get(WEBHOOK_QUERY)))
        # Signed for the URL the app sees: credentials in it go as a header, never in the request line, so the
        # app's own RequestValidator over its request URL would reject a signature computed with them.
        headers = {**_DEFAULT_HEADERS, **self.headers_for(target, pairs, kept), **authorization}
        response, read_whole = None, False
        _this_thread.line = line
        try:
            # Streamed: the answer is read here, at most MAX_ANSWER_BYTES of it.
            response = self.http.request("POST", target, body=urlencode(pairs), headers=headers,
                                         timeout=urllib3.Timeout(connect=remaining, read=remaining),
                                         redirect=False, preload_content=False)
            reply, read_whole = self._reply(response)
        except NewConnectionError as exc:
            # Refused (the app is down) or no such host: urllib3 files it under ConnectTimeoutError, and it was
            # reported as a timeout, sending the operator after a slow app rather than a stopped one.
            why = getattr(exc.__context__, "strerror", None) or type(exc).__name__
            return Reply(False, None, b"", None, f"unreachable (could not connect: {why})")
        except (ConnectTimeoutError, ReadTimeoutError):
            return Reply(False, None, b"", None, f"no answer within {limit:g}s")
        except HTTPError as exc:  # refused, reset, cut off, an answer that does not decode
            return Reply(False, None, b"", None, f"unreachable ({type(exc).__name__})")
        finally:
            _this_thread.line = None
            hung_up = line.done()
            if response is not None:
                if hung_up or not read_whole:  # a connection whose answer was not read to its end cannot be reused
                    response.close()
                response.release_conn()
        return reply

    def _reply(self, response: urllib3.BaseHTTPResponse) -> tuple[Reply, bool]:
        status = response.status
        if status in NOT_TAKEN_4XX:
            return Reply(False, status, b"", None, f"answered {status}: if every webhook gets this, check the forward "
                                                   "URL, its credentials and the app's signature check (it signs the "
                                                   "URL it is posted to)", final=True), False
        if status >= 500 or status in RETRYABLE_4XX:
            return Reply(False, status, b"", None, f"answered {status}"), False
        if 300 <= status < 400:
            # Not followed (forward targets come from configuration only): the app's handler never saw it.
            return Reply(False, status, b"", None,
                         f"answered {status}: redirects are not followed, set the final URL"), False
        declared = response.headers.get("Content-Length", "")
        length = int(declared) if declared.isascii() and declared.isdigit() else None
        if length is not None and length > MAX_ANSWER_BYTES:  # said so up front: not read at all
            return Reply(True, status, b"", None, too_large=True, content_length=length), False
        body = bytearray()
        for chunk in response.stream(16 * 1024, decode_content=True):  # decoded, when the app compressed it
            body += chunk
            if len(body) > MAX_ANSWER_BYTES:
                return Reply(True, status, b"", None, too_large=True, content_length=length), False
        return Reply(True, status, bytes(body), _content_type(response)), True


class _Line:
    """The connection one post is using, for its caller to hang up at the deadline from its own thread."""

    __slots__ = ("lock", "connection", "over", "hung_up")

    def __init__(self):
        self.lock = threading.Lock()
        self.connection: HTTPConnection | None = None
        self.over = False  # hung up, or the post is done: nothing more goes out on this line
        self.hung_up = False

    def attach(self, connection: HTTPConnection) -> None:
        with self.lock:
            if self.over:  # the deadline passed before the request was written: it never goes out
                raise ProtocolError("hung up at the deadline before sending")
            self.connection = connection

    def hang_up(self) -> None:
        with self.lock:
            if self.over:
                return
            self.over = self.hung_up = True
            sock = self.connection.sock if self.connection is not None else None
            if sock is not None:
                try:  # the blocked read sees the end of the stream now; the connection is then discarded
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def done(self) -> bool:
        """The post is over: later hang-ups are no-ops. Whether it was hung up on."""
        with self.lock:
            self.over, self.connection = True, None
            return self.hung_up

    def let_go(self, connection: HTTPConnection) -> None:
        """`connection` goes back to the pool (urllib3 puts it back as soon as the answer is read to its
        end, inside the read): from now on it may be another post's, which a hang-up must never cut."""
        with self.lock:
            if self.connection is connection:
                self.connection = None
            if self.hung_up:  # shut down: closed, so the pool opens a new one instead of reusing it
                connection.close()


_this_thread = threading.local()


class _Watched:
    """Puts each request's connection on its post's _Line, when a Forwarder thread sends it."""

    def request(self, *args, **kwargs):
        line = getattr(_this_thread, "line", None)
        if line is not None:
            line.attach(self)
        return super().request(*args, **kwargs)


class _WatchedHTTP(_Watched, HTTPConnection):
    pass


class _WatchedHTTPS(_Watched, HTTPSConnection):
    pass


class _WatchedPool:
    """Takes a connection off its post's _Line as the connection goes back to the pool."""

    def _put_conn(self, conn):
        line = getattr(_this_thread, "line", None)
        if line is not None and conn is not None:
            line.let_go(conn)
        super()._put_conn(conn)


class _WatchedHTTPPool(_WatchedPool, HTTPConnectionPool):
    ConnectionCls = _WatchedHTTP


class _WatchedHTTPSPool(_WatchedPool, HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPS


_WATCHED_POOLS = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}


# As requests sent them: an app may answer compressed (the answer is decoded before it is relayed).
_DEFAULT_HEADERS = {"Accept": "*/*", "Accept-Encoding": "gzip, deflate"}


@functools.lru_cache(maxsize=64)
def _target(url: str) -> tuple[str, dict]:
    """The URL to connect to, as urllib3 will send it (and so as it is signed), and the Basic authorization its
    user:password@ asks for (as Twilio does for credentials in a webhook URL, and requests did): urllib3 would
    drop them silently.

    urllib3 sends its own reading of a URL: the host lower-cased, `%2f` as `%2F`, `./` segments gone, a space or
    an `é` percent-encoded, no fragment, `/` for no path. Signed as written, `http://LOCALHOST:8080/App` reached
    the app as `localhost:8080`, and the app's own RequestValidator refused every webhook."""
    parsed = urllib3.util.parse_url(url)
    sent = parsed._replace(auth=None, fragment=None, path=parsed.path or "/").url  # no path: urllib3 sends `/`
    if not parsed.auth:
        return sent, {}
    user, _, password = parsed.auth.partition(":")
    token = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode()
    return sent, {"Authorization": f"Basic {token}"}


def _content_type(response: urllib3.BaseHTTPResponse) -> str | None:
    """The app's Content-Type, the first one if it sent several; None (TwiML's text/xml) if it cannot be relayed."""
    values = response.headers.getlist("Content-Type")
    value = values[0] if values else None
    return value if value is not None and sendable("Content-Type", value) else None


def too_large(reply: Reply, *, redact: bool, **fields) -> None:
    """The one line for an answer not relayed for its length: its size as known, never its content."""
    logs.event("app_answer_too_large", redact=redact, level=logging.WARNING, app_status=reply.status,
               content_length=reply.content_length, limit_bytes=MAX_ANSWER_BYTES,
               detail="the app had the webhook, so it is not sent again; its answer is not relayed (Twilio takes "
                      "TwiML of up to 64 kB): Twilio gets empty TwiML", **fields)


def _not_sent(timeout: float) -> Reply:
    return Reply(False, None, b"", None, f"not sent: no forwarding thread free within {timeout:g}s")
