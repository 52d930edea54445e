"""One BTHome v2 advertisement: checked, decrypted and decoded, or rejected with a reason.

BTHome v2 (bthome.io) puts its data in the service data of UUID 0xFCD2. The first byte is
the device information: bit 0 encrypted, bit 1 MAC included (6 bytes follow), bit 2
trigger-based device, bits 5-7 the version (2). An encrypted advertisement ends with a
4-byte counter (little endian) and a 4-byte AES-CCM MIC; the nonce is the device's MAC
(6 bytes, as printed), the UUID (d2 fc), the device information byte and the counter.

The frame checks (version, encryption flag, length) are done here, so a truncated or
unencrypted advertisement is named as such; decryption and the object decoding are
`bthome-ble`'s, the parser Home Assistant uses. The counter is only trusted after the MIC
checked out: it is part of the nonce, so a forged counter fails decryption.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

SERVICE_UUID = "0000fcd2-0000-1000-8000-00805f9b34fb"
UUID16 = b"\xd2\xfc"  # 0xFCD2 as it appears in the advertisement (little endian)
ENCRYPTED, MAC_INCLUDED, TRIGGER_BASED = 0x01, 0x02, 0x04
VERSION_2 = 2
COUNTER_LEN, MIC_LEN, KEY_LEN = 4, 4, 16
MAX_SERVICE_DATA = 255  # an AD structure's length is one byte: anything longer is not radio

# bthome-ble logs each failed decryption at WARNING: a neighbour's radio must not be able to
# fill the journal. The listener counts rejections and logs them itself, rate-limited.
logging.getLogger("bthome_ble").setLevel(logging.ERROR)


class Rejected(Exception):
    """An advertisement that is not accepted; `kind` is the counter it is added to."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind  # "unencrypted", "wrong_key", "truncated", "not_bthome_v2"


@dataclass(frozen=True)
class Advert:
    """A decrypted, authenticated advertisement."""

    address: str
    counter: int
    events: tuple[tuple[str, str], ...] = ()  # (button key, event), e.g. ("button", "press")
    battery: int | None = None  # percent
    values: dict[str, object] = field(default_factory=dict)  # other readings, by key


def device_info(data: bytes) -> tuple[bool, bool, int]:
    """(encrypted, mac included, version) from the first service data byte."""
    if not data:
        raise Rejected("truncated", "empty BTHome service data")
    info = data[0]
    return bool(info & ENCRYPTED), bool(info & MAC_INCLUDED), info >> 5


def check_frame(data: bytes) -> int:
    """The counter of an encrypted BTHome v2 frame (not yet authenticated), or Rejected."""
    if len(data) > MAX_SERVICE_DATA:
        raise Rejected("truncated", f"{len(data)} bytes of service data cannot be one advert")
    encrypted, mac_included, version = device_info(data)
    if version != VERSION_2:
        raise Rejected("not_bthome_v2", f"BTHome version {version}, not 2")
    if not encrypted:
        raise Rejected("unencrypted", "the advertisement is not encrypted")
    header = 1 + (6 if mac_included else 0)
    if len(data) < header + 1 + COUNTER_LEN + MIC_LEN:  # at least one encrypted byte
        raise Rejected("truncated", f"{len(data)} bytes is too short for an encrypted advert")
    return int.from_bytes(data[-COUNTER_LEN - MIC_LEN : -MIC_LEN], "little")


def decode(address: str, data: bytes, key: bytes, name: str = "", rssi: int = 0) -> Advert:
    """Authenticate and decode one advertisement of an enrolled device with its key."""
    counter = check_frame(data)
    verified, update = _parse(address, data, key, name, rssi)
    if not verified:
        raise Rejected("wrong_key", "the MIC does not match this button's key")
    events = tuple(
        sorted((str(k.key), str(ev.event_type)) for k, ev in update.events.items() if ev.event_type)
    )
    values = {
        str(k.key): v.native_value
        for k, v in update.entity_values.items()
        if k.key not in ("signal_strength", "packet_id")
    }
    battery = values.pop("battery", None)
    return Advert(
        address, counter, events, int(battery) if isinstance(battery, int | float) else None, values
    )


def _parse(address: str, data: bytes, key: bytes, name: str, rssi: int) -> tuple[bool, Any]:
    """bthome-ble on one advertisement, with a fresh parser: the replay check is ours (the
    library's accepts a counter that drops below 100, as after a battery change)."""
    from bleak.backends.device import BLEDevice
    from bthome_ble import BTHomeBluetoothDeviceData
    from habluetooth import BluetoothServiceInfoBleak

    device = BLEDevice(address, name or None, None)  # the parser reads the fields, not this
    info = BluetoothServiceInfoBleak(
        name or address,
        address,
        rssi,
        {},
        {SERVICE_UUID: data},
        [],
        "savepoint",
        device,
        None,
        False,
        time.monotonic(),
        None,
    )
    parser = BTHomeBluetoothDeviceData(bindkey=key)
    update = parser.update(info)
    return bool(parser.bindkey_verified), update
