"""Configuration read once from the environment into a typed, immutable settings object."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping
from urllib.parse import urlsplit

import requests.utils
import urllib3
from sqlalchemy import URL, make_url
from sqlalchemy.exc import ArgumentError
from urllib3.util import parse_url

from .policy import Policy
from .policy_file import Fallback, PolicyFileError, load, parse_fallback

DEFAULT_SQLITE_PATH = Path("instance") / "proxy.sqlite3"
# An outbox lease outlasts one delivery by this much (the database writes around it, clocks of several
# instances); the inline attempt's lease in proxy/webhooks.py is FORWARD_TIMEOUT_SECONDS + 5 too.
LEASE_MARGIN_SECONDS = 5
# The worker waits this long at most for a create's send_attempts row to be stored, its item still `sending`.
ATTEMPT_FLUSH_SECONDS = 1

# The largest value each number may take. Without them a huge value (or inf) started the proxy and then
# failed every request (a timedelta or urllib3 deadline past datetime's range: OverflowError, a 500) or
# left a worker asleep for good; each bound is beyond any sensible use and well inside what the code
# can compute with.
DAY = 86400
MAX_SESSION_WINDOW_SECONDS = 7 * DAY  # WhatsApp's window is 24 h; a week leaves room for other channels
MAX_TWILIO_TIMEOUT_SECONDS = 60  # the Procfile's gunicorn --timeout; callers and routers give up sooner
MAX_HOLD_TTL_SECONDS = 365 * DAY
MAX_CONTENT_CACHE_SECONDS = DAY  # an approval Meta withdraws is noticed within this
MAX_RETRY_DELAY_SECONDS = 7 * DAY  # per attempt; the default schedule's longest wait is 10 h
MAX_FORWARD_URL_LENGTH = 2048  # the outbox's target column
MAX_OUTBOX_LEASE_SECONDS = 3600  # a crashed worker's items wait this long to come back
MAX_WORKER_POLL_SECONDS = 300
# Each delivery at once is a thread, a forwarding thread and, while it writes, a database connection of the
# worker's (PostgreSQL's default max_connections is 100); an app taking more at once is better served by
# several workers.
MAX_WORKER_CONCURRENCY = 64
MAX_REQUEST_BYTES = 16 * 1024 * 1024  # Twilio's webhooks and Messages creates are a few KiB
# Twilio's own pattern for these sids (twilio-oai): the prefix and 32 hex digits, nothing else.
ACCOUNT_SID = re.compile(r"AC[0-9a-fA-F]{32}")
API_KEY_SID = re.compile(r"SK[0-9a-fA-F]{32}")


class ConfigError(ValueError):
    """A setting is missing or invalid; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    account_sid: str
    # Secrets stay out of repr() (a traceback, a debug print): here and in the keys below.
    auth_token: str = field(repr=False)
    database_url: str = field(repr=False)
    # The token before a rotation (TWILIO_AUTH_TOKEN_PREVIOUS): accepted on webhooks and from gateway callers
    # until it is removed, so no process must restart at the moment Twilio's new token takes over.
    previous_auth_token: str | None = field(default=None, repr=False)
    database_is_default: bool = False  # DATABASE_URL unset: the SQLite file in ./instance/
    twilio_api_base_url: str = "https://api.twilio.com"
    public_base_url: str | None = None
    session_window_seconds: int = 86400
    window_safety_margin_seconds: int = 60
    twilio_timeout_seconds: float = 10.0
    log_level: str = "INFO"
    log_redact_numbers: bool = True
    log_format: str = "json"
    api_keys: Mapping[str, str] = field(default_factory=dict, repr=False)  # SK sid -> secret
    metrics_token: str | None = field(default=None, repr=False)
    forward_inbound_url: str | None = None
    forward_status_url: str | None = None
    forward_timeout_seconds: float = 10.0
    # Delay before each delivery attempt (the first is the inline one); then the item is exhausted.
    retry_schedule: tuple[int, ...] = (0, 5, 300, 1800, 7200, 18000, 36000, 36000)
    hold_on_reroute: bool = False
    hold_ttl_seconds: int = 7 * 86400
    worker_poll_seconds: float = 1.0
    # Deliveries a worker makes at once, each to another conversation; its batch is at least this many.
    worker_concurrency: int = 10
    outbox_lease_seconds: int = 120
    fail_open: bool = False
    allow_unsigned_webhooks: bool = False
    webhook_shared_keys: Mapping[str, str] = field(default_factory=dict, repr=False)  # SharedKey id -> secret
    max_content_length: int = 256 * 1024
    body_read_seconds: float = 15.0
    twilio_content_base_url: str = "https://content.twilio.com"
    content_cache_seconds: int = 300
    policy: Policy = field(default_factory=Policy)
    fallback: Fallback | None = None  # FALLBACK_CONTENT_SID, for every sender without its own
    fallbacks: Mapping[str, Fallback] = field(default_factory=dict)  # per sender, from POLICY_FILE

    @property
    def longest_delivery_seconds(self) -> float:
        """The longest one outbox delivery may take (see OUTBOX_LEASE_SECONDS in `from_env`)."""
        return longest_delivery(self.forward_timeout_seconds, self.twilio_timeout_seconds)

    def fallback_for(self, sender: str | None) -> Fallback | None:
        return self.fallbacks.get(sender or "", self.fallback)

    def unused_reroute_settings(self) -> str | None:
        """What is set for reroutes although no send can be rerouted (every action is block), if anything: a
        start-up warning, not a refusal, as held messages are still released."""
        if "reroute" in {self.policy.default_action, *self.policy.actions.values()}:
            return None
        unused = [name for name, set_ in (("HOLD_ON_REROUTE", self.hold_on_reroute),
                                          ("FALLBACK_CONTENT_SID", self.fallback),
                                          ("POLICY_FILE's [fallbacks]", self.fallbacks)) if set_]
        return ", ".join(unused) or None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if environ is None else environ
        missing = [n for n in ("TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN") if not env.get(n, "").strip()]
        if missing:
            raise ConfigError(
                f"{' and '.join(missing)} must be set: the Twilio account the proxy serves "
                "(Console → Account Info)."
            )
        account_sid = env["TWILIO_ACCOUNT_SID"].strip()
        previous_token = env.get("TWILIO_AUTH_TOKEN_PREVIOUS", "").strip() or None
        if previous_token == env["TWILIO_AUTH_TOKEN"].strip():
            raise ConfigError("TWILIO_AUTH_TOKEN_PREVIOUS is TWILIO_AUTH_TOKEN itself: during a rotation it is "
                              "the token being replaced (unset it once the rotation is done).")
        if not ACCOUNT_SID.fullmatch(account_sid):
            raise ConfigError("TWILIO_ACCOUNT_SID must look like AC followed by 32 hex characters.")
        window = _int(env, "SESSION_WINDOW_SECONDS", 86400, minimum=1, maximum=MAX_SESSION_WINDOW_SECONDS)
        # Bounded by the window just below.
        margin = _int(env, "WINDOW_SAFETY_MARGIN_SECONDS", 60, minimum=0, maximum=MAX_SESSION_WINDOW_SECONDS)
        if margin >= window:
            raise ConfigError("WINDOW_SAFETY_MARGIN_SECONDS must be smaller than SESSION_WINDOW_SECONDS.")
        level = env.get("LOG_LEVEL", "INFO").strip().upper() or "INFO"
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ConfigError(f"LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got {level!r}.")
        fallback = _fallback(env)
        policy_file = None
        if env.get("POLICY_FILE", "").strip():
            try:
                policy_file = load(env["POLICY_FILE"].strip())
            except PolicyFileError as exc:
                raise ConfigError(f"POLICY_FILE: {exc}") from None
        button_rule = _choice(env, "BUTTON_RULE", "strict", ("strict", "lenient"))
        action = _choice(env, "OUT_OF_WINDOW_ACTION", "reroute" if fallback else "block", ("block", "reroute"))
        actions = dict(policy_file.actions) if policy_file else {}
        fallbacks = dict(policy_file.fallbacks) if policy_file else {}
        if "reroute" in {action, *actions.values()} and not (fallback or fallbacks):
            asked = ("OUT_OF_WINDOW_ACTION=reroute" if action == "reroute"
                     else "POLICY_FILE's [actions] (reroute for " + ", ".join(sorted(
                         t for t, a in actions.items() if a == "reroute")) + ")")
            raise ConfigError(f"{asked} needs FALLBACK_CONTENT_SID (or fallbacks in POLICY_FILE).")
        # Below 15, not at most: Twilio gives up on a webhook after 15 s.
        forward_timeout = _float(env, "FORWARD_TIMEOUT_SECONDS", 10.0, maximum=15, inclusive=False)
        twilio_timeout = _float(env, "TWILIO_TIMEOUT_SECONDS", 10.0, maximum=MAX_TWILIO_TIMEOUT_SECONDS)
        lease = _int(env, "OUTBOX_LEASE_SECONDS", 120, minimum=1, maximum=MAX_OUTBOX_LEASE_SECONDS)
        # The longest single delivery: a webhook forward, or a fallback send after a late 63016 (the
        # Content and its ApprovalRequests from the Content API, then the create: three calls, each up
        # to TWILIO_TIMEOUT_SECONDS), then the wait for its attempt row. Its lease must outlast it: a send
        # still `sending` when the lease ends is taken for one whose worker died during the create, and is
        # never sent again.
        longest = longest_delivery(forward_timeout, twilio_timeout)
        if lease < longest + LEASE_MARGIN_SECONDS:
            raise ConfigError(
                f"OUTBOX_LEASE_SECONDS must be at least {math.ceil(longest + LEASE_MARGIN_SECONDS)} "
                f"(FORWARD_TIMEOUT_SECONDS, or 3 x TWILIO_TIMEOUT_SECONDS + {ATTEMPT_FLUSH_SECONDS} if more, + {LEASE_MARGIN_SECONDS}), "
                f"got {lease}: a worker must still hold an item when its delivery ends, or another worker "
                "delivers it too.")
        settings = cls(
            fail_open=_bool(env, "FAIL_OPEN", False),
            allow_unsigned_webhooks=_bool(env, "ALLOW_UNSIGNED_WEBHOOKS", False),
            webhook_shared_keys=_pairs(env, "TWILIO_WEBHOOK_SHARED_KEYS", "key-id:secret"),
            max_content_length=_int(env, "MAX_CONTENT_LENGTH", 256 * 1024, minimum=1024,
                                    maximum=MAX_REQUEST_BYTES, unit="bytes"),
            body_read_seconds=_float(env, "BODY_READ_TIMEOUT_SECONDS", 15.0, maximum=300),
            forward_inbound_url=_url(env, "FORWARD_INBOUND_URL", None, exact=True),
            forward_status_url=_url(env, "FORWARD_STATUS_URL", None, exact=True),
            forward_timeout_seconds=forward_timeout,
            retry_schedule=_schedule(env),
            hold_on_reroute=_bool(env, "HOLD_ON_REROUTE", False),
            hold_ttl_seconds=_int(env, "HOLD_TTL_SECONDS", 7 * 86400, minimum=1, maximum=MAX_HOLD_TTL_SECONDS),
            worker_poll_seconds=_float(env, "WORKER_POLL_SECONDS", 1.0, maximum=MAX_WORKER_POLL_SECONDS),
            worker_concurrency=_int(env, "WORKER_CONCURRENCY", 10, minimum=1, maximum=MAX_WORKER_CONCURRENCY,
                                    unit="deliveries"),
            outbox_lease_seconds=lease,
            log_format=_choice(env, "LOG_FORMAT", "json", ("json", "text")),
            api_keys=_api_keys(env),
            metrics_token=env.get("METRICS_TOKEN", "").strip() or None,
            account_sid=account_sid,
            auth_token=env["TWILIO_AUTH_TOKEN"].strip(),
            previous_auth_token=previous_token,
            database_url=normalise_database_url(env.get("DATABASE_URL", "")),
            database_is_default=not env.get("DATABASE_URL", "").strip(),
            twilio_api_base_url=_url(env, "TWILIO_API_BASE_URL", "https://api.twilio.com"),
            public_base_url=_url(env, "PUBLIC_BASE_URL", None),
            session_window_seconds=window,
            window_safety_margin_seconds=margin,
            twilio_timeout_seconds=twilio_timeout,
            log_level=level,
            log_redact_numbers=_bool(env, "LOG_REDACT_NUMBERS", True),
            twilio_content_base_url=_url(env, "TWILIO_CONTENT_BASE_URL", "https://content.twilio.com"),
            content_cache_seconds=_int(env, "CONTENT_CACHE_SECONDS", 300, minimum=0,
                                       maximum=MAX_CONTENT_CACHE_SECONDS),
            policy=Policy(button_rule=button_rule, default_action=action, actions=actions),
            fallback=fallback,
            fallbacks=fallbacks,
        )
        check_outbound(env, (settings.twilio_api_base_url, settings.twilio_content_base_url))
        _not_the_sandboxs_database(settings.database_url, settings.account_sid)
        return settings


