"""From BTHome advertisements to commands: who is enrolled, replay protection, gestures.

Every advertisement the scanner hands over is judged once and counted under one verdict:
  unknown      the address is not enrolled (no decryption is tried)
  unencrypted  an enrolled address sent plain BTHome (a button without encryption, or a
               spoofer): never acted on
  truncated / not_bthome_v2   not a well-formed encrypted BTHome v2 frame
  repeated     the counter of the last accepted advert again: a button sends each press
               several times, and this is how one press runs one command
  old_counter  a counter below the last accepted one: a replay
  wrong_key    the MIC does not match the enrolled key
  accepted     authenticated and newer: the counter (and battery, last seen) is persisted
               first, then each button event runs the command its gesture maps to.
Commands go to the bus as source "bthome:<address>", authenticated (the key proves the
button), in their own policy class (appliance/control/policy.py "bthome").
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from appliance.control.commands import Action, Command, CommandSink, Event
from ble.bthome_frame import Rejected, check_frame, decode
from ble.bthome_registry import ButtonRegistry, RegistryError
from ble.spec import DEFAULT_GESTURES

log = logging.getLogger(__name__)

GESTURES = (
    "press",
    "double_press",
    "triple_press",
    "long_press",
    "long_double_press",
    "long_triple_press",
    "hold_press",
)
ACTIONS = {
    "save": Action.SAVE,
    "restore": Action.RESTORE,
    "lock": Action.LOCK,
    "status": Action.STATUS,
    "unlock": Action.UNLOCK,
    "none": None,
}
MAX_PENDING = 2  # commands of one button waiting for the bus; more presses are dropped
MAX_EVENTS = 4  # button events acted on per advert (a 4-button remote sends up to 4)
LOG_EVERY = 60.0  # seconds between log lines about ignored adverts of one kind


def parse_gestures(value: Any, allow_unlock: bool = False) -> dict[str, Action | None]:
    """[bthome] gestures: {gesture = action}; a key may name one button of a multi-button
    device, as "button_2:press". ValueError names the bad entry."""
    if not isinstance(value, dict):
        raise ValueError(f"gestures must be a table like {DEFAULT_GESTURES}")
    out: dict[str, Action | None] = {}
    for key, action in value.items():
        button, _, gesture = str(key).rpartition(":")
        if gesture not in GESTURES or (button and not _is_button_key(button)):
            raise ValueError(
                f"gestures: unknown gesture {key!r} (known: {', '.join(GESTURES)}, "
                'optionally for one button as "button_2:press")'
            )
        if action not in ACTIONS:
            raise ValueError(f"gestures: {key} = {action!r} is not one of {', '.join(ACTIONS)}")
        if action == "unlock" and not allow_unlock:
            raise ValueError(
                f'gestures: {key} = "unlock" needs allow_unlock = true (and '
                "read docs/buttons.md first: anyone holding the button can unlock)"
            )
        out[str(key)] = ACTIONS[action]
    return out


def _is_button_key(text: str) -> bool:
    return text == "button" or (text.startswith("button_") and text[7:].isdigit())


class ButtonListener:
    def __init__(
        self,
        registry: ButtonRegistry,
        bus: CommandSink,
        gestures: dict[str, Action | None],
        *,
        battery_low: int = 20,
        wall: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry, self.bus, self.gestures = registry, bus, gestures
        self.battery_low = battery_low
        self.wall, self.clock = wall, clock
        self.counts: Counter[str] = Counter()
        self.warnings: dict[str, str] = {}  # address -> the warning in force
        self._logged: dict[str, float] = {}
        self._pending: Counter[str] = Counter()
        self._tasks: set[asyncio.Task[None]] = set()

    # --- judging one advertisement ------------------------------------------------------
    def on_advert(self, address: str, data: bytes, rssi: int = 0, name: str = "") -> str:
        """Judge, count and act on one advertisement; returns the verdict."""
        verdict = self._judge(address.upper(), bytes(data), rssi, name)
        self.counts[verdict] += 1
        return verdict

    def _judge(self, address: str, data: bytes, rssi: int, name: str) -> str:
        record = self.registry.get(address)
        if record is None:
            return "unknown"
        try:
            counter = check_frame(data)
            if counter <= record.counter:  # cheap before any AES: repeats are the common case
                return (
                    "repeated"
                    if counter == record.counter
                    else self._ignored(
                        address, "old_counter", f"counter {counter} is below {record.counter}"
                    )
                )
            advert = decode(address, data, bytes.fromhex(record.key), name, rssi)
        except Rejected as e:
            return self._ignored(address, e.kind, str(e))
        try:
            self.registry.accept(address, advert.counter, advert.battery, self.wall())
        except (OSError, RegistryError) as e:  # not persisted: acting would allow a replay
            log.error(
                "BTHome %s: cannot record counter %d (%s); press ignored",
                address,
                advert.counter,
                e,
            )
            return "not_recorded"
        self._check_battery(address, advert.battery)
        self.warnings.pop(f"absent:{address}", None)
        for button, gesture in advert.events[:MAX_EVENTS]:
            self._act(address, button, gesture)
        return "accepted"

    def _ignored(self, address: str, kind: str, detail: str) -> str:
        now = self.clock()
        if now - self._logged.get(kind, -LOG_EVERY) >= LOG_EVERY:
            self._logged[kind] = now
            log.warning(
                "BTHome %s: advert ignored (%s): %s; `savepoint buttons` counts them",
                address,
                kind.replace("_", " "),
                detail,
            )
        return kind

    # --- gestures to commands -----------------------------------------------------------
    def action_for(self, button: str, gesture: str) -> Action | None:
        return self.gestures.get(f"{button}:{gesture}", self.gestures.get(gesture))

    def _act(self, address: str, button: str, gesture: str) -> None:
        action = self.action_for(button, gesture)
        if action is None:
            log.info("BTHome %s: %s %s is not mapped to a command", address, button, gesture)
            self.counts["unmapped"] += 1
            return
        if self._pending[address] >= MAX_PENDING:
            log.warning(
                "BTHome %s: %s dropped, %d commands of it are still waiting",
                address,
                action.value.upper(),
                MAX_PENDING,
            )
            self.counts["dropped"] += 1
            return
        self._pending[address] += 1
        task = asyncio.get_running_loop().create_task(self._submit(address, action, gesture))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _submit(self, address: str, action: Action, gesture: str) -> None:
        command = Command(action, source=f"bthome:{address}", args={"gesture": gesture})
        try:
            outcome = await self.bus.submit(command)
        except Exception:
            log.exception("command bus failed on a BTHome press")
            return
        finally:
            self._pending[address] -= 1
        if outcome.ok:
            log.info("BTHome %s: %s (%s) done", address, action.value.upper(), gesture)
        else:
            log.warning("BTHome %s: %s", address, outcome.reason)

    async def drain(self) -> None:
        """Wait for the commands already submitted (stop, tests)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=30)

    # --- battery and presence -----------------------------------------------------------
    def _check_battery(self, address: str, battery: int | None) -> None:
        key = f"battery:{address}"
        if battery is None:
            return
        if battery >= self.battery_low:
            self.warnings.pop(key, None)
            return
        if key not in self.warnings:
            self._warn(key, address, f"battery low ({battery}%): replace the coin cell")

    def check_absent(self, absent_after: float) -> None:
        """Warn once for each button not seen for `absent_after` seconds (0: never)."""
        if absent_after <= 0:
            return
        now = self.wall()
        for record in self.registry.buttons.values():
            since = record.last_seen or record.added_at
            key = f"absent:{record.address}"
            if now - since >= absent_after and key not in self.warnings:
                hours = (now - since) / 3600
                self._warn(
                    key,
                    record.address,
                    f"not seen for {hours:.0f} h: out of range, "
                    "battery dead, or encryption turned off on it",
                )

    def _warn(self, key: str, address: str, reason: str) -> None:
        self.warnings[key] = reason
        record = self.registry.get(address)
        name = record.name if record else address
        log.warning("BTHome button %s (%s): %s", name, address, reason)
        publish = getattr(self.bus, "publish", None)
        if callable(publish):
            publish(
                Event(
                    "warning", {"part": "bthome", "button": address, "name": name, "reason": reason}
                )
            )

    def status(self) -> list[dict[str, Any]]:
        """Each enrolled button with its warning, for `savepoint status` and `buttons`."""
        out = []
        for info in self.registry.list():
            address = info["address"]
            warning = [w for k, w in self.warnings.items() if k.endswith(address)]
            out.append({**info, "warning": "; ".join(warning)})
        return out
