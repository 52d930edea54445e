"""BlePart: serves the fob GATT service through BlueZ and keeps it registered.

start() connects to D-Bus, exports the application, advertisement and agent, and registers
them with bluetoothd on the configured adapter. When bluetoothd restarts (org.bluez changes
owner) everything is registered again. Bus events feed the Status characteristic; the bus's
"pairing" event opens the pairing window. Configured iTags (ble/itag.py) each get a watcher
task that connects to the tag as a central on the same adapter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from appliance.control.commands import CommandSink, Event, PartUnavailable
from appliance.parts import PartContext, TaskSet
from ble import dbus_api
from ble.dbus_api import BLUEZ, DBusError, MessageBus, Variant
from ble.gatt_service import (
    ADV_PATH,
    AGENT_PATH,
    APP_PATH,
    Advertisement,
    Application,
    PairingAgent,
)
from ble.itag import ITag, ITagWatcher, LinkFactory, bleak_links, parse_itags
from ble.keys import FobRecord, FobRegistry, RegistryError
from ble.protocol import FobProtocol
from ble.spec import MAX_NAME, BleSettings

log = logging.getLogger(__name__)


def validate_config(cfg: dict[str, Any]) -> list[ITag]:
    """The checks the config loader (`savepoint daemon --check`) and start-up share; returns
    the configured iTags. ValueError names the key (without the "[ble] " the caller adds)."""
    return checked(BleSettings.of(cfg))


def checked(settings: BleSettings) -> list[ITag]:
    """validate_config on the settings themselves: the configured iTags, or ValueError."""
    if not 0 < len(settings.name.encode()) <= MAX_NAME:
        raise ValueError(
            f"name {settings.name!r} does not fit a legacy advert: use 1-{MAX_NAME} characters"
        )
    try:
        return parse_itags(settings.itags)
    except ValueError as e:
        raise ValueError(str(e).removeprefix("[ble] ")) from None


MAX_WINDOW_BONDS = 8  # devices one pairing window may bond (one of them becomes the fob)


class BlePart:
    name = "ble"

    def __init__(self, cfg: BleSettings | dict[str, Any], bus: CommandSink) -> None:
        self.cfg = BleSettings.of(cfg)
        self.bus = bus
        self.adapter_path = f"/org/bluez/{self.cfg.adapter}"
        self.proto: FobProtocol | None = None
        self.app: Application | None = None
        self.agent: PairingAgent | None = None
        self.dbus: MessageBus | None = None
        self.registered = asyncio.Event()
        self._tasks = TaskSet()
        self._queue: asyncio.Queue[Event] | None = None
        self._unwatch = lambda: None
        self._close_timer: asyncio.TimerHandle | None = None
        self._window_devices: set[str] = set()  # bonded by the agent in this window
        self.itag_links: LinkFactory = bleak_links(self.cfg.adapter)
        self.itags: list[ITagWatcher] = []

    # --- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        try:
            tags = checked(self.cfg)
        except ValueError as e:
            key = "itags" if str(e).startswith("itags") else "name"
            raise PartUnavailable(f"[ble] {e}", f"fix [ble] {key} in the config") from e
        try:
            registry = FobRegistry(self.cfg.registry)
        except (OSError, RegistryError) as e:
            raise PartUnavailable(
                f"cannot open the fob registry: {e}",
                "check [ble] registry and its folder's permissions",
            ) from e
        self.proto = FobProtocol(
            registry,
            self.bus,
            setup_code=self.cfg.setup_code,
            challenge_ttl=float(self.cfg.challenge_ttl),
        )
        self.proto.forget_bond = self._forget_bond
        self.proto.on_window_closed = self._window_closed_by_protocol
        self.proto.on_pair_failed = lambda peer: self._tasks.spawn(self._drop_bonds({peer}))
        self.dbus = await self._connect()
        try:
            await self._bring_up(self.cfg.name)
        except BaseException:
            self.dbus.disconnect()
            raise
        register = getattr(self.bus, "register_handler", None)
        if register is not None:
            register("fobs", self.proto.fobs_handler)
        self._queue = self.bus.subscribe()
        self._tasks.spawn(self._pump_events(self._queue))
        self._start_itags(tags)

    def _start_itags(self, tags: list[ITag]) -> None:
        """Each iTag gets its own watcher task: a missing tag must not hold up the others."""
        self.itags = [ITagWatcher(tag, self.bus, self.itag_links) for tag in tags]
        for watcher in self.itags:
            self._tasks.spawn(watcher.run())

    async def _connect(self) -> MessageBus:
        try:
            return await dbus_api.connect(self.cfg.bus_address)
        except (OSError, DBusError, ValueError) as e:
            raise PartUnavailable(
                f"cannot reach the system D-Bus: {e}", "is dbus running? (systemctl status dbus)"
            ) from e

    async def _bring_up(self, name: str) -> None:
        assert self.dbus and self.proto
        self.app = Application(self.proto)
        self.app.export_to(self.dbus)
        self.dbus.export(ADV_PATH, Advertisement(name))
        self.agent = PairingAgent(
            lambda: bool(self.proto and self.proto.pairing_open), self._admit_bond
        )
        self.dbus.export(AGENT_PATH, self.agent)
        self.proto.on_status = self.app.status.notify
        self._unwatch = await dbus_api.watch_name_owner(self.dbus, BLUEZ, self._owner_changed)
        if not await dbus_api.name_has_owner(self.dbus, BLUEZ):
            raise PartUnavailable(
                "BlueZ (bluetoothd) is not running",
                "apt install bluez; systemctl enable --now bluetooth",
            )
        await self._register()

    async def stop(self) -> None:
        self._unwatch()
        if self._close_timer:
            self._close_timer.cancel()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:  # the iTag watchers disconnect on the way out
            await asyncio.wait(tasks, timeout=10)
        if self._queue is not None:
            self.bus.unsubscribe(self._queue)
            self._queue = None
        if self.dbus is not None:
            if self.registered.is_set():
                await self._unregister()
            self.dbus.disconnect()
            self.dbus = None

    # --- registration with bluetoothd -----------------------------------------------------
    async def _register(self) -> None:
        """Register agent, application and advert; bluetoothd calls GetManagedObjects back."""
        assert self.dbus
        self.registered.clear()
        objects = await dbus_api.managed_objects(self.dbus)
        adapter = objects.get(self.adapter_path, {})
        if "org.bluez.GattManager1" not in adapter:
            found = [p.rsplit("/", 1)[1] for p, i in objects.items() if "org.bluez.Adapter1" in i]
            raise PartUnavailable(
                f"no Bluetooth LE adapter {self.cfg.adapter} (found: {found or 'none'})",
                "plug in or power the adapter (bluetoothctl list), or set [ble] adapter",
            )
        await self._bluez(
            "/org/bluez", "AgentManager1", "RegisterAgent", "os", [AGENT_PATH, "NoInputNoOutput"]
        )
        await self._bluez("/org/bluez", "AgentManager1", "RequestDefaultAgent", "o", [AGENT_PATH])
        await self._set_adapter("Powered", True)
        # outside a window the kernel refuses bonding requests before the agent is asked
        # (bluetoothd may start pairable, or come back so after a restart)
        await self._set_adapter("Pairable", bool(self.proto and self.proto.pairing_open))
        await self._bluez(
            self.adapter_path, "GattManager1", "RegisterApplication", "oa{sv}", [APP_PATH, {}]
        )
        await self._bluez(
            self.adapter_path,
            "LEAdvertisingManager1",
            "RegisterAdvertisement",
            "oa{sv}",
            [ADV_PATH, {}],
        )
        self.registered.set()
        log.info("fob service registered on %s", self.cfg.adapter)

    async def _unregister(self) -> None:
        for iface, member, path in (
            ("LEAdvertisingManager1", "UnregisterAdvertisement", ADV_PATH),
            ("GattManager1", "UnregisterApplication", APP_PATH),
        ):
            with contextlib.suppress(DBusError):
                await self._bluez(self.adapter_path, iface, member, "o", [path])
        with contextlib.suppress(DBusError):
            await self._bluez("/org/bluez", "AgentManager1", "UnregisterAgent", "o", [AGENT_PATH])
        self.registered.clear()

    async def _bluez(self, path: str, iface: str, member: str, sig: str, body: list[Any]) -> None:
        assert self.dbus
        await dbus_api.call(self.dbus, BLUEZ, path, f"org.bluez.{iface}", member, sig, body)

    async def _set_adapter(self, prop: str, value: bool) -> None:
        """Best effort: an adapter that refuses (e.g. rfkill) is reported, not fatal."""
        try:
            assert self.dbus
            await dbus_api.call(
                self.dbus,
                BLUEZ,
                self.adapter_path,
                "org.freedesktop.DBus.Properties",
                "Set",
                "ssv",
                ["org.bluez.Adapter1", prop, Variant("b", value)],
            )
        except DBusError as e:
            log.warning("could not set %s=%s on %s: %s", prop, value, self.cfg.adapter, e)

    def _owner_changed(self, new_owner: str) -> None:
        if not new_owner:
            log.warning("bluetoothd went away; will register again when it is back")
            self.registered.clear()
            return
        self._tasks.spawn(self._reregister())

    async def _reregister(self) -> None:
        try:
            await self._register()
        except (PartUnavailable, DBusError) as e:
            log.error("could not register with the restarted bluetoothd: %s", e)

    # --- revoke: forget the bond too ---------------------------------------------------------
    async def _forget_bond(self, record: FobRecord) -> str:
        """RemoveDevice for a revoked fob; the answer says what happened to the bond."""
        assert self.proto
        addr = record.address
        if not addr:
            return "unknown: no BLE address recorded for this fob (paired before 0.2)"
        if others := self.proto.registry.sharing_address(record):
            return f"kept: fob {others[0]} is paired from the same device {addr}"
        by_hand = f"remove it later with `bluetoothctl remove {addr}`"
        if self.dbus is None or not self.registered.is_set():
            return f"kept: BlueZ is not reachable; {by_hand}"
        path = f"{self.adapter_path}/dev_{addr.replace(':', '_')}"
        try:
            await asyncio.wait_for(
                self._bluez(self.adapter_path, "Adapter1", "RemoveDevice", "o", [path]), 5
            )
        except TimeoutError:
            return f"kept: BlueZ did not answer; {by_hand}"
        except DBusError as e:
            if e.type == "org.bluez.Error.DoesNotExist":
                return f"already gone: {addr} is not bonded on {self.cfg.adapter}"
            if e.type.startswith("org.freedesktop.DBus.Error."):
                return f"kept: BlueZ is not reachable ({e.text}); {by_hand}"
            return f"kept: BlueZ refused ({e.type}: {e.text}); {by_hand}"
        log.info("revoked fob %d: removed %s from %s", record.fob_id, addr, self.cfg.adapter)
        return f"removed: {addr} is no longer bonded on {self.cfg.adapter}"

    # --- bus events -----------------------------------------------------------------------
    async def _pump_events(self, queue: asyncio.Queue[Event]) -> None:
        while True:
            event = await queue.get()
            if event.kind == "pairing":
                await self._pairing(event.data)
            elif self.proto:
                self.proto.on_event(event)

    async def _pairing(self, data: dict[str, Any]) -> None:
        assert self.proto
        is_open = bool(data.get("open"))
        if self._close_timer:
            self._close_timer.cancel()
            self._close_timer = None
        self.proto.set_pairing(is_open)
        if is_open:
            self._window_devices.clear()
        if not is_open:
            self._tasks.spawn(self._drop_unfinished_bonds())
        if is_open:
            limit = float(self.cfg.pairing_window)
            until = float(data.get("until") or 0) or time.time() + limit
            delay = max(0.0, min(until - time.time(), limit))
            loop = asyncio.get_running_loop()
            self._close_timer = loop.call_later(delay, self._close_window)
        await self._set_adapter("Pairable", is_open)

    def _close_window(self) -> None:
        if self.proto:
            self.proto.set_pairing(False)
        self._tasks.spawn(self._set_adapter("Pairable", False))
        self._tasks.spawn(self._drop_unfinished_bonds())

    def _window_closed_by_protocol(self, why: str) -> None:
        """One gesture, one fob: a pairing (or too many wrong codes) ends the window now."""
        log.info("pairing window closed: %s", why)
        if self._close_timer:
            self._close_timer.cancel()
            self._close_timer = None
        close = getattr(self.bus, "close_pairing", None)
        if close is not None:  # the bus tells the LED, the CLI and the other parts
            close(why)
        self._close_window()

    def _admit_bond(self, device: str) -> bool:
        """The agent bonds at most MAX_WINDOW_BONDS devices per window: each is remembered,
        so its bond can be removed at close if it did not finish pairing."""
        if not device.startswith(self.adapter_path + "/"):
            return True  # another adapter's pairing (the default agent answers for all)
        if device not in self._window_devices and len(self._window_devices) >= MAX_WINDOW_BONDS:
            log.warning(
                "refused bonding %s: %d devices bonded in this window already",
                device,
                MAX_WINDOW_BONDS,
            )
            return False
        self._window_devices.add(device)
        return True

    async def _drop_unfinished_bonds(self) -> None:
        """Bonds BlueZ made during the window for devices that never finished app pairing."""
        if self.agent is None or self.proto is None:
            return
        bonded, self._window_devices = self._window_devices, set()
        await self._drop_bonds(bonded)

    async def _drop_bonds(self, devices: set[str]) -> None:
        """RemoveDevice for bonds of devices that are not a live fob (a wrong setup code
        drops the bond at once, so the next attempt starts clean on both sides)."""
        assert self.proto is not None
        paired = {r.device for r in self.proto.registry.fobs.values() if not r.revoked}
        for device in devices - paired:
            if not device.startswith(self.adapter_path + "/"):
                continue
            try:
                await asyncio.wait_for(
                    self._bluez(self.adapter_path, "Adapter1", "RemoveDevice", "o", [device]), 5
                )
                log.info("removed the unfinished bond of %s", device)
            except (TimeoutError, DBusError) as e:
                log.warning("could not remove the unfinished bond of %s: %s", device, e)


def _make(settings: BleSettings, ctx: PartContext) -> BlePart:
    ctx.bus.pairing_window = float(settings.pairing_window)  # type: ignore[attr-defined]
    return BlePart(settings, ctx.bus)
