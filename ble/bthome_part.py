"""The `bthome` part: encrypted BTHome v2 buttons (Shelly BLU Button and friends) as fobs.

start() opens the button registry, registers the `buttons` part command (list, add, rename,
remove: the local admin's, like `fobs`), and listens with bleak on the configured adapter.
It asks BlueZ for passive scanning through an advertisement monitor matching service data
0xFCD2, so the radio sends no scan requests; where BlueZ offers no monitor (bluetoothd
without --experimental) it falls back to an active scan filtered to that UUID and says so
in the log and in `savepoint status`. Each advertisement goes to ButtonListener
(ble/bthome_listener.py); a ticker raises the not-seen warnings.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from appliance.control.commands import CommandSink, Event, PartUnavailable
from ble.bthome_frame import SERVICE_UUID, UUID16
from ble.bthome_listener import DEFAULT_GESTURES, ButtonListener, parse_gestures
from ble.bthome_registry import ButtonRegistry, RegistryError
from ble.spec import BTHomeSettings

log = logging.getLogger(__name__)


CHECK_EVERY = 60.0  # seconds between not-seen checks


def validate_config(cfg: dict[str, Any]) -> None:
    """The checks `savepoint daemon --check` and start-up share; ValueError names the key."""
    gestures(BTHomeSettings.of(cfg))


def gestures(settings: BTHomeSettings) -> dict[str, Any]:
    """The configured gestures over the defaults (a key given overrides that default only),
    after the section's other checks; ValueError names the key."""
    if not 0 <= int(settings.battery_low) <= 100:
        raise ValueError("battery_low must be a percentage, 0-100")
    if float(settings.absent_after) < 0:
        raise ValueError("absent_after must be 0 (never) or a number of seconds")
    if settings.scan not in ("passive", "active"):
        raise ValueError(f"scan {settings.scan!r} is not passive or active")
    given = settings.gestures
    if not isinstance(given, dict):
        raise ValueError(f"gestures must be a table like {DEFAULT_GESTURES}")
    return parse_gestures({**DEFAULT_GESTURES, **given}, bool(settings.allow_unlock))


# (adapter, mode, callback(address, service data, rssi, name)) -> stop()
ScanStarter = Callable[
    [str, str, Callable[[str, bytes, int, str], object]], Awaitable[Callable[[], Awaitable[None]]]
]


async def bleak_scan(
    adapter: str, mode: str, on_advert: Callable[[str, bytes, int, str], object]
) -> Callable[[], Awaitable[None]]:
    """Start a BleakScanner that hands over BTHome service data; returns its stop()."""
    from bleak import BleakScanner
    from bleak.args.bluez import OrPattern
    from bleak.assigned_numbers import AdvertisementDataType

    def seen(device: Any, adv: Any) -> None:
        data = adv.service_data.get(SERVICE_UUID)
        if data is not None:
            on_advert(device.address, bytes(data), adv.rssi or 0, adv.local_name or "")

    await power_on(adapter)
    if mode == "passive":
        pattern = OrPattern(0, AdvertisementDataType.SERVICE_DATA_UUID16, UUID16)
        scanner = BleakScanner(
            seen, scanning_mode="passive", bluez={"adapter": adapter, "or_patterns": [pattern]}
        )
    else:  # no UUID filter: BlueZ matches it against service UUIDs, not service data
        scanner = BleakScanner(seen, bluez={"adapter": adapter, "filters": {"DuplicateData": True}})
    await scanner.start()
    return scanner.stop


async def power_on(adapter: str) -> None:
    """Best effort, as the fob part does: scanning on an unpowered adapter fails as NotReady."""
    from ble import dbus_api

    try:
        bus = await asyncio.wait_for(dbus_api.connect(), 5)
    except (OSError, TimeoutError, dbus_api.DBusError, ValueError):
        return  # the scan's own error says what is missing
    try:
        await asyncio.wait_for(
            dbus_api.call(
                bus,
                dbus_api.BLUEZ,
                f"/org/bluez/{adapter}",
                "org.freedesktop.DBus.Properties",
                "Set",
                "ssv",
                ["org.bluez.Adapter1", "Powered", dbus_api.Variant("b", True)],
            ),
            5,
        )
    except (TimeoutError, dbus_api.DBusError) as e:
        log.debug("could not power %s: %s", adapter, e)
    finally:
        bus.disconnect()