def _not_the_sandboxs_database(database_url: str, account_sid: str) -> None:
    """The real account's proxy never on the sandbox's database (`sandbox up` refuses the real mode's the same way):
    a shell that exported the sandbox's DATABASE_URL (its banner says to, for the commands) and then the real
    credentials would judge real sends by simulated windows."""
    from .sandbox.simulator import SANDBOX_ACCOUNT_SID

    url = make_url(database_url)
    if account_sid == SANDBOX_ACCOUNT_SID or url.get_backend_name() != "sqlite" or not url.database:
        return
    sandbox_file = Path(__file__).resolve().parents[1] / "instance" / "sandbox.sqlite3"
    if os.path.realpath(url.database) == os.path.realpath(sandbox_file):
        raise ConfigError(f"DATABASE_URL is the sandbox's database ({sandbox_file}), and TWILIO_ACCOUNT_SID a real "
                          "account: unset DATABASE_URL (or name the real mode's) before serving a real account.")


def longest_delivery(forward_timeout: float, twilio_timeout: float) -> float:
    return max(forward_timeout, 3 * twilio_timeout + ATTEMPT_FLUSH_SECONDS)


def normalise_database_url(raw: str) -> str:
    """Map the URL forms hosting platforms hand out onto the installed drivers."""
    url = raw.strip()
    if not url:
        return f"sqlite:///{DEFAULT_SQLITE_PATH.resolve()}"
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ConfigError("DATABASE_URL must be a URL such as postgresql://user:pass@host/db or sqlite:///path.")
    # Heroku-style platforms hand out postgres://, which SQLAlchemy no longer accepts;
    # psycopg 3 is the driver this project installs.
    if scheme in ("postgres", "postgresql", "postgresql+psycopg"):
        url = f"postgresql+psycopg://{rest}"
    elif scheme not in ("sqlite", "sqlite+pysqlite"):  # the drivers installed; aiosqlite & co. failed at import
        raise ConfigError(f"DATABASE_URL scheme {scheme!r} is not supported (use postgresql:// or sqlite:///path).")
    try:
        parsed = make_url(url)  # here, not in the first worker's traceback (a port that is no number, say)
    except (ValueError, ArgumentError) as exc:
        raise ConfigError(f"DATABASE_URL cannot be read ({type(exc).__name__}): {without_credentials(raw.strip())!r}.") \
            from None
    if parsed.get_backend_name() == "sqlite" and (parsed.database in (None, "", ":memory:")
                                                  or ":memory:" in parsed.database
                                                  or parsed.query.get("mode") == "memory"):  # file:…?mode=memory&uri=true
        # Each process (each gunicorn worker, the worker, `db upgrade`) would get an empty database of its own.
        raise ConfigError("DATABASE_URL must name a SQLite file (sqlite:///path): an in-memory database is one "
                          "per process, never migrated for the others.")
    return url


