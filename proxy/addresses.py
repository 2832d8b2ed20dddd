"""Normalise Twilio addresses (`whatsapp:+E164`, `messenger:ID`, plain numbers) and name their channel."""

from __future__ import annotations

import re

# Channels whose free-form sends Meta limits to a customer-service window.
WINDOWED_CHANNELS = frozenset({"whatsapp", "messenger"})

MAX_LENGTH = 128  # what the database keeps of an address
_E164_DIGITS = re.compile(r"^\+?[1-9]\d{6,14}\Z")
_PUNCTUATION = re.compile(r"[\s\-().]")


class InvalidAddress(ValueError):
    """The address cannot be a valid recipient or sender on its channel.

    Its text names the kind of problem, never the address: it is logged, and logs keep numbers masked.
    """


def channel_of(address: str) -> str | None:
    """The channel prefix (`whatsapp`, `messenger`, ...) or None for a plain phone number."""
    prefix, sep, _ = address.partition(":")
    return prefix.strip().lower() if sep else None


def normalise(address: str) -> str:
    """Canonical form: lower-case channel prefix; phone numbers as +E164 without punctuation.

    Two spellings of one WhatsApp user (`whatsapp:14155550100`, `WhatsApp:+1 415-555-0100`)
    must reach the same window row, so every key the proxy stores goes through here.
    """
    raw = address.strip()
    if not raw:
        raise InvalidAddress("empty address")
    if len(raw) > MAX_LENGTH or any(ord(c) < 32 for c in raw):
        raise InvalidAddress("address too long or contains control characters")
    channel = channel_of(raw)
    if channel is None:
        return _phone(raw)
    ident = raw.partition(":")[2].strip()
    if not ident:
        raise InvalidAddress("no identifier after the channel prefix")
    if channel == "whatsapp":
        return f"whatsapp:{_phone(ident)}"
    return f"{channel}:{ident}"


def _phone(raw: str) -> str:
    digits = _PUNCTUATION.sub("", raw)
    if not _E164_DIGITS.match(digits):
        raise InvalidAddress("not an E.164 phone number")
    return digits if digits.startswith("+") else f"+{digits}"


def is_windowed(address: str) -> bool:
    return channel_of(address) in WINDOWED_CHANNELS


def mask(address: str | None) -> str | None:
    """Hide the middle of a phone number or id for logs: `whatsapp:+1415*****00`."""
    if not address:
        return address
    prefix, sep, ident = address.rpartition(":")
    head = prefix + sep
    if len(ident) <= 6:
        return head + "*" * len(ident)
    return head + ident[:5] + "*" * (len(ident) - 7) + ident[-2:]