class BTHomePart:
    name = "bthome"

    def __init__(
        self,
        cfg: BTHomeSettings | dict[str, Any],
        bus: CommandSink,
        *,
        scan: ScanStarter = bleak_scan,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = BTHomeSettings.of(cfg)
        self.bus, self.scan, self.wall = bus, scan, wall
        self.listener: ButtonListener | None = None
        self.scan_mode = "off"
        self._stop_scan: Callable[[], Awaitable[None]] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._dbus: Any = None
        self._unwatch: Callable[[], None] = lambda: None

    async def start(self) -> None:
        try:
            mapping = gestures(self.cfg)
        except ValueError as e:
            raise PartUnavailable(f"[bthome] {e}", "fix [bthome] in the config") from e
        try:
            registry = ButtonRegistry(self.cfg.registry)
        except (OSError, RegistryError) as e:
            raise PartUnavailable(
                f"cannot open the button registry: {e}",
                "check [bthome] registry and its folder's permissions",
            ) from e
        self.listener = ButtonListener(
            registry, self.bus, mapping, battery_low=int(self.cfg.battery_low), wall=self.wall
        )
        await self._start_scan()
        self._allow_unlock()
        register = getattr(self.bus, "register_handler", None)
        if register is not None:
            register("buttons", self.buttons_handler)
        extras = getattr(self.bus, "status_extras", None)
        if isinstance(extras, list):
            extras.append(self.status)
        self._ticker = asyncio.create_task(self._tick())
        await self._watch_bluez()

    async def _watch_bluez(self) -> None:
        """A restarted bluetoothd forgets our advertisement monitor: scan again when it is back."""
        from ble import dbus_api

        try:
            self._dbus = await asyncio.wait_for(dbus_api.connect(), 5)
            self._unwatch = await dbus_api.watch_name_owner(
                self._dbus, dbus_api.BLUEZ, self.bluez_changed
            )
        except (OSError, TimeoutError, dbus_api.DBusError, ValueError) as e:
            log.warning("cannot watch bluetoothd (%s): after a restart of it, restart savepoint", e)

    def bluez_changed(self, new_owner: str) -> None:
        if not new_owner:
            log.warning("bluetoothd went away; BTHome buttons are not heard until it is back")
            self.scan_mode = "lost"
            return
        task = asyncio.get_running_loop().create_task(self._rescan())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _rescan(self, attempts: int = 5, delay: float = 2.0) -> None:
        if self._stop_scan is not None:
            stop, self._stop_scan = self._stop_scan, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(stop(), 5)
        for _ in range(attempts):
            try:
                await self._start_scan()
                return
            except PartUnavailable as e:
                log.warning("BTHome scan after bluetoothd's restart: %s; retrying", e.reason)
            await asyncio.sleep(delay)
        log.error(
            "BTHome buttons are not heard: scanning failed %d times after bluetoothd "
            "restarted; restart savepoint",
            attempts,
        )

    def _allow_unlock(self) -> None:
        """allow_unlock is the one switch: it opens the policy cell the bus checks."""
        policy = getattr(self.bus, "policy", None)
        if self.cfg.allow_unlock and isinstance(policy, dict) and "bthome" in policy:
            policy["bthome"]["unlock"] = "always"
            log.warning("[bthome] allow_unlock: an enrolled button may UNLOCK the appliance")

    async def _start_scan(self) -> None:
        assert self.listener is not None
        adapter, wanted = str(self.cfg.adapter), str(self.cfg.scan)
        for mode in ("passive", "active") if wanted == "passive" else ("active",):
            try:
                self._stop_scan = await self.scan(adapter, mode, self.listener.on_advert)
            except Exception as e:  # bleak raises BleakError, D-Bus errors, OSError
                error = e
                if mode == "passive":
                    log.warning(
                        "passive BLE scanning is not available on %s (%s); scanning "
                        "actively (start bluetoothd with --experimental for passive)",
                        adapter,
                        e,
                    )
                continue
            self.scan_mode = mode
            log.info(
                "listening for BTHome buttons on %s (%s scan), %d enrolled",
                adapter,
                mode,
                len(self.listener.registry.buttons),
            )
            return
        raise PartUnavailable(
            f"cannot scan for BTHome buttons on {adapter}: {error}",
            "is bluetoothd running and the adapter powered? "
            "(bluetoothctl show), or set [bthome] adapter",
        )

    async def stop(self) -> None:
        self._unwatch()
        if self._dbus is not None:
            self._dbus.disconnect()
            self._dbus = None
        for task in list(self._tasks):
            task.cancel()
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        if self._stop_scan is not None:
            stop, self._stop_scan = self._stop_scan, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(stop(), 5)
        extras = getattr(self.bus, "status_extras", None)
        if isinstance(extras, list) and self.status in extras:
            extras.remove(self.status)
        if self.listener is not None:
            await self.listener.drain()
        self.scan_mode = "off"

    async def _tick(self) -> None:
        assert self.listener is not None
        while True:
            self.listener.check_absent(float(self.cfg.absent_after))
            await asyncio.sleep(CHECK_EVERY)

    # --- status and the `buttons` part command ---------------------------------------------
    def status(self) -> dict[str, Any]:
        assert self.listener is not None
        return {
            "buttons": {
                "scan": self.scan_mode,
                "counts": dict(self.listener.counts),
                "devices": self.listener.status(),
            }
        }

    async def buttons_handler(self, args: dict[str, Any]) -> dict[str, Any]:
        assert self.listener is not None
        registry = self.listener.registry
        op = args.get("op", "list")
        if op == "list":
            return self.status()["buttons"]
        try:
            address = str(args.get("address", ""))
            if op == "add":
                record = registry.add(address, str(args.get("key", "")), str(args.get("name", "")))
            elif op == "rename":
                record = registry.rename(address, str(args.get("name", "")))
            elif op == "remove":
                record = registry.remove(address)
            else:
                raise ValueError(f"unknown buttons op {op!r}; use list, add, rename or remove")
        except RegistryError as e:
            raise ValueError(str(e)) from e
        info = record.public()
        log.info("buttons %s: %s %r", op, record.address, record.name)  # the journal's record
        publish = getattr(self.bus, "publish", None)
        if callable(publish):
            publish(Event("buttons", {"op": op, "address": record.address, "name": record.name}))
        return {"button": info, "op": op}
