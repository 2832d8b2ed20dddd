"""The pooled HTTP connection that forwards judged requests to Twilio's API, byte for byte.

Forwarding is the gateway's hot path, so it goes straight through urllib3 (the transport that
requests, and so twilio-python's TwilioHttpClient, sit on): the request body is already encoded and
the answer is relayed as received, and TwilioHttpClient's request preparation cost about 1.1 ms of
CPU per send on top of urllib3's 0.6 ms (bench/README.md). TwilioHttpClient (`Upstream.http`)
remains the client for the Content API, where its request building is what is needed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlencode

import requests
import urllib3
from twilio.http.http_client import TwilioHttpClient
from urllib3.exceptions import ConnectTimeoutError, HTTPError, NewConnectionError, ReadTimeoutError


@dataclass
class UpstreamError(Exception):
    """Twilio could not be reached (`unreachable`) or did not answer in time (`timeout`)."""

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


class Upstream:
    def __init__(self, base_url: str, timeout: float, pool_size: int):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        # The proxy and CA-bundle variables are read once here (requests re-reads them per request).
        proxies = requests.utils.get_environ_proxies(self.base_url)
        ca_bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or None
        proxy_url = proxies.get(self.base_url.split(":", 1)[0]) or proxies.get("all")
        # retries=False: a Messages create is not idempotent, a blind retry could send twice.
        options = dict(num_pools=4, maxsize=pool_size, block=False, retries=False, ca_certs=ca_bundle,
                       timeout=urllib3.Timeout(connect=timeout, read=timeout))
        self.pool = urllib3.ProxyManager(proxy_url, **options) if proxy_url else urllib3.PoolManager(**options)
        self.http = TwilioHttpClient(pool_connections=True, timeout=timeout)
        self.http.proxy = proxies
        self.http.session.verify = ca_bundle or True
        self.http.session.trust_env = False

    def request(self, method: str, path: str, *, query: str = "", data=None, headers: dict) -> UpstreamResponse:
        """Send `data` (bytes as received, or form pairs to encode) and return Twilio's answer unparsed."""
        url = self.base_url + path + (f"?{query}" if query else "")
        if isinstance(data, list):
            data = urlencode(data).encode()
        try:
            answer = self.pool.urlopen(method, url, body=data, headers=headers, redirect=False,
                                       preload_content=True)
        except ReadTimeoutError as exc:
            raise UpstreamError("timeout", f"no answer within {self.timeout:g}s") from exc
        except (ConnectTimeoutError, NewConnectionError) as exc:
            raise UpstreamError("unreachable", f"connect failed: {type(exc).__name__}") from exc
        except HTTPError as exc:
            raise UpstreamError("unreachable", type(exc).__name__) from exc
        return UpstreamResponse(answer.status, answer.headers, answer.data)
