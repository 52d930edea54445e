# ruff: noqa: F722, F821  (dbus-fast reads D-Bus signatures from string annotations)
"""The objects BlueZ calls: the GATT application, the advertisement and the pairing agent.

Layout on our connection (the advert and agent sit outside the application's path, so BlueZ
does not mistake them for GATT objects):
  /org/savepoint/app                 ObjectManager
  /org/savepoint/app/service0        GattService1
  /org/savepoint/app/service0/charN  GattCharacteristic1 (Command, Status, Challenge, Pair,
                                                         Outcome)
  /org/savepoint/adv0                LEAdvertisement1
  /org/savepoint/agent               Agent1
"""

import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from ble import frames
from ble.dbus_api import DBusError, PropertyAccess, ServiceInterface, Variant, dbus_property, method
from ble.frames import FrameError, Result
from ble.protocol import FobProtocol

log = logging.getLogger(__name__)
APP_PATH = "/org/savepoint/app"
SERVICE_PATH = APP_PATH + "/service0"
ADV_PATH = "/org/savepoint/adv0"
AGENT_PATH = "/org/savepoint/agent"

# Refusals become ATT errors on the write (BlueZ maps these names); the exact reason is the
# result code in Status, which the fob reads or gets notified of.
_ERRORS = {
    Result.BAD_FRAME: "org.bluez.Error.InvalidValueLength",
    Result.UNKNOWN_COMMAND: "org.bluez.Error.NotSupported",
    Result.REFUSED: "org.bluez.Error.NotPermitted",
    Result.FAILED: "org.bluez.Error.Failed",
    Result.PAIRING_CLOSED: "org.bluez.Error.NotPermitted",
}
_AUTH_ERROR = "org.bluez.Error.NotAuthorized"


def att_error(result: Result, text: str) -> DBusError:
    return DBusError(_ERRORS.get(result, _AUTH_ERROR), f"{result.name}: {text}")


class Characteristic(ServiceInterface):
    def __init__(
        self,
        index: int,
        uuid: str,
        flags: list[str],
        read: Callable[[dict[str, Any]], bytes] | None = None,
        write: Callable[[bytes, dict[str, Any]], Awaitable[None]] | None = None,
    ) -> None:
        super().__init__("org.bluez.GattCharacteristic1")
        self.path = f"{SERVICE_PATH}/char{index}"
        self.uuid, self.flags = uuid, flags
        self._read, self._write = read, write
        self.notifying = False

    def props(self) -> dict[str, Variant]:
        return {
            "UUID": Variant("s", self.uuid),
            "Service": Variant("o", SERVICE_PATH),
            "Flags": Variant("as", self.flags),
        }

    @method()
    def ReadValue(self, options: "a{sv}") -> "ay":
        if self._read is None:
            raise DBusError("org.bluez.Error.NotSupported", "not readable")
        opts = _plain(options)
        return self._read(opts)[int(opts.get("offset", 0)) :]

    @method()
    async def WriteValue(self, value: "ay", options: "a{sv}") -> None:
        if self._write is None:
            raise DBusError("org.bluez.Error.NotSupported", "not writable")
        opts = _plain(options)
        if int(opts.get("offset", 0)):
            raise DBusError("org.bluez.Error.InvalidOffset", "frames are single writes")
        await self._write(bytes(value), opts)

    @method()
    def StartNotify(self) -> None:
        if "notify" not in self.flags:
            raise DBusError("org.bluez.Error.NotSupported", "no notifications here")
        self.notifying = True

    @method()
    def StopNotify(self) -> None:
        self.notifying = False

    @dbus_property(access=PropertyAccess.READ)
    def UUID(self) -> "s":
        return self.uuid

    @dbus_property(access=PropertyAccess.READ)
    def Flags(self) -> "as":
        return self.flags

    # dbus-fast answers GetManagedObjects itself from these properties, and bluetoothd
    # rejects a characteristic without its Service ("No valid service object found").
    @dbus_property(access=PropertyAccess.READ)
    def Service(self) -> "o":
        return SERVICE_PATH

    @dbus_property(access=PropertyAccess.READ)
    def Value(self) -> "ay":
        return b""

    def notify(self, value: bytes) -> None:
        if self.notifying:
            self.emit_properties_changed({"Value": value})


class GattServiceObject(ServiceInterface):
    def __init__(self, chars: list[Characteristic]) -> None:
        super().__init__("org.bluez.GattService1")
        self.chars = chars

    def props(self) -> dict[str, Variant]:
        return {
            "UUID": Variant("s", frames.SERVICE_UUID),
            "Primary": Variant("b", True),
            "Characteristics": Variant("ao", [c.path for c in self.chars]),
        }

    @dbus_property(access=PropertyAccess.READ)
    def UUID(self) -> "s":
        return frames.SERVICE_UUID

    @dbus_property(access=PropertyAccess.READ)
    def Primary(self) -> "b":
        return True


