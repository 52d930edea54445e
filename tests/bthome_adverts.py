"""BTHome v2 advertisements built the way a button builds them, for the tests and the lab.

Written from the BTHome v2 format (bthome.io), with `cryptography`'s AES-CCM, not with the
library under test: service data of UUID 0xFCD2 = device information byte, ciphertext,
counter (4 bytes, little endian), MIC (4 bytes); nonce = MAC + d2 fc + device information
byte + counter. No pytest here: the lab's controller process imports this and starts slowly.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.ciphers.aead import AESCCM

INFO_ENCRYPTED = 0x41  # version 2 (bits 5-7), encrypted (bit 0)
INFO_TRIGGER_ENCRYPTED = 0x45  # ... and trigger-based (bit 2), as a button sends
INFO_PLAIN_TRIGGER = 0x44
EVENTS = {
    "press": 0x01,
    "double_press": 0x02,
    "triple_press": 0x03,
    "long_press": 0x04,
    "long_double_press": 0x05,
    "long_triple_press": 0x06,
    "hold_press": 0x80,
}
OBJ_PACKET_ID, OBJ_BATTERY, OBJ_BUTTON = 0x00, 0x01, 0x3A


def objects(packet_id: int, battery: int | None = None, *events: str) -> bytes:
    """BTHome objects in ascending id order: packet id, battery, one button event each."""
    out = bytes([OBJ_PACKET_ID, packet_id & 0xFF])
    if battery is not None:
        out += bytes([OBJ_BATTERY, battery])
    for event in events:
        out += bytes([OBJ_BUTTON, EVENTS[event] if event else 0x00])
    return out


def encrypt(
    key: bytes, mac: str, counter: int, plain: bytes, info: int = INFO_TRIGGER_ENCRYPTED
) -> bytes:
    """The service data of one encrypted advert."""
    count = counter.to_bytes(4, "little")
    nonce = bytes.fromhex(mac.replace(":", "")) + b"\xd2\xfc" + bytes([info]) + count
    sealed = AESCCM(key, tag_length=4).encrypt(nonce, plain, None)
    return bytes([info]) + sealed[:-4] + count + sealed[-4:]


def press(
    key: bytes, mac: str, counter: int, event: str = "press", battery: int | None = 90
) -> bytes:
    return encrypt(key, mac, counter, objects(counter, battery, event))


def plain(event: str = "press", battery: int | None = 90, packet_id: int = 1) -> bytes:
    """An unencrypted advert (a button with encryption off, or anyone imitating one)."""
    return bytes([INFO_PLAIN_TRIGGER]) + objects(packet_id, battery, event)


def advertising_data(service_data: bytes, name: str = "") -> bytes:
    """A whole legacy advert: flags, the 0xFCD2 service data, a name if it fits 31 bytes."""
    ad = bytes([2, 0x01, 0x06])
    ad += bytes([len(service_data) + 3, 0x16]) + b"\xd2\xfc" + service_data
    if name:
        ad += bytes([len(name) + 1, 0x09]) + name.encode()
    assert len(ad) <= 31, f"{len(ad)} bytes do not fit a legacy advert"
    return ad
