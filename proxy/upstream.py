"""The pooled HTTP connection to Twilio's API, through twilio-python's own HTTP client."""

from __future__ import annotations

import os
from dataclasses import dataclass

import requests
from requests.adapters import HTTPAdapter
from twilio.http.http_client import TwilioHttpClient
from twilio.http.response import Response


@dataclass
class UpstreamError(Exception):
    """Twilio could not be reached (`unreachable`) or did not answer in time (`timeout`)."""

    kind: str
    detail: str


class Upstream:
    def __init__(self, base_url: str, timeout: float, pool_size: int):
        self.base_url = base_url.rstrip("/")
        # max_retries stays 0: a Messages create is not idempotent, a blind retry could send twice.
        self.http = TwilioHttpClient(pool_connections=True, timeout=timeout)
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=pool_size, max_retries=0)
        self.http.session.mount("https://", adapter)
        self.http.session.mount("http://", adapter)
        # requests re-reads the proxy and CA-bundle variables from os.environ on every request
        # (about 1 ms of CPU per send); read them once here instead.
        self.http.proxy = requests.utils.get_environ_proxies(self.base_url)
        self.http.session.verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
        self.http.session.trust_env = False

    def request(self, method: str, path: str, *, query: str = "", data=None, headers: dict) -> Response:
        url = self.base_url + path + (f"?{query}" if query else "")
        try:
            return self.http.request(method, url, data=data, headers=headers)
        except requests.exceptions.ConnectTimeout as exc:
            raise UpstreamError("unreachable", f"connect timeout: {type(exc).__name__}") from exc
        except requests.exceptions.Timeout as exc:
            raise UpstreamError("timeout", f"no answer within {self.http.timeout:g}s") from exc
        except requests.exceptions.RequestException as exc:
            raise UpstreamError("unreachable", type(exc).__name__) from exc
