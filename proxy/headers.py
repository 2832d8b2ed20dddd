"""Header names and values another server sent that this one may send on (RFC 9110 field syntax).

gunicorn refuses to write a name that is no token or a value with a control character, and answers a
bare 500 page instead: for a message Twilio already took, or a reply the app already gave.
"""

from __future__ import annotations

import re

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(r"[ \t\x21-\x7e\x80-\xff]*")


def sendable(name: str, value: str) -> bool:
    return _TOKEN.fullmatch(name) is not None and _FIELD_VALUE.fullmatch(value) is not None
