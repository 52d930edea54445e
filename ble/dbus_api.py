"""The one module that imports dbus-fast: re-exported primitives and small BlueZ call helpers.

Everything else in ble/ (and the fake BlueZ in tests/) takes D-Bus types from here, so the
process carries one D-Bus library and swapping it touches one file.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dbus_fast import BusType, DBusError, Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.service import PropertyAccess, ServiceInterface, dbus_property, method, signal

__all__ = [
    "BusType", "DBusError", "Message", "MessageBus", "MessageType", "PropertyAccess",
    "ServiceInterface", "Variant", "dbus_property", "method", "signal",
    "BLUEZ", "call", "connect", "managed_objects", "name_has_owner", "watch_name_owner",
    "unwrap",
]  # fmt: skip

BLUEZ = "org.bluez"
DBUS = "org.freedesktop.DBus"


async def connect(address: str = "") -> MessageBus:
    """The system bus, or `address` (a private bus in tests)."""
    if address:
        return await MessageBus(bus_address=address).connect()
    return await MessageBus(bus_type=BusType.SYSTEM).connect()


async def call(
    bus: MessageBus,
    destination: str,
    path: str,
    interface: str,
    member: str,
    signature: str = "",
    body: list[Any] | None = None,
) -> list[Any]:
    """A method call without introspection; raises DBusError on an error reply."""
    reply = await bus.call(
        Message(
            destination=destination,
            path=path,
            interface=interface,
            member=member,
            signature=signature,
            body=body or [],
        )
    )
    if reply is None:
        return []
    if reply.message_type == MessageType.ERROR:
        raise DBusError(reply.error_name or "org.freedesktop.DBus.Error.Failed", _text(reply))
    return list(reply.body)


def _text(reply: Message) -> str:
    return str(reply.body[0]) if reply.body else ""


async def managed_objects(bus: MessageBus) -> dict[str, dict[str, dict[str, Any]]]:
    """BlueZ's object tree with plain Python values."""
    [tree] = await call(bus, BLUEZ, "/", "org.freedesktop.DBus.ObjectManager", "GetManagedObjects")
    return {path: {i: unwrap(p) for i, p in ifaces.items()} for path, ifaces in tree.items()}


def unwrap(props: dict[str, Variant]) -> dict[str, Any]:
    return {k: v.value if isinstance(v, Variant) else v for k, v in props.items()}


async def name_has_owner(bus: MessageBus, name: str) -> bool:
    [has] = await call(bus, DBUS, "/org/freedesktop/DBus", DBUS, "NameHasOwner", "s", [name])
    return bool(has)


async def watch_name_owner(
    bus: MessageBus, name: str, callback: Callable[[str], None]
) -> Callable[[], None]:
    """Call callback(new_owner) whenever `name` changes hands ("" when it goes away)."""
    rule = (
        f"type='signal',sender='{DBUS}',interface='{DBUS}',member='NameOwnerChanged',arg0='{name}'"
    )
    await call(bus, DBUS, "/org/freedesktop/DBus", DBUS, "AddMatch", "s", [rule])

    def handler(msg: Message) -> None:
        if (
            msg.message_type == MessageType.SIGNAL
            and msg.member == "NameOwnerChanged"
            and msg.interface == DBUS
            and msg.body
            and msg.body[0] == name
        ):
            callback(msg.body[2])

    bus.add_message_handler(handler)
    return lambda: bus.remove_message_handler(handler)
