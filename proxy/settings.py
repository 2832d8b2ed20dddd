"""Configuration read once from the environment into a typed, immutable settings object."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping
from urllib.parse import urlsplit

DEFAULT_SQLITE_PATH = Path("instance") / "proxy.sqlite3"


class ConfigError(ValueError):
    """A setting is missing or invalid; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    account_sid: str
    auth_token: str
    database_url: str
    twilio_api_base_url: str = "https://api.twilio.com"
    public_base_url: str | None = None
    session_window_seconds: int = 86400
    window_safety_margin_seconds: int = 60
    twilio_timeout_seconds: float = 10.0
    log_level: str = "INFO"
    log_redact_numbers: bool = True

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
        if not (account_sid.startswith("AC") and len(account_sid) == 34):
            raise ConfigError("TWILIO_ACCOUNT_SID must look like AC followed by 32 hex characters.")
        window = _int(env, "SESSION_WINDOW_SECONDS", 86400, minimum=1)
        margin = _int(env, "WINDOW_SAFETY_MARGIN_SECONDS", 60, minimum=0)
        if margin >= window:
            raise ConfigError("WINDOW_SAFETY_MARGIN_SECONDS must be smaller than SESSION_WINDOW_SECONDS.")
        level = env.get("LOG_LEVEL", "INFO").strip().upper() or "INFO"
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ConfigError("LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL.")
        return cls(
            account_sid=account_sid,
            auth_token=env["TWILIO_AUTH_TOKEN"].strip(),
            database_url=normalise_database_url(env.get("DATABASE_URL", "")),
            twilio_api_base_url=_url(env, "TWILIO_API_BASE_URL", "https://api.twilio.com"),
            public_base_url=_url(env, "PUBLIC_BASE_URL", None),
            session_window_seconds=window,
            window_safety_margin_seconds=margin,
            twilio_timeout_seconds=_float(env, "TWILIO_TIMEOUT_SECONDS", 10.0),
            log_level=level,
            log_redact_numbers=_bool(env, "LOG_REDACT_NUMBERS", True),
        )


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
        return f"postgresql+psycopg://{rest}"
    if scheme.startswith("sqlite"):
        return url
    raise ConfigError(f"DATABASE_URL scheme {scheme!r} is not supported (use postgresql:// or sqlite://).")


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number of seconds, got {raw!r}.") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}.")
    return value


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, got {raw!r}.") from None
    if not value > 0:
        raise ConfigError(f"{name} must be greater than 0, got {raw!r}.")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}.")


def _url(env: Mapping[str, str], name: str, default: str | None) -> str | None:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{name} must be an http(s) URL, got {raw!r}.")
    return raw.rstrip("/")
