"""A small fake bluetoothd on a private dbus-daemon, for ladder step 2.

It owns org.bluez, shows one adapter (hci0) with GattManager1 and LEAdvertisingManager1, and
AgentManager1 at /org/bluez. Like bluetoothd it answers RegisterApplication only after calling
GetManagedObjects on the application, and it plays the radio side: read/write/notify through the
application's ReadValue/WriteValue/StartNotify with the options bluetoothd passes, refusing
"encrypt-*" characteristics on an unencrypted link, and asking the agent before it pairs.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
from dataclasses import dataclass, field
from typing import Any

from ble.dbus_api import BLUEZ, DBusError, Message, MessageBus, MessageType, Variant, call, unwrap

ADAPTER = "/org/bluez/hci0"
DEVICE = ADAPTER + "/dev_F0_F0_F0_F0_F0_01"
OM = "org.freedesktop.DBus.ObjectManager"


class AttError(Exception):
    """What the remote central would see as an ATT error response."""


class PrivateBus:
    """`dbus-daemon --session` on a private socket; stopped by close()."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            ["dbus-daemon", "--session", "--nofork", "--print-address"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        self.address = self.proc.stdout.readline().strip()

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=5)


@dataclass
class Registration:
    owner: str
    app: str = ""
    chars: dict[str, tuple[str, list[str]]] = field(default_factory=dict)  # uuid -> path, flags
    adverts: dict[str, dict[str, Any]] = field(default_factory=dict)
    agent: str = ""


