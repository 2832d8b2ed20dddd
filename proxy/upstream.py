"""The pooled HTTP connection that forwards judged requests to Twilio's API, byte for byte.

Forwarding is the gateway's hot path, so it goes straight through urllib3 (the transport that
requests, and so twilio-python's TwilioHttpClient, sit on): the request body is already encoded and
the answer is relayed as received, and TwilioHttpClient's request preparation cost about 1.1 ms of
CPU per send on top of urllib3's 0.6 ms (bench/README.md). TwilioHttpClient (`Upstream.http`)
remains the client for the Content API, where its request building is what is needed.
"""

from __future__ import annotations

import os
import select
from dataclasses import dataclass
from urllib.parse import urlencode

import certifi
import requests
import urllib3
from twilio.http.http_client import TwilioHttpClient
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import (ConnectTimeoutError, HTTPError, NewConnectionError, ProxyError, ReadTimeoutError,
                                SSLError)

from .cooperative import within


@dataclass
class UpstreamError(Exception):
    """Twilio was not reached (`unreachable`: nothing was sent), did not answer in time (`timeout`), or
    the connection broke after the request went out (`broken`): the last two may have been accepted."""

    kind: str
    detail: str


@dataclass(frozen=True)
class UpstreamResponse:
    status_code: int
    headers: urllib3.HTTPHeaderDict
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")


def _os_poll():
    """select.poll as the OS provides it, also in a gevent worker that patched the select module."""
    if not hasattr(select, "poll"):  # not POSIX: urllib3's own check stays
        return None
    try:
        from gevent import monkey
    except ImportError:
        return select.poll
    return monkey.get_original("select", "poll")


_POLL = _os_poll()


class _ReuseCheck:
    """urllib3 asks a pooled connection `is_connected` before reusing it: a zero-timeout poll for a
    peer that closed it. In a gevent worker that poll went through gevent's event loop (4.6% of a
    gateway worker's CPU in py-spy, ~70 µs a send); a zero-timeout poll never blocks, so the OS's
    own poll(2) answers the same question without it."""

    sock: object

    @property
    def is_connected(self) -> bool:
        if self.sock is None:
            return False
        poller = _POLL()
        poller.register(self.sock.fileno(), select.POLLIN)
        return not poller.poll(0)  # readable at rest: closed by the peer (or garbage): not reusable


class _HTTPConnection(_ReuseCheck, HTTPConnection):
    pass


class _HTTPSConnection(_ReuseCheck, HTTPSConnection):
    pass


def _pool_manager(base_url: str, timeout: float, pool_size: int) -> urllib3.PoolManager:
    """urllib3 set up as requests would: HTTPS_PROXY/NO_PROXY (credentials included), the CA bundle
    variables else certifi's bundle. Read once: requests re-reads them on every request."""
    proxies = requests.utils.get_environ_proxies(base_url)
    proxy_url = requests.utils.select_proxy(base_url, proxies)
    ca_bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or certifi.where()
    # retries=False: a Messages create is not idempotent, a blind retry could send twice.
    options = dict(num_pools=4, maxsize=pool_size, block=False, retries=False,
                   timeout=urllib3.Timeout(connect=timeout, read=timeout),
                   **({"ca_cert_dir": ca_bundle} if os.path.isdir(ca_bundle) else {"ca_certs": ca_bundle}))
    if not proxy_url:
        return urllib3.PoolManager(**options)
    if proxy_url.lower().startswith("socks"):
        from urllib3.contrib.socks import SOCKSProxyManager  # needs PySocks, as requests does for SOCKS

        return SOCKSProxyManager(proxy_url, **options)
    user, password = requests.utils.get_auth_from_url(proxy_url)
    headers = urllib3.make_headers(proxy_basic_auth=f"{user}:{password}") if user else None
    return urllib3.ProxyManager(proxy_url, proxy_headers=headers, **options)


class Upstream:
    def __init__(self, base_url: str, timeout: float, pool_size: int):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.pool = _pool_manager(self.base_url, timeout, pool_size)
        # Every forward goes to this one host: its connection pool is looked up once, not per send
        # (PoolManager.urlopen parses the URL and normalises a pool key each time). Only an http://
        # target behind an HTTP proxy needs the absolute URL that the manager's urlopen builds.
        target = urllib3.util.parse_url(self.base_url)
        self._prefix = (target.path or "").rstrip("/")
        self._host_pool = None if isinstance(self.pool, urllib3.ProxyManager) and target.scheme == "http" \
            else self.pool.connection_from_url(self.base_url)
        # Straight connections only: a SOCKS or HTTPS-proxy pool keeps urllib3's connection classes.
        if self._host_pool is not None and type(self.pool) is urllib3.PoolManager and _POLL is not None:
            self._host_pool.ConnectionCls = _HTTPSConnection if target.scheme == "https" else _HTTPConnection
        self.http = TwilioHttpClient(pool_connections=True, timeout=timeout)
        self.http.proxy = requests.utils.get_environ_proxies(self.base_url)
        self.http.session.verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
        self.http.session.trust_env = False

    def request(self, method: str, path: str, *, query: str = "", data=None, headers: dict) -> UpstreamResponse:
        """Send `data` (bytes as received, or form pairs to encode) and return Twilio's answer unparsed."""
        target = path + (f"?{query}" if query else "")
        if isinstance(data, list):
            data = urlencode(data).encode()
        try:
            # TWILIO_TIMEOUT_SECONDS for the whole call, not for each read (the pool's timeout): a caller told to
            # give up after it must not see its send go out later.
            with within(self.timeout, lambda: UpstreamError("timeout", f"no answer within {self.timeout:g}s")):
                if self._host_pool is not None:
                    answer = self._host_pool.urlopen(method, self._prefix + target, body=data, headers=headers,
                                                     redirect=False, assert_same_host=False, preload_content=True)
                else:
                    answer = self.pool.urlopen(method, self.base_url + target, body=data, headers=headers,
                                               redirect=False, preload_content=True)
        except ReadTimeoutError as exc:
            raise UpstreamError("timeout", f"no answer within {self.timeout:g}s") from exc
        except (ConnectTimeoutError, NewConnectionError, ProxyError) as exc:
            raise UpstreamError("unreachable", f"connect failed: {type(exc).__name__}") from exc
        except SSLError as exc:
            if "certificate" in str(exc).lower():  # refused at the handshake: nothing was written
                raise UpstreamError("unreachable", "TLS certificate verification failed") from exc
            raise UpstreamError("broken", f"TLS: {type(exc).__name__}") from exc
        except HTTPError as exc:
            # Reset or cut off after the request was written: Twilio may have accepted it.
            raise UpstreamError("broken", type(exc).__name__) from exc
        return UpstreamResponse(answer.status, answer.headers, answer.data)