def _fallback(env: Mapping[str, str]) -> Fallback | None:
    sid = env.get("FALLBACK_CONTENT_SID", "").strip()
    raw = env.get("FALLBACK_CONTENT_VARIABLES", "").strip()
    name_default = env.get("FALLBACK_PROFILE_NAME_DEFAULT", "").strip() or None  # blank: unset, as elsewhere
    if not sid:
        for name in ("FALLBACK_CONTENT_VARIABLES", "FALLBACK_PROFILE_NAME_DEFAULT"):
            if env.get(name, "").strip():
                raise ConfigError(f"{name} is set but FALLBACK_CONTENT_SID is not.")
        return None
    try:
        variables = json.loads(raw) if raw else {}
    except ValueError:
        raise ConfigError("FALLBACK_CONTENT_VARIABLES must be a JSON object of strings.") from None
    try:
        return parse_fallback(sid, variables, "FALLBACK_CONTENT_SID/FALLBACK_CONTENT_VARIABLES", name_default)
    except PolicyFileError as exc:
        raise ConfigError(str(exc)) from None


def _schedule(env: Mapping[str, str]) -> tuple[int, ...]:
    raw = env.get("OUTBOX_RETRY_SCHEDULE", "").strip()
    if not raw:
        return (0, 5, 300, 1800, 7200, 18000, 36000, 36000)
    try:
        delays = tuple(int(part) for part in raw.split(","))
    except ValueError:
        delays = ()
    if not delays:
        raise ConfigError("OUTBOX_RETRY_SCHEDULE must be comma-separated seconds, e.g. 0,5,300,1800,7200.")
    if any(not 0 <= d <= MAX_RETRY_DELAY_SECONDS for d in delays):
        raise ConfigError(f"OUTBOX_RETRY_SCHEDULE must be comma-separated seconds, each at least 0 and at most "
                          f"{_seconds(MAX_RETRY_DELAY_SECONDS)}, got {raw!r}.")
    if delays[0] != 0:
        # The first value is the first attempt's, made at once (inline, or as soon as a worker sees it): a
        # schedule of 60,120 meant 60 s before the first retry to its writer, and ran 120 s then gave up.
        raise ConfigError(f"OUTBOX_RETRY_SCHEDULE starts with the first attempt, which is made at once: start it "
                          f"with 0 (the retries' delays after it), got {raw!r}.")
    return delays


