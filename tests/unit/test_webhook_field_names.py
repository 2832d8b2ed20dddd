"""proxy.webhooks._could_be_twilios: the field-name check of split_again, with the names that passed remembered."""

import pytest

from proxy import webhooks


@pytest.fixture(autouse=True)
def no_names_remembered(monkeypatch):
    monkeypatch.setattr(webhooks, "_NAMES_PASSED", set())


@pytest.mark.parametrize("name, passes", [
    ("MessageSid", True),
    ("SmsMessageSid", True),
    ("MediaUrl0", True),
    ("WaId", True),
    ("xFrom", False),  # not a name Twilio could send: lower case first
    ("Fromwhatsapp:+14155550111", False),  # an address's `:` and `+`
    ("BodySM" + "a" * 32, False),  # a message sid in the name
    ("MessageSidMore", False),  # MessageSid but at its end
])
def test_a_name_passes_or_not_the_same_the_second_time(name, passes):
    assert webhooks._could_be_twilios(name) is passes
    assert webhooks._could_be_twilios(name) is passes  # now from the remembered names, or checked again
    assert (name in webhooks._NAMES_PASSED) is passes


def test_the_names_remembered_are_bounded(monkeypatch):
    monkeypatch.setattr(webhooks, "_MAX_NAMES_PASSED", 3)
    for n in range(10):
        assert webhooks._could_be_twilios(f"Field{n}")
    assert webhooks._NAMES_PASSED == {"Field0", "Field1", "Field2"}
    assert webhooks._could_be_twilios("Field9")  # checked again, still passes
