"""Form bodies parsed once, straight from the request's bytes: the MultiDict werkzeug builds, cheaper.

werkzeug's `request.form` runs the body through its stream wrappers and form-parser objects before
calling `urllib.parse.parse_qsl`; that machinery cost ~60 µs of the ~90 µs a webhook's form took
here (bench/README.md). For an urlencoded body the result is the same MultiDict from the same
`parse_qsl` call; any other body still goes through werkzeug.
"""

from __future__ import annotations

from urllib.parse import parse_qsl

from flask import Request, current_app, has_app_context
from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import BadRequest, ClientDisconnected, RequestEntityTooLarge, RequestTimeout

import werkzeug.urls  # noqa: F401 — registers the "werkzeug.url_quote" codec error handler used below

from .cooperative import gevent_timeout

URLENCODED = "application/x-www-form-urlencoded"
# Twilio's webhooks carry well under 100 fields, a Messages create a few dozen (MediaUrl at most 10). A body of
# tens of thousands of empty fields, unsigned, cost ~0.5 s of CPU before it was refused (parsed, then the
# signature's string built over every field for each URL and token tried): counted before parsing, a 413.
MAX_FIELDS = 1000
# A body must arrive within BODY_READ_TIMEOUT_SECONDS (15 s: Twilio itself gives a webhook's answer 15 s) of its
# first read. Without a deadline a client that sent its headers and stopped held a connection for good: the gevent
# worker's only timeout covers the headers, and 2,000 such connections, unauthenticated, left /healthz unanswered.
BODY_READ_SECONDS = 15.0  # the app's BODY_READ_SECONDS config, when it has none

try:  # what gunicorn raises for a chunked body it cannot parse (a bad size, a missing terminator)
    from gunicorn.http.errors import ParseException as _CHUNKING_ERROR
except ImportError:  # pragma: no cover — served by another WSGI server
    _CHUNKING_ERROR = ValueError


class UnreadableBody(BadRequest):
    """A body that ended before its Content-Length, or chunked wrongly: what arrived is not what was sent."""

    close_connection = True  # the rest of it may still come, and be read as the next request

    def __init__(self, why: str):
        super().__init__(f"The request body could not be read whole ({why}); nothing was done with it.")


class BodyTimeout(RequestTimeout):
    close_connection = True

    def __init__(self, seconds: float):
        super().__init__(f"The request body did not arrive within {seconds:g} s; nothing was done with it.")


_READ = "proxy.body"  # the environ key body_of keeps a body read whole under


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
    body = request.environ.get(_READ)
    if body is not None:
        return body
    body = _in_time(request, lambda: request.get_data(cache=True))
    expected = request.content_length
    if expected is not None:  # werkzeug already refused one over the limit
        # gunicorn marks its input as terminated, so werkzeug hands back a body cut short by the client without a
        # word: it would be judged (and a send forwarded) as if it were all that was sent.
        if len(body) < expected:
            raise UnreadableBody(f"{len(body)} of its {expected} bytes came before the connection ended")
    else:
        limit = request.max_content_length
        if limit is not None and len(body) >= limit:
            if _in_time(request, lambda: request.environ["wsgi.input"].read(1)):  # past werkzeug's limit: more?
                raise RequestEntityTooLarge()
    request.environ[_READ] = body
    return body


def _in_time(request: Request, read):
    """read(), reading the body, within BODY_READ_SECONDS: in all under gevent (the Procfile's workers), per read
    of the socket in a thread."""
    seconds = current_app.config.get("BODY_READ_SECONDS", BODY_READ_SECONDS) if has_app_context() else BODY_READ_SECONDS
    try:
        timeout = gevent_timeout()
        if timeout is not None:
            deadline = timeout(seconds)  # raises itself (no exception built per request unless it fires)
            try:
                with deadline:
                    return read()
            except timeout as fired:
                if fired is not deadline:
                    raise
                raise BodyTimeout(seconds) from None
        sock = request.environ.get("gunicorn.socket")
        if sock is None:
            return read()
        before = sock.gettimeout()
        sock.settimeout(seconds)
        try:
            return read()
        except TimeoutError:
            raise BodyTimeout(seconds) from None
        finally:
            sock.settimeout(before)
    except ClientDisconnected as exc:  # werkzeug's word for any error of a read, a socket's timeout among them
        if isinstance(exc.__context__, TimeoutError):
            raise BodyTimeout(seconds) from None
        raise UnreadableBody("the connection ended before it did") from None
    except _CHUNKING_ERROR:
        # Not the parser's words: they quote the body (numbers, text) into the log.
        raise UnreadableBody("its chunked encoding is malformed") from None


def form_of(request: Request) -> MultiDict:
    """`request.form`: for an urlencoded body, decoded exactly as werkzeug decodes it."""
    body = body_of(request)  # read whole first, whatever its type: werkzeug parses any other form from it
    if request.mimetype != URLENCODED:
        return request.form
    # As werkzeug: a body that is not UTF-8 is an empty form; a %-escape that is not UTF-8 is kept escaped.
    try:
        text = body.decode()
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