def _pairs(env: Mapping[str, str], name: str, shape: str) -> dict[str, str]:
    pairs = {}
    for item in filter(None, (part.strip() for part in env.get(name, "").split(","))):
        key, sep, secret = item.partition(":")
        if not sep or not key or not secret:
            raise ConfigError(f"{name} must be comma-separated {shape} pairs.")
        pairs[key] = secret
    return pairs


def _api_keys(env: Mapping[str, str]) -> dict[str, str]:
    keys = {}
    for item in filter(None, (part.strip() for part in env.get("TWILIO_API_KEYS", "").split(","))):
        sid, sep, secret = item.partition(":")
        if not sep or not API_KEY_SID.fullmatch(sid) or not secret:
            # The start of the entry only when it is a key's SID: an entry in another order starts with its secret.
            start = f", got an entry starting {item[:6]!r}" if item.startswith("SK") else ", got one not starting with SK"
            raise ConfigError("TWILIO_API_KEYS must be comma-separated SK…:secret pairs (SK followed by 32 hex "
                              f"characters){start}.")
        keys[sid] = secret
    return keys


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {raw!r}.")
    return raw


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int, maximum: int,
         unit: str = "seconds") -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number of {unit}, got {raw!r}.") from None
    if not minimum <= value <= maximum:
        most = _seconds(maximum) if unit == "seconds" else f"{maximum} {unit}"
        raise ConfigError(f"{name} must be at least {minimum} and at most {most}, got {raw!r}.")
    return value


