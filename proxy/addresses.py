"""Normalise Twilio addresses (`whatsapp:+E164`, `whatsapp:<BSUID>`, `messenger:ID`, plain numbers); name their
channel."""

from __future__ import annotations

import hashlib
import re

# Channels whose free-form sends Meta limits to a customer-service window.
WINDOWED_CHANNELS = frozenset({"whatsapp", "messenger"})

MAX_LENGTH = 128  # what the database keeps of an address
MAX_INPUT = 160  # an address as given: whatsapp:, a country, ENT. and a BSUID's 128 characters, with spaces to spare
_E164_DIGITS = re.compile(r"^\+?[1-9][0-9]{6,14}\Z")  # ASCII: `\d` also reads other scripts' digits as a key
_PUNCTUATION = re.compile(r"[\s\-().]")
_PLAIN_CHANNEL = re.compile(r"[A-Za-z]+")
# A Messaging Service's SID: a window is keyed by it as by a sender (the inbound's MessagingServiceSid).
SERVICE_SID = re.compile(r"MG[0-9a-fA-F]{32}")
_ASCII_SPACE = " \t\n\r\f\v"
_CONTROL = re.compile(r"[\x00-\x1f]")
# Digits (any script), maybe punctuated as phone numbers are: each such run is masked as one.
_NUMBER_LIKE = re.compile(r"\+?\d(?:[\s\-().]*\d)*")
_FIVE_DIGITS = re.compile(r"\d{5}")
# Meta's business-scoped user id (BSUID), which Twilio sends as `whatsapp:US.1349…` for a user who set a WhatsApp
# username and whose number is withheld: a two-letter country code, a period, `ENT.` for a parent BSUID, then up
# to 128 letters and digits. Kept exactly as sent: Meta's ids are case-sensitive, and no phone number has letters.
_BSUID = re.compile(r"[A-Z]{2}\.(?:ENT\.)?[A-Za-z0-9]{1,128}\Z")
_BSUID_KEY = re.compile(r"[A-Z]{2}\.(?:ENT\.)?[A-Za-z0-9]+(?:~[0-9a-f]{32})?\Z")  # as normalise() keys one
_SHORTENED_BSUID = re.compile(r"[A-Z]{2}\.(?:ENT\.)?[A-Za-z0-9]+~[0-9a-f]{32}\Z")  # a long one's key (normalise)
# What an address the proxy does not recognise may hold and still key a window (see as_sent).
_SENT_IDENT = re.compile(r"[A-Za-z0-9_.+\-@]+\Z")


class InvalidAddress(ValueError):
    """The address cannot be a valid recipient or sender on its channel.

    Its text names the kind of problem, never the address: it is logged, and logs keep numbers masked.
    """


def channel_of(address: str) -> str | None:
    """The channel prefix (`whatsapp`, `messenger`, ...) or None for a plain phone number."""
    prefix, sep, _ = address.partition(":")
    return prefix.strip().lower() if sep else None


def plain_channel(address: str) -> bool:
    """False when the text before a ':' is anything but ASCII letters (ASCII whitespace around it aside).

    Which channel Twilio reads behind a zero-width space, a control character or a look-alike letter
    is unknown: such an address can be judged neither as WhatsApp nor as some other channel.
    """
    prefix, sep, _ = address.partition(":")
    return not sep or _PLAIN_CHANNEL.fullmatch(prefix.strip(_ASCII_SPACE)) is not None


def normalise(address: str) -> str:
    """The address as windows are keyed: canonical(), at most MAX_LENGTH characters.

    Two spellings of one WhatsApp user (`whatsapp:14155550100`, `WhatsApp:+1 415-555-0100`)
    must reach the same window row, so every key the proxy stores goes through here.
    """
    key = canonical(address)
    if len(key) <= MAX_LENGTH:
        return key
    if key.startswith("whatsapp:") and _BSUID.match(key, 9):
        # Meta allows a BSUID 128 characters after its country, a column holds 128 in all: the longest keep their
        # start and a digest of the whole, one key per id and never another's (a BSUID holds no `~`).
        return f"{key[:MAX_LENGTH - 33]}~{hashlib.sha256(key.encode()).hexdigest()[:32]}"
    raise InvalidAddress("address too long")


def canonical(address: str) -> str:
    """Canonical form: lower-case channel prefix; phone numbers as +E164 without punctuation; a BSUID as sent."""
    raw = address.strip()
    if not raw:
        raise InvalidAddress("empty address")
    if len(raw) > MAX_INPUT or _CONTROL.search(raw):
        raise InvalidAddress("address too long or contains control characters")
    channel = channel_of(raw)
    if channel is None:
        return _phone(raw)
    ident = raw.partition(":")[2].strip()
    if not ident:
        raise InvalidAddress("no identifier after the channel prefix")
    if channel == "whatsapp":
        if _BSUID.match(ident) or is_shortened_bsuid(f"whatsapp:{ident}"):  # the key shown for one: it is its own
            return f"whatsapp:{ident}"
        return f"whatsapp:{_phone(ident)}"
    return f"{channel}:{ident}"


def is_bsuid(address: str) -> bool:
    """A normalised WhatsApp address naming its user by business-scoped id: a user, never a business sender."""
    return address.startswith("whatsapp:") and _BSUID_KEY.match(address, 9) is not None


def is_shortened_bsuid(address: str) -> bool:
    """The window key of a BSUID too long for a column (normalise): what listings show for its user, never an
    address Twilio can send to."""
    return (len(address) == MAX_LENGTH and address.startswith("whatsapp:")
            and _SHORTENED_BSUID.match(address, 9) is not None)


def as_sent(address: str) -> str | None:
    """A channel address normalise() does not recognise, as its window key: the channel in lower case, the id as
    sent (letters, digits and `_.+-@` only, no spaces); None when it is not even that.

    A signed webhook from a user whose address takes a form Twilio has not used before is still a message: refused,
    Twilio would not send it again and the app would never see it. Kept as sent, it is stored and forwarded, and
    a reply to the same address finds its window.
    """
    raw = address.strip()
    prefix, sep, ident = raw.partition(":")
    if len(raw) > MAX_LENGTH or not sep or not _PLAIN_CHANNEL.fullmatch(prefix) or not _SENT_IDENT.match(ident):
        return None
    return f"{prefix.lower()}:{ident}"


def _phone(raw: str) -> str:
    digits = _PUNCTUATION.sub("", raw)
    if not _E164_DIGITS.match(digits):
        raise InvalidAddress("not an E.164 phone number")
    return digits if digits.startswith("+") else f"+{digits}"


def is_windowed(address: str) -> bool:
    return channel_of(address) in WINDOWED_CHANNELS


def mask(address: str | None) -> str | None:
    """Hide the middle of a phone number or id for logs: `whatsapp:+1415*****00`.

    The part after the last ':' is hidden as an id; before it, every number-like run is hidden too
    (`+14155550111:` is a value callers send), so no run of five digits is left anywhere.
    """
    if not address:
        return address
    prefix, sep, ident = address.rpartition(":")
    return _NUMBER_LIKE.sub(lambda run: _hide(run.group()), prefix) + sep + _hide(ident)


def _hide(text: str) -> str:
    if len(text) <= 6:
        return "*" * len(text)
    # At most four leading digits, and always something hidden (seven characters used to show whole).
    shown = 4 if _FIVE_DIGITS.match(text) else min(5, len(text) - 3)
    return text[:shown] + "*" * (len(text) - shown - 2) + text[-2:]
