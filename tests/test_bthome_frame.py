"""One BTHome v2 advertisement: encrypted here with AES-CCM (tests/bthome_adverts.py), then
authenticated and decoded by ble/bthome_frame.py (which uses bthome-ble)."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESCCM
from hypothesis import given, settings
from hypothesis import strategies as st

from ble.bthome_frame import Rejected, check_frame, decode
from tests import bthome_adverts as adv

KEY = bytes.fromhex("231d39c1d7cc1ab1aee224cd096db932")
MAC = "54:48:E6:8F:80:A5"


def test_the_format_is_the_published_one() -> None:
    """Layout and nonce, spelt out byte by byte: info, ciphertext, counter LE, 4-byte MIC."""
    data = adv.encrypt(KEY, MAC, 0x33221100, b"\x02\xca\x09\x03\xbf\x13", info=0x41)
    assert data[0] == 0x41 and data[-8:-4] == bytes.fromhex("00112233")
    nonce = bytes.fromhex("5448e68f80a5d2fc4100112233")
    plain = AESCCM(KEY, tag_length=4).decrypt(nonce, data[1:-8] + data[-4:], None)
    assert plain == b"\x02\xca\x09\x03\xbf\x13"
    assert check_frame(data) == 0x33221100


def test_a_good_press_decodes_to_its_event_battery_and_counter() -> None:
    data = adv.encrypt(KEY, MAC, 7, adv.objects(7, 64, "double_press"))
    advert = decode(MAC, data, KEY)
    assert (advert.counter, advert.battery, advert.events) == (7, 64, (("button", "double_press"),))


def test_a_four_button_remote_names_each_button() -> None:
    data = adv.encrypt(KEY, MAC, 9, adv.objects(9, None, "", "long_press", "", ""))
    assert decode(MAC, data, KEY).events == (("button_2", "long_press"),)


def test_a_reading_without_a_button_event_has_no_events() -> None:
    advert = decode(MAC, adv.encrypt(KEY, MAC, 3, adv.objects(3, 55)), KEY)
    assert advert.events == () and advert.battery == 55


@pytest.mark.parametrize("key", [bytes(16), KEY[::-1], KEY[:-1] + bytes([KEY[-1] ^ 1])])
def test_a_wrong_key_is_rejected(key: bytes) -> None:
    with pytest.raises(Rejected) as e:
        decode(MAC, adv.press(KEY, MAC, 5), key)
    assert e.value.kind == "wrong_key"


def test_a_forged_counter_fails_the_mic() -> None:
    """The counter is in the nonce: raising it (to pass the replay check) breaks the MIC."""
    data = bytearray(adv.press(KEY, MAC, 5))
    data[-8] += 10
    with pytest.raises(Rejected) as e:
        decode(MAC, bytes(data), KEY)
    assert e.value.kind == "wrong_key"


def test_an_advert_from_another_address_fails_the_mic() -> None:
    with pytest.raises(Rejected) as e:
        decode("54:48:E6:8F:80:A6", adv.press(KEY, MAC, 5), KEY)
    assert e.value.kind == "wrong_key"


def test_an_unencrypted_advert_is_rejected_as_such() -> None:
    with pytest.raises(Rejected) as e:
        decode(MAC, adv.plain("long_press"), KEY)
    assert e.value.kind == "unencrypted"


@pytest.mark.parametrize("cut", [0, 1, 5, 8, 9])
def test_a_truncated_advert_is_rejected_as_such(cut: int) -> None:
    data = adv.press(KEY, MAC, 5)[:cut]
    with pytest.raises(Rejected) as e:
        decode(MAC, data, KEY)
    assert e.value.kind == "truncated"


def test_a_truncated_tail_fails_the_mic() -> None:
    """Long enough to parse, but a byte short: what is left does not authenticate."""
    with pytest.raises(Rejected) as e:
        decode(MAC, adv.press(KEY, MAC, 5)[:-1], KEY)
    assert e.value.kind == "wrong_key"


def test_bthome_v1_and_oversized_data_are_rejected() -> None:
    with pytest.raises(Rejected) as e:
        decode(MAC, bytes([0x21]) + bytes(12), KEY)
    assert e.value.kind == "not_bthome_v2"
    with pytest.raises(Rejected) as e:
        check_frame(bytes([0x41]) + bytes(300))
    assert e.value.kind == "truncated"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_are_always_rejected_with_a_reason(data: bytes) -> None:
    """Garbage from the air never decodes and never raises anything but Rejected."""
    with pytest.raises(Rejected) as e:
        decode(MAC, data, KEY)
    assert e.value.kind in ("unencrypted", "wrong_key", "truncated", "not_bthome_v2")


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from(sorted(adv.EVENTS)), st.integers(0, 100))
def test_any_counter_event_and_battery_round_trip(counter: int, event: str, battery: int):
    advert = decode(MAC, adv.press(KEY, MAC, counter, event, battery), KEY)
    assert (advert.counter, advert.events, advert.battery) == (
        counter,
        (("button", event),),
        battery,
    )
