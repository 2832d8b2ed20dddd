import re

import pytest
from hypothesis import given, strategies as st

from proxy.addresses import (MAX_LENGTH, InvalidAddress, as_sent, canonical, channel_of, is_bsuid, is_shortened_bsuid,
                             is_windowed, mask, normalise)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("whatsapp:+14155550100", "whatsapp:+14155550100"),
        ("whatsapp:14155550100", "whatsapp:+14155550100"),
        ("WhatsApp:+1 (415) 555-0100", "whatsapp:+14155550100"),
        (" whatsapp: +44 7700 900123 ", "whatsapp:+447700900123"),
        ("messenger:1234567890123456", "messenger:1234567890123456"),
        ("Messenger:abc", "messenger:abc"),
        ("+14155550100", "+14155550100"),
        ("14155550100", "+14155550100"),
        ("rcs:brand_agent", "rcs:brand_agent"),
        # Meta's business-scoped user ids (BSUIDs), as Twilio posts them for users known by a username
        ("whatsapp:US.13491208655302741918", "whatsapp:US.13491208655302741918"),
        (" WhatsApp: BR.1502576394655843 ", "whatsapp:BR.1502576394655843"),
        ("whatsapp:US.ENT.11815799212886844830", "whatsapp:US.ENT.11815799212886844830"),
        ("whatsapp:IN.aBc123XyZ", "whatsapp:IN.aBc123XyZ"),  # letters kept as sent: the ids are case-sensitive
        ("whatsapp:US." + "9" * 116, "whatsapp:US." + "9" * 116),  # as long as a window key can be (128)
    ],
)
def test_normalise(raw, expected):
    assert normalise(raw) == expected


@pytest.mark.parametrize("raw", ["", "whatsapp:", "whatsapp:+0123", "whatsapp:hello", "whatsapp:+1234567890123456", "abc",
                                 # other scripts' digits: a window key of its own, never the ASCII number's
                                 "whatsapp:+1\u0664\u0661\u0665\u0665\u0665\u0665\u0660\u0661\u0661\u0661",
                                 # control characters anywhere, even where punctuation would be stripped
                                 "messenger:ab\x01cd", "rcs:age\x1fnt", "whatsapp:+1415\n5550100", "\x00+14155550100",
                                 # not BSUIDs: a lower-case or three-letter country, no id, other characters, too long
                                 "whatsapp:us.1349", "whatsapp:USA.1349", "whatsapp:US.", "whatsapp:US.ENT.",
                                 "whatsapp:US.13-49", "whatsapp:US.13 49", "whatsapp:US.1349\u0661",
                                 "whatsapp:US." + "9" * 129, "US.13491208655302741918",
                                 # too long for a key, and no BSUID to shorten
                                 "messenger:" + "1" * 119, "whatsapp:+1" + " " * 150 + "4155550100"])
def test_normalise_rejects(raw):
    with pytest.raises(InvalidAddress):
        normalise(raw)


def test_channels_do_not_mix():
    assert channel_of("whatsapp:+14155550100") == "whatsapp"
    assert channel_of("messenger:1") == "messenger"
    assert channel_of("+14155550100") is None
    assert is_windowed("whatsapp:+1") and is_windowed("messenger:1")
    assert not is_windowed("+14155550100") and not is_windowed("rcs:x")
    assert normalise("whatsapp:+14155550100") != normalise("+14155550100")


def test_mask_hides_the_middle():
    assert mask("whatsapp:+14155550100") == "whatsapp:+1415*****00"
    assert mask("+14155550100") == "+1415*****00"
    assert mask("MG123") == "*****"
    assert mask(None) is None


@pytest.mark.parametrize("value, expected", [
    ("+14155550111:", "+1415*****11:"),  # passed through as SMS: the number is before the last ':'
    ("sms:+14155550111:1", "sms:+1415*****11:*"),
    ("whatsapp:+14155550111:x:y", "whatsapp:+1415*****11:x:*"),
    ("messenger:1234567890123456", "messenger:1234**********56"),  # five leading digits would be a run
    ("whatsapp:14155550111", "whatsapp:1415*****11"),
    ("tel:+1 (415) 555-0111:", "tel:+1 (4**********11:"),
])
def test_mask_hides_numbers_wherever_they_are(value, expected):
    assert mask(value) == expected


@given(st.text(alphabet=st.sampled_from("0123456789+:-() .aw\u0661"), max_size=60))
def test_no_five_digit_run_survives_masking(value):
    masked = mask(value)
    assert len(masked) == len(value)
    assert not re.search(r"\d(?:[\s\-().]*\d){4}", masked), masked


def test_a_bsuid_is_a_user_never_a_number():
    assert is_bsuid("whatsapp:US.13491208655302741918") and is_bsuid("whatsapp:US.ENT.1181")
    assert not is_bsuid("whatsapp:+14155550100") and not is_bsuid("messenger:US.1349") and not is_bsuid("US.1349")
    # A number's punctuation never makes it a BSUID, nor a BSUID a number.
    assert normalise("whatsapp:+1.415.555.0100") == "whatsapp:+14155550100"


@pytest.mark.parametrize("raw, expected", [
    ("whatsapp:future_id-0042@meta", "whatsapp:future_id-0042@meta"),
    (" WhatsApp:us.1349 ", "whatsapp:us.1349"),
    ("Messenger:page.scoped+id", "messenger:page.scoped+id"),
    ("whatsapp:+0123", "whatsapp:+0123"),
])
def test_as_sent_keeps_an_unknown_id_with_its_channel_lower_cased(raw, expected):
    assert as_sent(raw) == expected


@pytest.mark.parametrize("raw", ["", "whatsapp:", "+14155550100", "14155550100", "whatsapp:no body", "whatsapp:<id>",
                                 "whatsapp:a;b", "whatsapp:a:b", "what sapp:x", "wh\u0430tsapp:x", "whatsapp:a\x00",
                                 "whatsapp:" + "a" * 120, "whatsapp:\u0661\u0662"])
def test_as_sent_refuses_what_cannot_key_a_window(raw):
    assert as_sent(raw) is None


def test_a_bsuid_is_masked_in_logs():
    assert mask("whatsapp:US.13491208655302741918") == "whatsapp:US.13****************18"


@pytest.mark.parametrize("ident", ["US." + "7" * 128, "US.ENT." + "a" * 128, "BR." + "Z9" * 60])
def test_a_bsuid_longer_than_a_key_is_shortened_by_a_digest_of_the_whole(ident):
    """Meta allows 128 characters after the country; a window key holds 128 in all."""
    key = normalise(" WhatsApp: " + ident)
    assert len(key) == MAX_LENGTH and key.startswith("whatsapp:" + ident[:40]) and "~" in key
    assert canonical("WhatsApp:" + ident) == "whatsapp:" + ident and normalise("whatsapp:" + ident) == key
    assert normalise("whatsapp:" + ident[:-1] + "8") != key  # one character apart: another user
    assert is_bsuid(key) and not is_bsuid(key.replace("~", "-"))
    assert normalise(key) == key and is_shortened_bsuid(key)  # the key shown for it looks it up again
    assert not is_shortened_bsuid("whatsapp:" + ident) and not is_shortened_bsuid(key[:-1])
