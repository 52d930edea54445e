"""Enrolled BTHome buttons on disk: address, key, name, last accepted counter, battery.

The file is the allow-list, like the fob registry (ble/keys.py): rewritten atomically
(temp file, fsync, rename, fsync of the folder) and mode 0600, because it holds keys. The
counter is written before the press's command runs, so a replay after a crash fails too.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ble.bthome_frame import KEY_LEN
from ble.keys import atomic_write

MAX_BUTTONS = 64  # each advert from an enrolled address costs one AES-CCM check; bound them
MAX_NAME = 64
_ADDRESS = re.compile(r"^[0-9A-F]{2}(:[0-9A-F]{2}){5}$")


class RegistryError(ValueError):
    """A bad address, key or name, an unknown button, or an unreadable file: says what to do."""


def parse_address(text: str) -> str:
    address = str(text).strip().upper().replace("-", ":")
    if not _ADDRESS.match(address):
        raise RegistryError(
            f"{text!r} is not a BLE address like AA:BB:CC:DD:EE:FF "
            "(the Shelly app and `bluetoothctl scan on` show it)"
        )
    return address


def parse_key(text: str) -> bytes:
    hexed = str(text).strip().lower().removeprefix("0x").replace(" ", "").replace(":", "")
    try:
        key = bytes.fromhex(hexed)
    except ValueError:
        key = b""
    if len(key) != KEY_LEN:
        raise RegistryError(
            f"the key must be {KEY_LEN} bytes as {2 * KEY_LEN} hex digits "
            "(the encryption key the Shelly app shows), not "
            f"{len(hexed)} characters"
        )
    return key


def check_name(name: str) -> str:
    name = str(name).strip()
    if not 0 < len(name) <= MAX_NAME or not name.isprintable():
        raise RegistryError(f"a button name must be 1-{MAX_NAME} printable characters")
    return name


@dataclass
class ButtonRecord:
    address: str
    key: str  # hex
    name: str
    counter: int = -1  # last accepted BTHome counter; -1 before the first advert
    added_at: float = 0.0
    last_seen: float = 0.0  # wall time of the last accepted advert
    battery: int | None = None  # percent, from the last advert that carried it

    def public(self) -> dict[str, Any]:
        """What `savepoint buttons` shows: everything but the key."""
        info = asdict(self)
        del info["key"]
        return info


class ButtonRegistry:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.buttons: dict[str, ButtonRecord] = {}
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        try:
            doc = json.loads(self.path.read_text())
            self.buttons = {a: ButtonRecord(**r) for a, r in doc["buttons"].items()}
        except (ValueError, KeyError, TypeError) as e:
            raise RegistryError(
                f"button registry {self.path} is unreadable ({e}); restore it "
                "from backup or move it away and enrol the buttons again"
            ) from e

    def _save(self) -> None:
        doc = {"buttons": {a: asdict(r) for a, r in sorted(self.buttons.items())}}
        atomic_write(self.path, json.dumps(doc, indent=1).encode())

    def get(self, address: str) -> ButtonRecord | None:
        return self.buttons.get(address)

    def add(self, address: str, key_hex: str, name: str = "") -> ButtonRecord:
        address, key = parse_address(address), parse_key(key_hex)
        if address in self.buttons:
            raise RegistryError(
                f"{address} is enrolled already; `savepoint buttons remove "
                f"{address}` first to give it a new key"
            )
        if len(self.buttons) >= MAX_BUTTONS:
            raise RegistryError(f"{MAX_BUTTONS} buttons are enrolled already; remove one first")
        record = ButtonRecord(
            address, key.hex(), check_name(name or f"button-{address[-5:]}"), added_at=time.time()
        )
        self.buttons[address] = record
        self._save()
        return record

    def rename(self, address: str, name: str) -> ButtonRecord:
        record = self._need(address)
        record.name = check_name(name)
        self._save()
        return record

    def remove(self, address: str) -> ButtonRecord:
        record = self._need(address)
        del self.buttons[record.address]
        self._save()
        return record

    def accept(self, address: str, counter: int, battery: int | None, when: float) -> None:
        """Persist a counter above the last one (and what came with it) before acting on it."""
        record = self._need(address)
        if counter <= record.counter:
            raise RegistryError(f"counter {counter} is not above {record.counter}")
        record.counter = counter
        record.last_seen = when
        if battery is not None:
            record.battery = battery
        self._save()

    def list(self) -> list[dict[str, Any]]:
        return [r.public() for _, r in sorted(self.buttons.items())]

    def _need(self, address: str) -> ButtonRecord:
        record = self.buttons.get(parse_address(address))
        if record is None:
            known = ", ".join(self.buttons) or "none"
            raise RegistryError(f"no button {address} is enrolled (enrolled: {known})")
        return record