def _float(env: Mapping[str, str], name: str, default: float, *, maximum: float,
           inclusive: bool = True) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, got {raw!r}.") from None
    if not (0 < value <= maximum if inclusive else 0 < value < maximum):  # also refuses nan and inf
        bound = "at most" if inclusive else "below"
        raise ConfigError(f"{name} must be greater than 0 and {bound} {_seconds(maximum)}, got {raw!r}.")
    return value


def _seconds(value: float) -> str:
    """A bound as the operator reads it: 604800 (7 days)."""
    days, rest = divmod(value, DAY)
    return f"{value:.15g}" + (f" ({days:.15g} days)" if days >= 2 and not rest else "")


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}.")


_SOCKS_SCHEMES = ("socks4", "socks4a", "socks5", "socks5h")  # what urllib3's SOCKSProxyManager takes


def _environ_proxies(env: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """urllib's getproxies_environment, over `env`: scheme (or `no`) -> (the variable, its value). Any case of a
    `*_proxy` name counts, and the lower-case one wins over the others; an empty one removes its scheme."""
    proxies: dict[str, tuple[str, str]] = {}
    for name, value in env.items():
        if value and name.lower().endswith("_proxy"):
            proxies[name.lower()[:-6]] = (name, value)
    if "REQUEST_METHOD" in env:  # under CGI, HTTP_PROXY could be a request's Proxy header: urllib ignores it
        proxies.pop("http", None)
    for name, value in env.items():
        if name.endswith("_proxy"):
            if value:
                proxies[name.lower()[:-6]] = (name, value)
            else:
                proxies.pop(name.lower()[:-6], None)
    return proxies


def check_outbound(env: Mapping[str, str], base_urls) -> None:
    """The outbound proxy and CA bundle variables, read as the calls to `base_urls` will read them
    (proxy/upstream.py: requests' own choice of proxy, the values as they are): one that cannot be used stopped
    every process with a traceback quoting the proxy's password (urllib3's LocationParseError), and a CA bundle
    that is not there failed every create as if Twilio might have accepted it."""
    name = "REQUESTS_CA_BUNDLE" if env.get("REQUESTS_CA_BUNDLE") else "CURL_CA_BUNDLE"
    path = env.get(name)
    if path and not (os.path.isfile(path) or os.path.isdir(path)):
        raise ConfigError(f"{name} names {path!r}, which is no file or directory of CA certificates.")
    proxies = _environ_proxies(env)
    proxies.pop("no", None)
    no_proxy = env.get("no_proxy") or env.get("NO_PROXY")  # as requests reads it: an empty one is no answer
    for url in base_urls:
        if no_proxy and requests.utils.should_bypass_proxies(url, no_proxy=no_proxy):
            continue
        chosen = requests.utils.select_proxy(url, {scheme: value for scheme, (_, value) in proxies.items()})
        if not chosen:
            continue
        variable = next(name for name, value in proxies.values() if value == chosen)
        try:
            scheme = (parse_url(chosen).scheme or "").lower()
            if scheme.startswith("socks"):
                if scheme not in _SOCKS_SCHEMES:  # `socks://` (GNOME's): urllib3 cannot tell which version
                    raise ValueError(scheme)
            else:
                urllib3.ProxyManager(chosen)  # what proxy/upstream.py builds: it parses and checks the URL, no I/O
        except (ValueError, urllib3.exceptions.HTTPError):  # LocationParseError, ProxySchemeUnknown
            raise ConfigError(f"{variable} is not a proxy URL that can be used, got {without_credentials(chosen)!r} (it "
                              "needs its scheme, http://host:port, and no spaces; a password holding '/', '#', '?' or "
                              "'@' must be %-escaped).") from None
        if scheme.startswith("socks") and importlib.util.find_spec("socks") is None:
            raise ConfigError(f"{variable} is a SOCKS proxy, which needs PySocks: pip install 'requests[socks]'.")


def _url(env: Mapping[str, str], name: str, default: str | None, *, exact: bool = False) -> str | None:
    """An http(s) URL. A base URL (paths are appended to it) loses a trailing slash; an `exact` one is
    posted to as written: /twilio/ and /twilio are two routes to most web frameworks (one redirects to the
    other, which the forwarder does not follow), and the signature covers the slash."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        parts = urlsplit(raw)
        parts.port  # noqa: B018 — raises for a port out of range
        # What urllib3 connects with: one it cannot read failed every forward with a 500 and a traceback that
        # quoted the URL, password and all.
        parse_url(raw)
    except ValueError:  # LocationParseError is one too
        raise ConfigError(f"{name} is not a URL that can be used (its host or port), got "
                          f"{without_credentials(raw)!r}.") from None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{name} must be an http(s) URL, got {without_credentials(raw)!r}.")
    if not parts.hostname or parts.port == 0:  # `https://:443`, `https://user@`: every call would fail, or crash
        raise ConfigError(f"{name} is not a URL that can be used (its host or port), got {without_credentials(raw)!r}.")
    if "#" in raw:
        # Never sent, yet a forward's signature covered it: the app's own RequestValidator refused every forward.
        # Twilio's connection overrides (#rp=…) belong in the webhook URL set at Twilio, not here.
        raise ConfigError(f"{name} must not have a #fragment: it is never sent, got {without_credentials(raw)!r}.")
    if not exact and parts.query:  # paths are appended to a base URL, after which a query has no place
        raise ConfigError(f"{name} is a base URL, to which paths are added: it takes no ?query, got "
                          f"{without_credentials(raw)!r}.")
    if exact and len(raw) > MAX_FORWARD_URL_LENGTH:
        # Stored with each queued webhook (outbox.target): PostgreSQL refused a longer one, and with it the
        # webhook's whole transaction, the message and its window included, so every inbound got a 400.
        raise ConfigError(f"{name} must be at most {MAX_FORWARD_URL_LENGTH} characters, got {len(raw)}.")
    return raw if exact else raw.rstrip("/")


_SCHEME_PREFIX = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:?//")


def database_shown(url: str) -> str:
    """The database a log line names: driver, host, port and database (a SQLite file's path), without user,
    password or query. Rebuilt from SQLAlchemy's reading of the URL, the one the engine connects with: cut as
    text alone, a password with an unescaped `?` (`u:pa?ss@host`) kept the part before it."""
    parsed = make_url(url)
    bare = URL.create(parsed.drivername, host=parsed.host, port=parsed.port, database=parsed.database)
    # Then cut as text too: a password with an unescaped `@` is read by SQLAlchemy as part of the host.
    return without_credentials(bare.render_as_string(hide_password=False))


def without_credentials(raw: str) -> str:
    """A URL the operator mistyped, as a configuration error shows it: whatever stood before an `@` (a
    user and password) and the query (a token) are left out, its scheme, host and path kept."""
    prefix = _SCHEME_PREFIX.match(raw)
    scheme, text = (prefix.group(), raw[prefix.end():]) if prefix else ("", raw)
    at, cut = text.rfind("@"), min((i for i in (text.find("?"), text.find("#")) if i >= 0), default=len(text))
    if at > cut:
        # An `@` after a `?` or `#`: a password holding one unescaped (`u:pa#ss@host`), or a query or fragment
        # holding an `@` (`?sig=a@b`). Either way what stands on either side may be a secret: none of it shown.
        return scheme + "…"
    if at >= 0:
        text = "…@" + text[at + 1:]
    text, query, _ = text.partition("?")
    text = text.partition("#")[0]
    return scheme + text + ("?…" if query else "")
