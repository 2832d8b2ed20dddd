"""proxy.db.storable: text as the database keeps it."""

import pytest

from proxy.db import storable


@pytest.mark.parametrize("value, length, stored", [
    (None, 10, None),
    ("", 10, None),
    ("whatsapp:+14155550111", 128, "whatsapp:+14155550111"),
    ("Ada\tLovelace", 64, "Ada\tLovelace"),  # a tab is kept
    ("Ada\x00\r\nLovelace\x1f", 64, "AdaLovelace"),  # NUL, CR, LF and the other C0 controls are not
    ("\x00\x01\x02", 10, None),  # nothing left: nothing stored
    ("é漢字😀\x7f", 64, "é漢字😀\x7f"),  # beyond C0, every character is kept, DEL too
    ("abcdef", 3, "abc"),
    ("\x00abcdef", 3, "abc"),  # cut after the controls are gone
])
def test_storable(value, length, stored):
    assert storable(value, length) == stored


def test_every_character_but_the_c0_controls_other_than_tab_is_kept():
    every = "".join(chr(code) for code in range(0x110000))
    assert storable(every, len(every)) == "\t" + every[0x20:]