class Application(ServiceInterface):
    """ObjectManager at the application root: BlueZ reads the GATT tree from it."""

    def __init__(self, proto: FobProtocol) -> None:
        super().__init__("org.freedesktop.DBus.ObjectManager")
        self.proto = proto
        enc_w, enc_r = "encrypt-write", "encrypt-read"
        self.command = Characteristic(0, frames.COMMAND_UUID, [enc_w], write=self._on_command)
        self.status = Characteristic(
            1, frames.STATUS_UUID, [enc_r, "notify"], read=lambda o: proto.status_read(_peer(o))
        )
        self.challenge = Characteristic(
            2, frames.CHALLENGE_UUID, [enc_r], read=lambda o: proto.read_challenge(_peer(o))
        )
        self.pair = Characteristic(
            3, frames.PAIR_UUID, [enc_r, enc_w], read=self._on_pair_read, write=self._on_pair
        )
        self.outcome = Characteristic(
            4, frames.OUTCOME_UUID, [enc_r, enc_w], read=self._on_outcome_read,
            write=self._on_outcome,
        )  # fmt: skip
        self.chars = [self.command, self.status, self.challenge, self.pair, self.outcome]
        self.service = GattServiceObject(self.chars)

    def export_to(self, bus: Any) -> None:
        bus.export(APP_PATH, self)
        bus.export(SERVICE_PATH, self.service)
        for char in self.chars:
            bus.export(char.path, char)

    @method()
    def GetManagedObjects(self) -> "a{oa{sa{sv}}}":
        tree = {SERVICE_PATH: {self.service.name: self.service.props()}}
        for char in self.chars:
            tree[char.path] = {char.name: char.props()}
        return tree

    async def _on_command(self, value: bytes, opts: dict[str, Any]) -> None:
        result = await self.proto.handle_command(value, _peer(opts))
        if result != Result.OK:
            raise att_error(result, "see the Status characteristic")

    async def _on_pair(self, value: bytes, opts: dict[str, Any]) -> None:
        try:
            self.proto.pair_write(_peer(opts), value)
        except FrameError as e:
            raise att_error(e.result, str(e)) from None

    def _on_pair_read(self, opts: dict[str, Any]) -> bytes:
        return self.proto.pair_read(_peer(opts))

    async def _on_outcome(self, value: bytes, opts: dict[str, Any]) -> None:
        try:
            self.proto.outcome_write(_peer(opts), value)
        except FrameError as e:
            raise att_error(e.result, str(e)) from None

    def _on_outcome_read(self, opts: dict[str, Any]) -> bytes:
        return self.proto.outcome_read(_peer(opts))


class Advertisement(ServiceInterface):
    """A legacy advert: flags + our 128-bit UUID leave room for an 8-character name."""

    def __init__(self, name: str) -> None:
        super().__init__("org.bluez.LEAdvertisement1")
        self.local_name = name

    @method()
    def Release(self) -> None:
        log.info("BlueZ released the advertisement")

    @dbus_property(access=PropertyAccess.READ)
    def Type(self) -> "s":
        return "peripheral"

    @dbus_property(access=PropertyAccess.READ)
    def ServiceUUIDs(self) -> "as":
        return [frames.SERVICE_UUID]

    @dbus_property(access=PropertyAccess.READ)
    def LocalName(self) -> "s":
        return self.local_name


class PairingAgent(ServiceInterface):
    """Default agent: accepts Just Works pairing only while the pairing window is open."""

    def __init__(
        self, is_open: Callable[[], bool], admit: Callable[[str], bool] = lambda _device: True
    ) -> None:
        super().__init__("org.bluez.Agent1")
        self.is_open = is_open
        self.admit = admit  # False: this window has bonded enough devices already
        self.decisions: deque[tuple[str, bool]] = deque(maxlen=256)  # bounded: radio input

    def _gate(self, device: str) -> None:
        allowed = self.is_open() and self.admit(device)
        self.decisions.append((device, allowed))
        if not allowed:
            log.warning("refused pairing from %s: pairing window closed", device)
            raise DBusError("org.bluez.Error.Rejected", "pairing window is closed; press PAIR")
        log.info("accepting pairing from %s", device)

    @method()
    def Release(self) -> None:
        pass

    @method()
    def RequestAuthorization(self, device: "o") -> None:
        self._gate(device)

    @method()
    def RequestConfirmation(self, device: "o", passkey: "u") -> None:
        self._gate(device)

    @method()
    def AuthorizeService(self, device: "o", uuid: "s") -> None:
        self._gate(device)

    @method()
    def RequestPinCode(self, device: "o") -> "s":
        raise DBusError("org.bluez.Error.Rejected", "PIN pairing is not supported")

    @method()
    def RequestPasskey(self, device: "o") -> "u":
        raise DBusError("org.bluez.Error.Rejected", "passkey entry is not supported")

    @method()
    def DisplayPasskey(self, device: "o", passkey: "u", entered: "q") -> None:
        pass

    @method()
    def DisplayPinCode(self, device: "o", pincode: "s") -> None:
        pass

    @method()
    def Cancel(self) -> None:
        pass


def _plain(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v.value if isinstance(v, Variant) else v for k, v in options.items()}


def _peer(opts: dict[str, Any]) -> str:
    return str(opts.get("device", ""))
