"""Form bodies parsed once, straight from the request's bytes: the MultiDict werkzeug builds, cheaper.

werkzeug's `request.form` runs the body through its stream wrappers and form-parser objects before
calling `urllib.parse.parse_qsl`; that machinery cost ~60 µs of the ~90 µs a webhook's form took
here (bench/README.md). For an urlencoded body the result is the same MultiDict from the same
`parse_qsl` call; any other body still goes through werkzeug.
"""

from __future__ import annotations

from urllib.parse import parse_qsl

from flask import Request
from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import RequestEntityTooLarge

import werkzeug.urls  # noqa: F401 — registers the "werkzeug.url_quote" codec error handler used below

URLENCODED = "application/x-www-form-urlencoded"
# Twilio's webhooks carry well under 100 fields, a Messages create a few dozen (MediaUrl at most 10). A body of
# tens of thousands of empty fields, unsigned, cost ~0.5 s of CPU before it was refused (parsed, then the
# signature's string built over every field for each URL and token tried): counted before parsing, a 413.
MAX_FIELDS = 1000


class Fields(MultiDict):
    """werkzeug's MultiDict, with the `getall` twilio-python's RequestValidator asks for first.

    The validator tries `getall` (WebOb's name), then `getlist`: on a plain MultiDict that was an
    AttributeError raised and caught for every field, twice per webhook (~30% of the check's CPU).
    """

    getall = MultiDict.getlist


def body_of(request: Request) -> bytes:
    """The request's body (cached); one over MAX_CONTENT_LENGTH is a 413, chunked or not.

    Without a Content-Length (chunked), werkzeug enforces the limit by stopping there: the first
    MAX_CONTENT_LENGTH bytes come back as if they were the whole body, and the fields past the cut
    would be judged and forwarded as never sent.
    """
    body = request.get_data(cache=True)
    if request.content_length is not None:  # werkzeug already refused one over the limit
        return body
    limit = request.max_content_length
    if limit is not None and len(body) >= limit:
        if request.environ["wsgi.input"].read(1):  # past werkzeug's limited stream: is there more?
            raise RequestEntityTooLarge()
    return body


def form_of(request: Request) -> MultiDict:
    """`request.form`: for an urlencoded body, decoded exactly as werkzeug decodes it."""
    if request.mimetype != URLENCODED:
        return request.form
    # As werkzeug: a body that is not UTF-8 is an empty form; a %-escape that is not UTF-8 is kept escaped.
    try:
        text = body_of(request).decode()
    except UnicodeDecodeError:
        return Fields()
    return Fields(_parsed(text, errors="werkzeug.url_quote"))


def strict_form(raw: bytes) -> MultiDict | None:
    """An urlencoded body as a MultiDict, or None when it (or a %-escape in it) is not UTF-8.

    For a send: werkzeug would quietly keep bad bytes escaped, and a body Twilio would read
    differently from the proxy must not be judged.
    """
    try:
        return Fields(_parsed(raw.decode("utf-8"), encoding="utf-8", errors="strict"))
    except UnicodeDecodeError:
        return None


def _parsed(text: str, **decoding) -> list[tuple[str, str]]:
    try:
        return parse_qsl(text, keep_blank_values=True, max_num_fields=MAX_FIELDS, **decoding)
    except UnicodeDecodeError:  # a ValueError too: a %-escape that is not UTF-8, the caller's to answer
        raise
    except ValueError:  # counted before anything is parsed: "Max number of fields exceeded"
        raise RequestEntityTooLarge(f"More than {MAX_FIELDS} form fields.") from None
