"""The specs of the BLE parts, [ble] (the fob's GATT service, iTags) and [bthome] (BTHome
buttons): their settings, their CLI subcommands, and how to make them.

This module is what appliance/parts.py lists, and it stays light: the CLI imports it for
`savepoint fobs` and `savepoint buttons` without loading dbus-fast, bleak or the crypto (over
two seconds on a Pi); `make` imports the part module when the daemon starts the part.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from appliance.parts import PartContext, PartSpec
from appliance.settings import Settings, setting
from ble.cli import add_buttons_command, add_fobs_command

if TYPE_CHECKING:
    from appliance.control.commands import Part

MAX_NAME = 8  # flags (3) + 128-bit UUID (18) + name header (2) leave 8 of 31 bytes

# what a BTHome button's events do unless [bthome] gestures says otherwise
DEFAULT_GESTURES = {
    "press": "status",
    "double_press": "save",
    "triple_press": "lock",
    "long_press": "restore",
}


@dataclass(frozen=True)
class BleSettings(Settings):
    """The [ble] section: the fob's GATT service, pairing and the iTag triggers."""

    adapter: str = setting("hci0", "Bluetooth adapter that serves the fob service")
    name: str = setting(
        "Savepnt", f"advertised name, at most {MAX_NAME} characters (legacy advert)"
    )
    registry: str = setting(
        "/var/lib/savepoint/fobs.json", "paired fobs and their keys (mode 0600)"
    )
    setup_code: str = setting(
        "",
        "code from the label that a fob must give to pair (SPAKE2: 3 "
        "wrong codes close the window); empty: Just Works, the PAIR "
        "gesture is the only gate (docs/fob-protocol.md)",
    )
    pairing_window: float = setting(60, "seconds the pairing window stays open at most")
    challenge_ttl: float = setting(
        10, "seconds a challenge nonce stays valid (every fob command needs one)"
    )
    bus_address: str = setting("", "D-Bus address to use instead of the system bus (tests)")
    itags: list[Any] = setting(
        [],
        "iTag keyfinders as extra triggers: [{address = "
        '"AA:BB:CC:DD:EE:FF", action = "save" or "status"}]; they can '
        "never RESTORE or UNLOCK",
    )


@dataclass(frozen=True)
class BTHomeSettings(Settings):
    """The [bthome] section: BTHome buttons, their registry and what their gestures do."""

    adapter: str = setting("hci0", "Bluetooth adapter that listens for the buttons")
    registry: str = setting(
        "/var/lib/savepoint/buttons.json", "enrolled buttons, their keys and counters (mode 0600)"
    )
    gestures: dict[str, str] = setting(
        dict(DEFAULT_GESTURES),
        "button event -> save, restore, lock, status, unlock or none, "
        'over these defaults; a key may name one button of a remote: "button_2:press"',
    )
    allow_unlock: bool = setting(
        False,
        "let a gesture UNLOCK: anyone holding an enrolled button "
        "can then SAVE over the disk (docs/buttons.md)",
    )
    battery_low: int = setting(20, "battery percent below which a button raises a warning")
    absent_after: float = setting(
        1209600,
        "seconds without an advert before a button raises a not-seen warning (14 days); 0 = never",
    )
    scan: str = setting(
        "passive",
        "passive (advertisement monitor; falls back to active when BlueZ has none) or active",
    )


def _make_ble(settings: BleSettings, ctx: PartContext) -> Part:
    from ble import part

    return part._make(settings, ctx)


def _validate_ble(table: dict[str, Any]) -> Any:
    from ble import part

    return part.validate_config(table)


def _fob_history(settings: BleSettings) -> list[dict[str, Any]]:
    """Pairings, revocations and refused pairings for `savepoint history`, from the registry
    file (so they show while BlueZ is down too)."""
    from ble.keys import registry_history

    return registry_history(settings.registry)


def _make_bthome(settings: BTHomeSettings, ctx: PartContext) -> Part:
    from ble.bthome_part import BTHomePart

    return BTHomePart(settings, ctx.bus)


def _validate_bthome(table: dict[str, Any]) -> Any:
    from ble import bthome_part

    return bthome_part.validate_config(table)


BLE = PartSpec(
    "ble",
    BleSettings,
    _make_ble,
    validate=_validate_ble,
    cli=add_fobs_command,
    history=_fob_history,
)
BTHOME = PartSpec(
    "bthome", BTHomeSettings, _make_bthome, validate=_validate_bthome, cli=add_buttons_command
)
