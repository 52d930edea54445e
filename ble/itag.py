"""iTag-style keyfinders as extra triggers: one button, a notification on 0xFFE1 per press.

An iTag cannot authenticate: anyone can clone its address or replay its radio traffic. So a
press is submitted with source "itag:<address>" and authenticated=False; the bus's policy
("commodity" class) refuses RESTORE and UNLOCK from it, and the config accepts only the
actions "save" and "status", so a wrong wish fails at start instead of at the first press.

The appliance is the central here: for each configured tag, connect with bleak on the
configured adapter, subscribe to 0xFFE1, and reconnect with backoff when the tag drops or is
out of range (logged once per outage, not on every retry).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from appliance.control.commands import Action, Command, CommandSink

log = logging.getLogger(__name__)

SERVICE_UUID = "0000ffe0-0000-1000-8000-00805f9b34fb"
BUTTON_UUID = "0000ffe1-0000-1000-8000-00805f9b34fb"
ACTIONS = {"save": Action.SAVE, "status": Action.STATUS}
DEBOUNCE = 0.5  # iTags repeat a notification or bounce; one press per half second
BACKOFF = (2.0, 60.0)  # first and longest wait between connection attempts, seconds
CONNECT_TIMEOUT = 20.0
_ADDRESS = re.compile(r"^[0-9A-F]{2}(:[0-9A-F]{2}){5}$")


@dataclass(frozen=True)
class ITag:
    address: str  # upper case, AA:BB:CC:DD:EE:FF
    action: Action

    @property
    def source(self) -> str:
        return f"itag:{self.address}"


def parse_itags(value: Any) -> list[ITag]:
    """[ble] itags: a list of {address, action}; raises ValueError naming the bad entry."""
    if not isinstance(value, list):
        raise ValueError(f"[ble] itags must be a list of tables, got {value!r}")
    tags: list[ITag] = []
    for i, entry in enumerate(value):
        tag = _parse_one(f"[ble] itags[{i}]", entry)
        if any(t.address == tag.address for t in tags):
            raise ValueError(f"[ble] itags[{i}]: {tag.address} is listed twice")
        tags.append(tag)
    return tags


def _parse_one(where: str, entry: Any) -> ITag:
    if not isinstance(entry, dict):
        raise ValueError(f'{where}: expected {{address = "..", action = ".."}}, got {entry!r}')
    if unknown := sorted(set(entry) - {"address", "action"}):
        raise ValueError(f"{where}: unknown key {', '.join(unknown)} (known: address, action)")
    address = str(entry.get("address", "")).upper()
    if not _ADDRESS.match(address):
        raise ValueError(
            f"{where}: address {entry.get('address')!r} is not a BLE address like "
            "AA:BB:CC:DD:EE:FF (`bluetoothctl scan on` shows the tag's)"
        )
    action = entry.get("action", "save")
    if action not in ACTIONS:
        raise ValueError(
            f"{where}: action {action!r} is not allowed; an iTag cannot authenticate, "
            'so it may only trigger "save" or "status" (never restore or unlock)'
        )
    return ITag(address, ACTIONS[action])


class Link(Protocol):
    """What a watcher needs from a BLE central connection (bleak's BleakClient has it)."""

    async def connect(self) -> Any: ...
    async def start_notify(
        self, uuid: str, callback: Callable[[Any, bytearray], None], /
    ) -> Any: ...
    async def disconnect(self) -> Any: ...


# (address, called when the link drops) -> an unconnected Link
LinkFactory = Callable[[str, Callable[[], None]], Link]


def bleak_links(adapter: str, timeout: float = CONNECT_TIMEOUT) -> LinkFactory:
    def make(address: str, dropped: Callable[[], None]) -> Link:
        from bleak import BleakClient

        return BleakClient(address, disconnected_callback=lambda _client: dropped(),
                           timeout=timeout, bluez={"adapter": adapter})  # fmt: skip

    return make


class ITagWatcher:
    """Keeps one iTag connected and turns its presses into commands on the bus."""

    def __init__(
        self,
        tag: ITag,
        bus: CommandSink,
        links: LinkFactory,
        *,
        debounce: float = DEBOUNCE,
        backoff: tuple[float, float] = BACKOFF,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tag, self.bus, self.links = tag, bus, links
        self.debounce, self.backoff, self.clock = debounce, backoff, clock
        self.connected = asyncio.Event()
        self._last_press = float("-inf")
        self._missing = False  # an outage was logged already
        self._submits: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Connect, listen, reconnect; until cancelled (stop)."""
        delay = self.backoff[0]
        while True:
            dropped = asyncio.Event()
            link = self.links(self.tag.address, dropped.set)
            try:
                await link.connect()
                await link.start_notify(BUTTON_UUID, self._on_notify)
            except asyncio.CancelledError:
                await _close(link)
                raise
            except Exception as e:  # bleak raises several kinds; all mean "not now"
                await _close(link)
                self._report_missing(e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff[1])
                continue
            delay = self.backoff[0]
            await self._listen(link, dropped)

    async def _listen(self, link: Link, dropped: asyncio.Event) -> None:
        log.info("iTag %s connected: a press triggers %s", self.tag.address,
                 self.tag.action.value.upper())  # fmt: skip
        self._missing = False
        self.connected.set()
        try:
            await dropped.wait()
            log.warning("iTag %s disconnected; reconnecting", self.tag.address)
        finally:
            self.connected.clear()
            await _close(link)

    def _report_missing(self, error: Exception, delay: float) -> None:
        if self._missing:
            log.debug("iTag %s still unreachable: %s", self.tag.address, error)
            return
        self._missing = True
        log.warning("iTag %s not reachable (%s); retrying quietly every %g-%g s",
                    self.tag.address, error or type(error).__name__, delay,
                    self.backoff[1])  # fmt: skip

    def _on_notify(self, _char: Any, _data: bytearray) -> None:
        now = self.clock()
        if now - self._last_press < self.debounce:
            return
        self._last_press = now
        task = asyncio.get_running_loop().create_task(self._submit())
        self._submits.add(task)
        task.add_done_callback(self._submits.discard)

    async def _submit(self) -> None:
        command = Command(self.tag.action, source=self.tag.source, authenticated=False)
        try:
            outcome = await self.bus.submit(command)
        except Exception:
            log.exception("command bus failed on an iTag press")
            return
        if outcome.ok:
            log.info("iTag %s: %s done", self.tag.address, command.action.value.upper())
        else:
            log.warning("iTag %s: %s", self.tag.address, outcome.reason)


async def _close(link: Link) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(link.disconnect(), 5)
