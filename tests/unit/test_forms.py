"""proxy.forms: the urlencoded fast path builds exactly the MultiDict werkzeug's request.form builds."""

from urllib.parse import unquote_to_bytes

from hypothesis import given, settings
from hypothesis import strategies as st
from werkzeug.test import EnvironBuilder
from werkzeug.wrappers import Request

from proxy.forms import URLENCODED, form_of, strict_form

# Bodies that stress the decoder: escapes (valid and not), '+', '&' and '=' runs, non-UTF-8 bytes.
PIECES = st.sampled_from([b"a", b"B", b"=", b"&", b"+", b"%", b"%20", b"%C3%A9", b"%E2%82", b"%FF", b"%zz",
                          b";", b"\xc3\xa9", b"\xff", b"\x00", b" ", b"Body", b"To"])
BODIES = st.lists(PIECES, max_size=40).map(b"".join)


def request_for(body: bytes, mimetype: str = URLENCODED) -> Request:
    return Request(EnvironBuilder(method="POST", data=body, content_type=mimetype).get_environ())


@settings(max_examples=400, deadline=None)
@given(BODIES)
def test_form_of_equals_werkzeugs_form(body):
    ours, theirs = form_of(request_for(body)), request_for(body).form
    assert list(ours.items(multi=True)) == list(theirs.items(multi=True))


def utf8_throughout(body: bytes) -> bool:
    """The oracle: the body is UTF-8, and so is every %-escaped name and value in it."""
    try:
        text = body.decode("utf-8")
        for pair in text.split("&"):
            for part in pair.replace("+", " ").split("=", 1):
                unquote_to_bytes(part).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@settings(max_examples=400, deadline=None)
@given(BODIES)
def test_strict_form_refuses_exactly_what_is_not_utf8(body):
    parsed = strict_form(body)
    if not utf8_throughout(body):
        assert parsed is None
    else:
        assert list(parsed.items(multi=True)) == list(request_for(body).form.items(multi=True))


def test_strict_form_refuses_an_escape_that_is_not_utf8():
    assert strict_form(b"Body=%FF") is None
    assert strict_form(b"Body=%E2%82") is None
    assert list(strict_form(b"To=whatsapp%3A%2B1&Body=caf%C3%A9+ok&Body=").items(multi=True)) == [
        ("To", "whatsapp:+1"), ("Body", "café ok"), ("Body", "")]


def test_other_bodies_go_through_werkzeug():
    request = request_for(b'{"a": 1}', "application/json")
    assert form_of(request) is request.form
    assert not form_of(request_for(b"\xff\xfe", URLENCODED))  # not UTF-8: an empty form, as werkzeug gives


def test_fields_answer_the_validators_getall():
    fields = form_of(request_for(b"MediaUrl=b&MediaUrl=a&To=x"))
    assert fields.getall("MediaUrl") == ["b", "a"] and fields.getall("missing") == []