class FakeBluez:
    def __init__(self, address: str, adapter_props: dict[str, Any] | None = None) -> None:
        self.address = address
        self.bus: MessageBus | None = None
        self.reg: Registration | None = None
        self.registered = asyncio.Event()
        self.adapter = {"Address": "F0:F0:F0:F0:F0:00", "Powered": False, "Pairable": False}
        self.adapter.update(adapter_props or {})
        self.bonded: set[str] = set()  # device paths bluetoothd keeps a bond for
        self.removed: list[str] = []  # RemoveDevice calls that removed something
        self.notifications: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()

    async def start(self) -> None:
        self.bus = await MessageBus(bus_address=self.address).connect()
        self.bus.add_message_handler(self._handle)
        await self.bus.request_name(BLUEZ)

    async def stop(self) -> None:
        """bluetoothd exiting: the name goes away with the connection."""
        if self.bus:
            self.bus.disconnect()
            await self.bus.wait_for_disconnect()
        self.bus, self.reg = None, None
        self.registered.clear()

    # --- the D-Bus API bluetoothd offers --------------------------------------------------
    def _handle(self, msg: Message) -> Message | bool | None:
        if msg.message_type == MessageType.SIGNAL:
            self._signal(msg)
            return None
        if msg.message_type != MessageType.METHOD_CALL:
            return None
        handler = getattr(self, f"_m_{msg.interface}_{msg.member}".replace(".", "_"), None)
        if handler is None:
            return None
        asyncio.get_running_loop().create_task(self._reply(msg, handler))
        return True

    async def _reply(self, msg: Message, handler: Any) -> None:
        assert self.bus
        try:
            sig, body = await handler(msg)
            self.bus.send(Message.new_method_return(msg, sig, body))
        except DBusError as e:
            self.bus.send(Message.new_error(msg, e.type, e.text))

    async def _m_org_freedesktop_DBus_ObjectManager_GetManagedObjects(self, msg: Message):
        props = {
            k: Variant("b" if isinstance(v, bool) else "s", v) for k, v in self.adapter.items()
        }
        tree = {
            "/org/bluez": {"org.bluez.AgentManager1": {}},
            ADAPTER: {
                "org.bluez.Adapter1": props,
                "org.bluez.GattManager1": {},
                "org.bluez.LEAdvertisingManager1": {},
            },
        }
        for device in sorted(self.bonded):
            address = device.rsplit("/dev_", 1)[1].replace("_", ":")
            tree[device] = {"org.bluez.Device1": {
                "Address": Variant("s", address), "Adapter": Variant("o", ADAPTER),
                "Paired": Variant("b", True), "Bonded": Variant("b", True),
            }}  # fmt: skip
        return "a{oa{sa{sv}}}", [tree]

    async def _m_org_bluez_Adapter1_RemoveDevice(self, msg: Message):
        """Like bluetoothd: forget the bond (and disconnect); unknown paths are an error."""
        device = msg.body[0]
        if msg.path != ADAPTER or device not in self.bonded:
            raise DBusError("org.bluez.Error.DoesNotExist", "Does Not Exist")
        self.bonded.discard(device)
        self.removed.append(device)
        return "", []

    async def _m_org_freedesktop_DBus_Properties_Set(self, msg: Message):
        iface, prop, value = msg.body
        if iface != "org.bluez.Adapter1" or prop not in self.adapter:
            raise DBusError("org.freedesktop.DBus.Error.InvalidArgs", f"no property {prop}")
        self.adapter[prop] = value.value
        return "", []

    async def _m_org_bluez_AgentManager1_RegisterAgent(self, msg: Message):
        self._registration(msg).agent = msg.body[0]
        return "", []

    async def _m_org_bluez_AgentManager1_RequestDefaultAgent(self, msg: Message):
        if self._registration(msg).agent != msg.body[0]:
            raise DBusError("org.bluez.Error.DoesNotExist", "agent not registered")
        return "", []

    async def _m_org_bluez_AgentManager1_UnregisterAgent(self, msg: Message):
        self._registration(msg).agent = ""
        return "", []

    async def _m_org_bluez_GattManager1_RegisterApplication(self, msg: Message):
        reg = self._registration(msg)
        app = msg.body[0]
        # bluetoothd reads the whole tree before it answers
        [tree] = await call(self._bus(), msg.sender, app, OM, "GetManagedObjects")
        reg.chars = {}
        for path, ifaces in tree.items():
            char = ifaces.get("org.bluez.GattCharacteristic1")
            if char:
                p = unwrap(char)
                reg.chars[p["UUID"]] = (path, list(p["Flags"]))
        if not reg.chars:
            raise DBusError("org.bluez.Error.Failed", "no characteristics in application")
        reg.app = app
        return "", []

    async def _m_org_bluez_GattManager1_UnregisterApplication(self, msg: Message):
        self._registration(msg).app = ""
        self.registered.clear()
        return "", []

    async def _m_org_bluez_LEAdvertisingManager1_RegisterAdvertisement(self, msg: Message):
        reg = self._registration(msg)
        path = msg.body[0]
        [props] = await call(self._bus(), msg.sender, path, "org.freedesktop.DBus.Properties",
                             "GetAll", "s", ["org.bluez.LEAdvertisement1"])  # fmt: skip
        reg.adverts[path] = unwrap(props)
        self.registered.set()
        return "", []

    async def _m_org_bluez_LEAdvertisingManager1_UnregisterAdvertisement(self, msg: Message):
        self._registration(msg).adverts.pop(msg.body[0], None)
        return "", []

    def _registration(self, msg: Message) -> Registration:
        if self.reg is None or self.reg.owner != msg.sender:
            self.reg = Registration(owner=msg.sender)
        return self.reg

    def _signal(self, msg: Message) -> None:
        if (
            self.reg
            and msg.sender == self.reg.owner
            and msg.member == "PropertiesChanged"
            and msg.body[0] == "org.bluez.GattCharacteristic1"
            and "Value" in msg.body[1]
        ):
            self.notifications.put_nowait((msg.path, bytes(msg.body[1]["Value"].value)))

    def _bus(self) -> MessageBus:
        assert self.bus is not None
        return self.bus

    # --- the remote central's side (what a fob does over the air) ---------------------------
    def _char(self, uuid: str) -> tuple[str, list[str]]:
        assert self.reg and uuid in self.reg.chars, f"characteristic {uuid} not registered"
        return self.reg.chars[uuid]

    def _link_check(self, flags: list[str], kind: str, device: str) -> None:
        if f"encrypt-{kind}" in flags and device not in self.bonded:
            raise AttError("Insufficient Encryption")
        if kind not in flags and f"encrypt-{kind}" not in flags:
            raise AttError(f"{kind} not permitted")

    def _opts(self, device: str, **extra: Any) -> dict[str, Variant]:
        opts = {"device": Variant("o", device), "mtu": Variant("q", 23), "link": Variant("s", "LE")}
        for key, value in extra.items():
            opts[key] = Variant("q" if isinstance(value, int) else "s", value)
        return opts

    async def read(self, uuid: str, device: str = DEVICE, offset: int = 0) -> bytes:
        path, flags = self._char(uuid)
        self._link_check(flags, "read", device)
        [value] = await self._app_call(path, "ReadValue", "a{sv}",
                                       [self._opts(device, offset=offset)])  # fmt: skip
        return bytes(value)

    async def write(self, uuid: str, value: bytes, device: str = DEVICE) -> None:
        path, flags = self._char(uuid)
        self._link_check(flags, "write", device)
        await self._app_call(path, "WriteValue", "aya{sv}",
                             [value, self._opts(device, type="request", offset=0)])  # fmt: skip

    async def start_notify(self, uuid: str) -> None:
        path, flags = self._char(uuid)
        assert self.reg
        rule = f"type='signal',sender='{self.reg.owner}',path='{path}'"
        await call(self._bus(), "org.freedesktop.DBus", "/org/freedesktop/DBus",
                   "org.freedesktop.DBus", "AddMatch", "s", [rule])  # fmt: skip
        await self._app_call(path, "StartNotify")

    async def pair(self, device: str = DEVICE) -> bool:
        """An incoming Just Works pairing: bluetoothd asks the agent, then bonds or not."""
        assert self.reg and self.reg.agent, "no agent registered"
        try:
            await call(self._bus(), self.reg.owner, self.reg.agent, "org.bluez.Agent1",
                       "RequestAuthorization", "o", [device])  # fmt: skip
        except DBusError as e:
            if e.type != "org.bluez.Error.Rejected":
                raise
            return False
        self.bonded.add(device)
        return True

    async def _app_call(self, path: str, member: str, sig: str = "", body: Any = None) -> list:
        assert self.reg
        try:
            return await call(self._bus(), self.reg.owner, path,
                              "org.bluez.GattCharacteristic1", member, sig, body)  # fmt: skip
        except DBusError as e:
            raise AttError(f"{e.type}: {e.text}") from e
